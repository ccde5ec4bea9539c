"""`amplify`: concept selection on constructed relevances, exact decoding identities, the CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from helpers_viscoin import invoke

from core.errors import UserError
from testing.viscoin.amplify import (
    AmplifyPlan,
    Selection,
    choose_images,
    decode_and_classify,
    normalised_relevance,
    random_baseline,
    resolve_selection,
    scale_selected,
    select_concepts,
)

RELEVANCE = torch.tensor(
    [
        [1.0, 0.6, 0.4, -2.0, 0.0],  # normalised by max|r| = 2: 0.5, 0.3, 0.2, -1, 0
        [-1.0, -0.5, -0.2, -0.1, 0.0],  # nothing positive: empty under any threshold
        [0.0, 0.0, 3.0, 1.5, 2.9],  # 0, 0, 1, 0.5, 0.967
    ]
)


def rows(mask: torch.Tensor) -> list[list[int]]:
    return [r.nonzero().flatten().tolist() for r in mask]


def test_selection_threshold_topk_indices():
    np.testing.assert_allclose(normalised_relevance(RELEVANCE)[0], [0.5, 0.3, 0.2, -1.0, 0.0])
    assert rows(select_concepts(RELEVANCE, resolve_selection(5, threshold=0.25))) == [[0, 1], [], [2, 3, 4]]
    assert rows(select_concepts(RELEVANCE, resolve_selection(5, threshold=0.5))) == [[], [], [2, 4]]
    assert rows(select_concepts(RELEVANCE, resolve_selection(5, threshold=0.0))) == [[0, 1, 2], [], [2, 3, 4]]
    assert rows(select_concepts(RELEVANCE, resolve_selection(5, top_k=2))) == [[0, 1], [3, 4], [2, 4]]
    assert rows(select_concepts(RELEVANCE, resolve_selection(5, indices=[4, 1, 4]))) == [[1, 4]] * 3
    # none given: the paper's rule, as `test viscoin`
    assert resolve_selection(5) == Selection("threshold", 0.2)
    assert resolve_selection(5, top_k=2) == Selection("top_k", 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(threshold=0.5, top_k=2), "--concept-threshold and --concept-top-k exclude each other"),
        (dict(threshold=0.5, indices=[1]), "exclude each other"),
        (dict(threshold=1.5), "must be in [0, 1]"),
        (dict(threshold=-0.1), "must be in [0, 1]"),
        (dict(threshold=float("nan")), "must be in [0, 1]"),
        (dict(top_k=6), "--concept-top-k must be in 1..5"),
        (dict(top_k=0), "--concept-top-k must be in 1..5"),
        (dict(indices=[0, 5]), "--concept-indices [5] out of range"),
    ],
)
def test_selection_bad_input(kwargs, message):
    with pytest.raises(UserError, match=None) as err:
        resolve_selection(5, **kwargs)
    assert message in err.value.message


def test_empty_selection_is_reported():
    selection = resolve_selection(5, threshold=0.25)
    selected = select_concepts(RELEVANCE, selection)
    plan = AmplifyPlan(
        image_ids=[7, 8, 9], images=torch.zeros(3, 3, 4, 4), concepts=torch.zeros(3, 5, 3, 3),
        support=torch.zeros(3, 1), target=torch.zeros(3, dtype=torch.long),
        normalised=normalised_relevance(RELEVANCE), selected=selected,
        random=random_baseline(selected, torch.rand(3, 5)), selection=selection, multipliers=[0.0, 1.0],
    )  # fmt: skip
    lines = plan.empty_lines()
    assert len(lines) == 1 and lines[0].startswith("image 8: no concept selected")
    assert "highest normalised relevance is 0.000" in lines[0]


def test_random_baseline_counts_and_exclusion():
    g = torch.Generator().manual_seed(0)
    selected = torch.zeros(4, 10, dtype=torch.bool)
    selected[0, [1, 2, 3]] = True
    selected[2, :8] = True  # more than half selected: all the other 2 are taken
    scores = torch.rand(4, 10, generator=g)
    chosen = random_baseline(selected, scores)
    assert chosen.sum(1).tolist() == [3, 0, 2, 0]
    assert not (chosen & selected).any()
    assert rows(chosen)[2] == [8, 9]
    assert torch.equal(chosen, random_baseline(selected, scores))  # deterministic for the same scores


def test_scale_selected_touches_only_the_mask():
    concepts = torch.rand(2, 4, 3, 3)
    mask = torch.tensor([[True, False, False, True], [False, False, False, False]])
    scaled = scale_selected(concepts, mask, 2.5)
    assert torch.equal(scaled[0, [0, 3]], concepts[0, [0, 3]] * 2.5)
    assert torch.equal(scaled[0, [1, 2]], concepts[0, [1, 2]]) and torch.equal(scaled[1], concepts[1])


def test_choose_images():
    assert choose_images(64, [0, 63]) == [0, 63]
    default = choose_images(64, None, seed=3)
    assert default == choose_images(64, None, seed=3) and len(default) == 5 and max(default) < 64
    assert choose_images(3, None) == [0, 1, 2]
    with pytest.raises(UserError, match=r"valid 0\.\.63"):
        choose_images(64, [5, 64], split="the test")


def test_multiplier_identities(viscoin):
    """x1 reproduces the plain reconstruction exactly; x0 on every concept decodes the all-zero code."""
    from datasets.registry import DataSpec, build_dataset
    from models.viscoin_io import load_viscoin

    models = load_viscoin(viscoin.bundle)
    data = build_dataset(DataSpec("world", world="small", image_size=32), "test", train_transform=False)
    _, concepts, support, logits = models.encode(torch.stack([data[i]["image"] for i in (0, 9, 20)]))
    target = logits.argmax(1)
    plain, p_plain = decode_and_classify(models, concepts, support, target)
    some = torch.zeros(concepts.shape[:2], dtype=torch.bool)
    some[:, :5] = True
    once, p_once = decode_and_classify(models, scale_selected(concepts, some, 1.0), support, target)
    assert torch.equal(once, plain) and torch.equal(p_once, p_plain)
    every = torch.ones_like(some)
    removed, _ = decode_and_classify(models, scale_selected(concepts, every, 0.0), support, target)
    zero, _ = decode_and_classify(models, torch.zeros_like(concepts), support, target)
    assert torch.equal(removed, zero)
    amplified, _ = decode_and_classify(models, scale_selected(concepts, some, 4.0), support, target)
    assert not torch.equal(amplified, plain)  # scaling a subset changes the image


def test_amplify_cli(viscoin, cache_dir, tmp_path):
    from datasets.registry import DataSpec, build_dataset
    from models.viscoin_io import load_viscoin

    out = tmp_path / "amp"
    code, output = invoke("amplify", "--bundle", viscoin.bundle, "--image-indices", "2,11", "--concept-top-k", "2",
                          "--multipliers", "0,1,3", "--out", out, "--device", "cpu", "-q")  # fmt: skip
    assert code == 0, output
    assert (out / "amplify.png").stat().st_size > 1000
    table = pd.read_csv(out / "amplify.csv", keep_default_na=False)
    assert len(table) == 6 and table["image"].tolist() == [2, 2, 2, 11, 11, 11]
    assert table["multiplier"].tolist() == [0.0, 1.0, 3.0] * 2
    assert (table["selected_concepts"].str.split().str.len() == 2).all()
    assert (table["random_concepts"].str.split().str.len() == 2).all()
    one = table[table["multiplier"] == 1.0]
    assert (one["p_selected"] == one["p_reconstruction"]).all() and (
        one["p_random"] == one["p_reconstruction"]
    ).all()

    # the numbers equal a direct computation: Theta's class, its top-2 concepts scaled by 3, f's probability
    models = load_viscoin(viscoin.bundle)
    data = build_dataset(DataSpec("world", world="small", image_size=32), "test", train_transform=False)
    _, concepts, support, logits = models.encode(data[11]["image"][None])
    target = logits.argmax(1)
    top = models.explainer.relevance(concepts, target).topk(2, dim=1).indices
    mask = torch.zeros(concepts.shape[:2], dtype=torch.bool).scatter_(1, top, True)
    _, p = decode_and_classify(models, scale_selected(concepts, mask, 3.0), support, target)
    row = table[(table["image"] == 11) & (table["multiplier"] == 3.0)].iloc[0]
    assert sorted(map(int, row["selected_concepts"].split())) == sorted(top[0].tolist())
    assert row["explained_class"] == int(target) and row["p_selected"] == pytest.approx(float(p), rel=1e-5)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == [2, 11] and summary["n_empty"] == 0
    for m, key in ((0.0, "0"), (3.0, "3")):
        part = table[table["multiplier"] == m]
        assert summary["mean_p_selected"][key] == pytest.approx(part["p_selected"].mean(), rel=1e-5)
        assert summary["mean_p_random"][key] == pytest.approx(part["p_random"].mean(), rel=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--image-indices", "0,64"],
            "--image-indices [64] out of range: the test split has 64 images, valid 0..63",
        ),
        (["--concept-threshold", "1.5"], "--concept-threshold must be in [0, 1]"),
        (["--concept-threshold", "0.5", "--concept-top-k", "2"], "exclude each other"),
        (["--concept-indices", "3,32"], "--concept-indices [32] out of range"),
        (["--dataset", "cub"], "trained on dataset 'world', not 'cub'"),
        (["--image-indices", "0,1", "--concept-threshold", "1.0"], "no image has a concept"),
        (["--multipliers", "1,x"], "--multipliers takes comma-separated floats"),
    ],
)
def test_amplify_bad_input(viscoin, cache_dir, tmp_path, args, message):
    out = tmp_path / "out"
    code, text = invoke("amplify", "--bundle", viscoin.bundle, *args, "--out", out, "--device", "cpu", "-q")
    assert code == 2 and message in text and "\n" not in text.strip()
    assert not out.exists()
