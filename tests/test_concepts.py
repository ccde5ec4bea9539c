"""`concepts` and `concepts heatmaps`: statistics with known answers, the keyed cache, and the CLI end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from helpers_viscoin import invoke

from testing import cache as cache_mod
from testing.viscoin import concepts as concepts_mod
from testing.viscoin.concepts import concept_statistics, correlation, prediction_summary

# ---- statistics on constructed activations ----------------------------------------------------------------


def constructed():
    """3 classes of sizes 4, 2, 2; concepts: one-hot class 1, uniform, dead, class-balanced 2:1:0, negligible."""
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    acts = np.zeros((8, 5))
    acts[labels == 1, 0] = 3.0  # fires for class 1 only
    acts[:, 1] = 2.0  # fires equally everywhere
    acts[:4, 3] = 1.0  # class 0 mean 1
    acts[4, 3] = 1.0  # class 1 mean 0.5 (one of two), class 2 mean 0
    acts[0, 4] = 2e-6  # alive: above the 1e-6 threshold once
    acts[1, 2] = 5e-7  # dead: never above 1e-6
    return acts, labels


def test_entropy_known_answers():
    acts, labels = constructed()
    stats = concept_statistics(acts, labels, 3)
    assert stats["entropy"][0] == pytest.approx(0.0, abs=1e-12)
    assert stats["entropy"][1] == pytest.approx(math.log(3))
    assert stats["entropy_normalised"][1] == pytest.approx(1.0)
    p = np.array([2 / 3, 1 / 3])  # class-balanced: means 1, 0.5, 0 (not counts 4, 1, 0)
    assert stats["entropy"][3] == pytest.approx(-(p * np.log(p)).sum())
    np.testing.assert_allclose(stats["concept_class"][3], [2 / 3, 1 / 3, 0])
    assert np.isnan(stats["entropy"][2])


def test_dead_concepts_and_totals():
    acts, labels = constructed()
    stats = concept_statistics(acts, labels, 3)
    assert stats["dead"].tolist() == [False, False, True, False, False]
    np.testing.assert_allclose(stats["concept_totals"], acts.sum(0))
    np.testing.assert_allclose(stats["image_totals"], acts.sum(1))


def test_class_concept_normalisation():
    acts, labels = constructed()
    stats = concept_statistics(acts, labels, 4)  # class 3 has no image
    cc = stats["class_concept"]
    means = np.array([[0, 2, 0, 1], [3, 2, 0, 0.5], [0, 2, 0, 0]])
    np.testing.assert_allclose(cc[:3, :4], means / means.max(1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(cc.max(1)[:3], 1.0)
    assert (cc[3] == 0).all() and stats["class_counts"].tolist() == [4, 2, 2, 0]
    np.testing.assert_allclose(stats["concept_class"].sum(1)[[0, 1, 3]], 1.0)
    assert stats["entropy_normalised"][1] == pytest.approx(1.0)  # normalised by log(classes present) = log 3


def test_coactivation_and_profile():
    base = np.array([0.0, 1.0, 3.0, 2.0])
    acts = np.stack([base, base, 5 - base, np.ones(4)], axis=1)
    corr = correlation(acts)
    assert corr[0, 1] == pytest.approx(1.0) and corr[0, 2] == pytest.approx(-1.0)
    assert np.isnan(corr[3]).all() and np.isnan(corr[:, 3]).all()
    stats = concept_statistics(acts, np.zeros(4, dtype=int), 1)
    ordered = -np.sort(-acts, axis=1)
    np.testing.assert_allclose(stats["profile_mean"], ordered.mean(0))
    assert (np.diff(stats["profile_mean"]) <= 0).all()
    np.testing.assert_allclose(stats["profile_quantiles"][2], np.median(ordered, axis=0))


def test_theta_top_and_predictions():
    acts, labels = constructed()
    weight = np.array([[0, 1, 0, 5, 0], [1, -1, 0, 0, 0], [0, 0, 0, 0, 9]], dtype=float)
    stats = concept_statistics(acts, labels, 3, weight, top=2)
    assert stats["theta_top"][0].tolist() == [3, 1]  # 5 x 1 > 1 x 2
    assert stats["theta_top"][1][0] == 0  # 1 x 3
    summary = prediction_summary(
        {"labels": labels, "pred_f": np.array([0, 0, 0, 1, 1, 1, 2, 0]), "pred_theta": np.zeros(8, int)}
    )
    assert summary["accuracy_f"] == pytest.approx(6 / 8)
    assert summary["accuracy_theta"] == pytest.approx(4 / 8)
    assert summary["fidelity"] == pytest.approx(4 / 8)


# ---- the keyed cache ---------------------------------------------------------------------------------------


def test_cache_hit_miss_force(cache_dir):
    calls = []

    def compute():
        calls.append(1)
        return {"a": np.arange(6, dtype=np.float32).reshape(2, 3) * len(calls), "b": np.array([1, 2])}

    identity = {"bundle": "h1", "data": {"dataset": "world", "split": "test"}}
    first = cache_mod.cached_arrays("t", identity, compute)
    again = cache_mod.cached_arrays("t", identity, compute)
    assert not first.hit and again.hit and len(calls) == 1
    np.testing.assert_array_equal(first.arrays["a"], again.arrays["a"])
    other = cache_mod.cached_arrays("t", {**identity, "bundle": "h2"}, compute)
    assert not other.hit and len(calls) == 2 and other.key != first.key
    forced = cache_mod.cached_arrays("t", identity, compute, force=True)
    assert not forced.hit and len(calls) == 3
    np.testing.assert_array_equal(forced.arrays["a"], first.arrays["a"] * 3)
    assert cache_mod.cached_arrays("t", identity, compute).arrays["a"][0, 1] == 3.0  # force rewrote the entry
    first.path.with_suffix(".json").write_text("{broken")
    assert not cache_mod.cached_arrays("t", identity, compute).hit  # an unreadable entry is a miss
    with pytest.raises(TypeError):
        cache_mod.save_entry("t", "k", {}, {"o": np.array([object()], dtype=object)})


# ---- CLI end to end ----------------------------------------------------------------------------------------


def direct_activations(bundle) -> dict[str, np.ndarray]:
    """Activations and predictions over the small world's test split, computed here without testing.concepts."""
    from datasets.registry import DataSpec, build_dataset
    from models.viscoin import concept_activations
    from models.viscoin_io import load_viscoin

    models = load_viscoin(bundle)
    data = build_dataset(DataSpec("world", world="small", image_size=32), "test", train_transform=False)
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    logits_f, concepts, _, logits_theta = models.encode(images)
    return {
        "acts": concept_activations(concepts).numpy().astype(np.float64),
        "labels": np.asarray(data.labels),
        "pred_f": logits_f.argmax(1).numpy(),
        "pred_theta": logits_theta.argmax(1).numpy(),
        "weight": models.explainer.linear.weight.numpy().astype(np.float64),
    }


def test_concepts_cli_numbers_and_cache(viscoin, cache_dir, tmp_path, monkeypatch):
    out = tmp_path / "c1"
    code, output = invoke("concepts", "--bundle", viscoin.bundle, "--out", out, "--device", "cpu", "--quiet")
    assert code == 0, output
    assert "computed and cached" in output
    stems = ("concept_activation", "image_activation", "class_concept", "concept_class", "concept_entropy",
             "coactivation")  # fmt: skip
    for stem in stems:
        assert (out / f"{stem}.png").stat().st_size > 1000 and (out / f"{stem}.csv").is_file(), stem
    ref = direct_activations(viscoin.bundle)
    acts, labels = ref["acts"], ref["labels"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == 64 == len(acts)
    assert summary["accuracy_f"] == pytest.approx((ref["pred_f"] == labels).mean())
    assert summary["accuracy_theta"] == pytest.approx((ref["pred_theta"] == labels).mean())
    assert summary["fidelity"] == pytest.approx((ref["pred_f"] == ref["pred_theta"]).mean())
    assert summary["n_dead"] == int((acts.max(0) <= 1e-6).sum())
    peak = acts.max(1, keepdims=True)
    assert summary["mean_active"] == pytest.approx(((acts > 0.1 * peak) & (acts > 0)).sum(1).mean())

    totals = pd.read_csv(out / "concept_activation.csv").sort_values("concept")
    np.testing.assert_allclose(totals["total"], acts.sum(0), rtol=1e-4, atol=1e-5)
    means = np.stack([acts[labels == c].mean(0) for c in range(8)])
    share = means.T / np.where(means.sum(0) > 0, means.sum(0), 1)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = -np.nansum(np.where(share > 0, share * np.log(share), 0), axis=1) / np.log(8)
    entropy = pd.read_csv(out / "concept_entropy.csv")
    live = ~entropy["dead"].to_numpy()
    np.testing.assert_allclose(entropy["entropy_normalised"].to_numpy()[live], expected[live], atol=1e-4)
    class_concept = pd.read_csv(out / "class_concept.csv").filter(like="concept_").to_numpy()
    np.testing.assert_allclose(class_concept, means / means.max(1, keepdims=True), rtol=1e-4, atol=1e-6)
    theta = pd.read_csv(out / "theta_top_concepts.csv")
    first = theta[(theta["class_id"] == 0) & (theta["rank"] == 0)].iloc[0]
    assert first["concept"] == np.argmax(ref["weight"][0] * means[0])

    # a second run reads the cache: the compute function is not called again, the numbers are identical
    def refuse(*args, **kwargs):
        raise AssertionError("recomputed despite a cached entry")

    monkeypatch.setattr(concepts_mod, "collect_activations", refuse)
    code, output = invoke(
        "concepts", "--bundle", viscoin.bundle, "--out", tmp_path / "c2", "--device", "cpu", "--quiet"
    )
    assert code == 0, output
    assert "used the cache" in output
    for stem in ("concept_activation", "class_concept", "coactivation", "concept_entropy"):
        assert (tmp_path / "c2" / f"{stem}.csv").read_bytes() == (out / f"{stem}.csv").read_bytes(), stem
    monkeypatch.undo()
    monkeypatch.setenv("BIOVIS_CACHE", str(cache_dir))
    code, output = invoke("concepts", "--bundle", viscoin.bundle, "--out", tmp_path / "c3", "--force",
                          "--device", "cpu", "--quiet")  # fmt: skip
    assert code == 0 and "computed and cached" in output


def test_concepts_cache_misses_for_a_changed_bundle(viscoin, cache_dir, tmp_path, monkeypatch):
    from models.viscoin_io import load_viscoin, save_bundle

    code, output = invoke(
        "concepts", "--bundle", viscoin.bundle, "--out", tmp_path / "a", "--device", "cpu", "-q"
    )
    assert code == 0, output
    models = load_viscoin(viscoin.bundle)
    with torch.no_grad():
        models.extractor.conv5.bias += 0.5  # a different ensemble, same architecture
    changed = save_bundle(models, tmp_path / "changed.pt")
    calls = []
    original = concepts_mod.collect_activations
    monkeypatch.setattr(
        concepts_mod, "collect_activations", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    code, output = invoke("concepts", "--bundle", changed, "--out", tmp_path / "b", "--device", "cpu", "-q")
    assert code == 0 and "computed and cached" in output and calls == [1]
    before = pd.read_csv(tmp_path / "a" / "concept_activation.csv")["total"].sum()
    after = pd.read_csv(tmp_path / "b" / "concept_activation.csv")["total"].sum()
    assert after != pytest.approx(before)


def test_heatmaps_cli(viscoin, cache_dir, tmp_path):
    from models.viscoin_io import load_viscoin

    out = tmp_path / "h"
    code, output = invoke("concepts", "heatmaps", "--bundle", viscoin.run_dir, "--image-indices", "3,10",
                          "--top", "2", "--out", out, "--device", "cpu", "-q")  # fmt: skip
    assert code == 0, output
    assert (out / "heatmaps.png").stat().st_size > 1000
    table = pd.read_csv(out / "heatmaps.csv")
    assert table["image"].tolist() == [3, 3, 10, 10] and table["rank"].tolist() == [0, 1, 0, 1]
    models = load_viscoin(viscoin.run_dir)
    from datasets.registry import DataSpec, build_dataset

    data = build_dataset(DataSpec("world", world="small", image_size=32), "test", train_transform=False)
    _, concepts, _, logits = models.encode(torch.stack([data[3]["image"], data[10]["image"]]))
    relevance = models.explainer.relevance(concepts, logits.argmax(1))
    top = relevance.topk(2, dim=1)
    assert table["concept"].tolist() == top.indices.flatten().tolist()
    np.testing.assert_allclose(table["relevance"], top.values.flatten().numpy(), rtol=1e-5)
    maps = table.filter(like="map_").to_numpy()
    assert maps.shape == (4, 9)
    np.testing.assert_allclose(maps.max(1), table["activation"], rtol=1e-6)
    expected = concepts[0, top.indices[0, 0]].flatten().numpy()
    np.testing.assert_allclose(maps[0], expected, rtol=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["concepts", "--dataset", "cub"], "trained on dataset 'world', not 'cub'"),
        (["concepts", "heatmaps", "--image-indices", "0,64"], "valid 0..63"),
        (["concepts", "heatmaps", "--top", "99"], "--top must be in 1..32"),
        (["concepts", "--batch-size", "0"], "--batch-size must be positive"),
    ],
)
def test_concepts_bad_input(viscoin, cache_dir, tmp_path, args, message):
    out = tmp_path / "out"
    code, text = invoke(*args, "--bundle", viscoin.bundle, "--out", out, "--device", "cpu", "-q")
    assert code == 2 and message in text and "\n" not in text.strip()
    assert not out.exists() and not cache_dir.exists()
