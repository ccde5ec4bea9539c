"""The CVAE testbed of seed 004: the standard N(0, I) prior beside the learned one (old checkpoints load as learned),
synthetic sets of known intrinsic dimension, vectors from a CSV table, the KL sweep over given features on a
tiny trained model, and runs compared side by side."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from test_gan_cli import cli  # noqa: F401  (the in-process CLI fixture)
from test_gan_training import one_thread  # noqa: F401  (autouse: small networks on one thread)

from core.checkpoint import sidecar_path
from core.errors import UserError
from datasets.vectors import (
    SWISS_NOISE,
    csv_dataset,
    intrinsic_dimension,
    read_vector_csv,
    synthetic_dataset,
    synthetic_vectors,
)
from models.cvae import CVAE, elbo_terms, gaussian_kl, load_cvae, save_cvae
from testing.cvae import given_masks, kl_by_given_count, plot_kl_sweep, sweep_rows
from testing.cvae_compare import compare_runs

# -------------------------------------------------------------------------------------------- priors


def test_standard_prior_is_n01_for_every_condition_and_is_saved(tmp_path):
    torch.manual_seed(0)
    model = CVAE(
        "mlp", (3,), num_classes=2, num_attributes=3, latent_dim=4, hidden=16, layers=1, prior="standard"
    )
    assert model.config["prior"] == "standard" and not any(k.startswith("prior.") for k in model.state_dict())
    x = torch.randn(5, 3)
    c = model.conditions(5, labels=torch.tensor([0, 1, 0, 1, 1]), attributes=x)
    mean, logvar = model.prior_stats(c)
    assert mean.abs().sum() == 0 and logvar.abs().sum() == 0
    recon, mu, lv, prior = model(x, c, torch.zeros(5, 4))
    assert torch.allclose(elbo_terms(x, recon, mu, lv, prior=prior)["kl"], gaussian_kl(mu, lv).sum(1))
    eps = torch.randn(5, 4)
    assert torch.equal(model.prior_latent(c, eps), eps)  # samples are the standard draws themselves
    save_cvae(tmp_path / "cvae.safetensors", model, {})
    loaded, meta, _ = load_cvae(tmp_path / "cvae.safetensors")
    assert loaded.prior_kind == "standard" and meta["model"]["prior"] == "standard"
    assert torch.allclose(loaded.decode(eps, c), model.decode(eps, c))
    with pytest.raises(UserError, match="unknown CVAE prior 'flat'; choices: learned, standard"):
        CVAE("mlp", (3,), prior="flat")


def test_checkpoints_without_the_choice_load_with_a_learned_prior(tmp_path):
    torch.manual_seed(0)
    model = CVAE("mlp", (3,), num_classes=2, latent_dim=4, hidden=16, layers=1)
    assert model.prior_kind == "learned" and any(k.startswith("prior.") for k in model.state_dict())
    with torch.no_grad():
        model.prior[-1].bias.fill_(0.5)
    save_cvae(tmp_path / "cvae.safetensors", model, {})
    sidecar = sidecar_path(tmp_path / "cvae.safetensors")
    meta = yaml.safe_load(sidecar.read_text())
    del meta["model"]["prior"]  # as written before the option existed
    sidecar.write_text(yaml.safe_dump(meta))
    loaded, _, _ = load_cvae(tmp_path / "cvae.safetensors")
    c = loaded.conditions(2, labels=torch.tensor([0, 1]))
    assert loaded.prior_kind == "learned" and torch.allclose(
        loaded.prior_stats(c)[0], torch.full((2, 4), 0.5)
    )


# ------------------------------------------------------------------------------------------- datasets


def test_synthetic_sets_have_their_intrinsic_dimension():
    a, b = (
        synthetic_vectors("gaussian", 20000, dim=3, seed=4),
        synthetic_vectors("gaussian", 20000, dim=3, seed=4),
    )
    assert np.array_equal(a, b) and a.dtype == np.float32 and a.shape == (20000, 3)
    assert np.allclose(np.cov(a.T), np.eye(3), atol=0.03) and np.allclose(a.mean(0), 0, atol=0.03)
    p = synthetic_vectors("projected", 5000, dim=2, projection_dim=7, seed=1)
    singular = np.linalg.svd(p - p.mean(0), compute_uv=False)
    assert p.shape == (5000, 7) and singular[1] > 50 and singular[2] < 1e-3 * singular[0]  # rank 2 in 7-d
    assert np.allclose(p[:, 2], p[:, 0], rtol=0.06, atol=1e-6)  # column 2 is a noisy copy of coordinate 0
    roll = synthetic_vectors("swissroll", 5000, seed=2).astype(np.float64)
    radius = np.hypot(roll[:, 0], roll[:, 1])
    phi = np.arctan2(roll[:, 0], roll[:, 1])  # x, y = r (sin, cos)(phi): the angle is phi mod 2 pi
    slack = np.mod(6 * radius - phi, 2 * np.pi)  # 6 r - phi = 0.1 xi in [0, 0.1]
    assert np.all((slack < SWISS_NOISE + 1e-4) | (slack > 2 * np.pi - 1e-4))
    assert roll[:, 2].min() >= 0 and roll[:, 2].max() <= 15
    assert [intrinsic_dimension(k, 5) for k in ("gaussian", "projected", "swissroll")] == [5, 5, 2]
    with pytest.raises(UserError, match="unknown synthetic set 'spiral'"):
        synthetic_vectors("spiral", 10)


def test_synthetic_splits_are_disjoint_and_repeatable():
    splits = {
        s: synthetic_dataset("projected", s, 500, dim=2, projection_dim=4, seed=3)
        for s in ("train", "val", "test")
    }
    index = {s: set(d.indices.tolist()) for s, d in splits.items()}
    assert not (index["train"] & index["val"]) and not (index["train"] & index["test"])
    assert len(index["train"] | index["val"] | index["test"]) == 500 and len(index["test"]) == 100
    item = splits["val"][0]
    assert np.array_equal(item["x"], item["attributes"]) and item["label"] == 0 and splits["val"].dim == 4
    assert splits["train"].attribute_names == ["x0", "x1", "x2", "x3"] and splits["train"].num_classes == 0
    again = synthetic_dataset("projected", "val", 500, dim=2, projection_dim=4, seed=3)
    assert np.array_equal(again.x, splits["val"].x)


def test_vectors_from_a_csv_table(tmp_path):
    path = tmp_path / "cells.csv"
    rows = ["area,kind,volume"] + [f"{i}.5,{'ab'[i % 2]},{-i}" for i in range(20)]
    path.write_text("\n".join(rows) + "\n")
    x, labels, features, classes = read_vector_csv(path, "kind")
    assert features == ["area", "volume"] and classes == ["a", "b"] and labels[:3].tolist() == [0, 1, 0]
    assert x[3].tolist() == [3.5, -3.0]
    train, test = csv_dataset(path, "train", "kind", 0.0), csv_dataset(path, "test", "kind", 0.0)
    assert len(train) == 16 and len(test) == 4 and sorted(test.labels.tolist()) == [0, 0, 1, 1]  # per class
    with pytest.raises(UserError, match="row 2, column 'kind': 'a' is not a number"):
        csv_dataset(path, "train")  # a text column is a label column or an error, never silently dropped
    bad = tmp_path / "bad.csv"
    for content, message in [
        ("a,b\n1,2\n3,x\n", "row 3, column 'b': 'x' is not a number"),
        ("a,b\n1,2\n3,nan\n", "row 3, column 'b': 'nan' is not a finite number"),
        ("a,b\n1,2\n3\n", "row 3: 1 cells for 2 columns"),
        ("a,b\n1,2\n", "needs a header row and at least two rows"),
    ]:
        bad.write_text(content)
        with pytest.raises(UserError) as err:
            read_vector_csv(bad)
        assert message in err.value.message
    with pytest.raises(UserError, match="has no column 'label'; columns: area, kind, volume"):
        read_vector_csv(path, "label")


# -------------------------------------------------------------------------------------------- sweep


def test_given_masks():
    g = torch.Generator().manual_seed(0)
    mask = given_masks(200, 5, 2, g)
    assert mask.sum(1).eq(2).all() and 0.3 < mask.mean(0).min() < mask.mean(0).max() < 0.5
    assert given_masks(3, 4, 1, g, "first").tolist() == [[1, 0, 0, 0]] * 3


@pytest.fixture(scope="module")
def gaussian_cvae():
    """A tiny MLP CVAE (latent 4, standard prior) trained 1500 steps on 2-d Gaussians given random subsets of
    their features: the testbed's baseline at CPU size (about 3 s on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures start before the autouse one_thread
    torch.manual_seed(0)
    x = torch.from_numpy(synthetic_vectors("gaussian", 4000, dim=2, seed=0))
    model = CVAE("mlp", (2,), 0, 2, latent_dim=4, hidden=64, layers=2, prior="standard")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(1500):
        batch = x[torch.randint(0, 3200, (128,), generator=g)]
        given = torch.randint(0, 3, (128, 1), generator=g)  # 0, 1 or 2 features given, a random subset
        mask = (torch.rand(128, 2, generator=g).argsort(1).argsort(1) < given).float()
        c = model.conditions(128, attributes=batch, attribute_present=mask)
        recon, mu, logvar, prior = model(batch, c)
        opt.zero_grad()
        elbo_terms(batch, recon, mu, logvar, 1.0, 0.1, prior)["loss"].backward()
        opt.step()
    torch.set_num_threads(threads)
    return model.eval(), x[3200:]


def test_information_through_the_bottleneck_follows_the_coordinates_left(gaussian_cvae, tmp_path):
    """Seed 004's hypothesis on 2-d Gaussians: each given coordinate takes its information out of the latent."""
    model, held_out = gaussian_cvae
    kl = kl_by_given_count(model, held_out, [0, 1, 2], seed=3)
    total = {k: sum(v) for k, v in kl.items()}
    # sigma 0.1 against unit variance: about log(1 / 0.1) nats per coordinate encoded
    assert 1.5 * math.log(10) < total[0] < 2.5 * math.log(10)
    assert total[1] == pytest.approx(total[0] / 2, rel=0.15)  # half the coordinates left on average
    assert total[2] < 0.02 * total[0]  # everything given: nothing to encode
    first = kl_by_given_count(model, held_out, [1], seed=3, subset="first")[1]
    active = sorted(first, reverse=True)
    assert active[0] > 1.0 and active[1] < 0.1  # coordinate 0 given: one latent dimension left in use
    rows = sweep_rows("gaussian d=2", 2, 2, kl, independent=True)
    assert [r["expected_active"] for r in rows] == [2, 1, 0] and rows[1]["expected_kl"] == pytest.approx(
        total[0] / 2
    )
    curved = sweep_rows("swiss roll", 3, 2, kl, independent=False)  # x and y given leave z unknown: no rule
    assert all(r["expected_active"] is None and r["expected_kl"] is None for r in curved)
    plot_kl_sweep(rows + curved, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 5000
    assert (
        (tmp_path / "sweep.csv").read_text().splitlines()[0].startswith("run,input_dim,intrinsic_dim,given")
    )


# ------------------------------------------------------------------------------------------ compare


def fake_run(folder, prior: str, neg_elbo: float, kl: list[float]):
    folder.mkdir(parents=True)
    model = CVAE("mlp", (2,), 0, 2, latent_dim=len(kl), hidden=8, layers=1, prior=prior)
    save_cvae(folder / "cvae.safetensors", model, {"kl_per_dim": {"none": kl, "all": [0.0] * len(kl)}})
    summary = {"steps": 10, "val": {"none": {"neg_elbo": neg_elbo, "rec": 1.0, "kl": sum(kl)},
                                    "all": {"neg_elbo": 1.0, "rec": 1.0, "kl": 0.0}},
               "active_dims": {"none": sum(v > 0.05 for v in kl), "all": 0}}  # fmt: skip
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "config.yaml").write_text(yaml.safe_dump({"dataset": "gaussian", "beta": 1.0}))
    return folder


def test_runs_compared_side_by_side(tmp_path):
    a = fake_run(tmp_path / "a" / "run", "standard", 5.0, [2.0, 1.0, 0.0])
    b = fake_run(tmp_path / "b" / "run", "learned", 4.0, [3.0, 0.01, 0.0])
    rows = compare_runs([a, b], tmp_path / "out")
    assert [r["run"] for r in rows] == ["a/run", "b/run"] and [r["prior"] for r in rows] == [
        "standard",
        "learned",
    ]
    assert [r["none_neg_elbo"] for r in rows] == [5.0, 4.0] and [r["none_active_dims"] for r in rows] == [
        2,
        1,
    ]
    header = (tmp_path / "out" / "comparison.csv").read_text().splitlines()[0]
    assert header.startswith("run,dataset,arch,prior,latent_dim,beta,steps,none_neg_elbo")
    assert (tmp_path / "out" / "comparison.png").stat().st_size > 10000
    with pytest.raises(UserError, match="is not a finished train cvae run"):
        compare_runs([a, tmp_path], tmp_path / "out2")
    with pytest.raises(UserError, match="compare at least two runs"):
        compare_runs([a], tmp_path / "out3")


# ------------------------------------------------------------------------------- train cvae on vectors


def test_train_cvae_on_vectors_sweeps_and_compare_runs(cli, tmp_path):  # noqa: F811
    """`train cvae --dataset gaussian --dim d`: the KL sweep in the run (each given coordinate takes about
    log(1/sigma) nats out of the bottleneck, down to nothing when all are given), the prior switch saved in
    the checkpoint, and `compare-runs` putting the runs of d = 1 and 2 side by side with both sweeps in one
    figure. (At 600 steps the 2-d run's encoder still holds 2.3 nats of given coordinates: 2000 it needs.)"""
    runs = {}
    for dim, prior, steps in ((1, "standard", 600), (2, "learned", 2000)):
        runs[dim] = tmp_path / f"d{dim}"
        result = cli("train", "cvae", "--dataset", "gaussian", "--dim", str(dim), "--n-points", "3000",
                     "--prior", prior, "--steps", str(steps), "--eval-every", str(steps), "--out", str(runs[dim]),
                     "--device", "cpu", "--quiet")  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert load_cvae(runs[dim])[0].prior_kind == prior
    summary = json.loads((runs[2] / "summary.json").read_text())
    kl = {row["given"]: row["kl_total"] for row in summary["sweep"]}
    assert sorted(kl) == [0, 1, 2] and [row["intrinsic_dim"] for row in summary["sweep"]] == [2, 2, 2]
    step = math.log(1 / 0.1)  # nats of one unit-variance coordinate at the vectors preset's sigma 0.1
    assert kl[0] - kl[1] == pytest.approx(step, rel=0.35) and kl[1] - kl[2] == pytest.approx(step, rel=0.35)
    assert kl[2] < 0.2 * step
    standard = {
        row["given"]: row["kl_total"] for row in json.loads((runs[1] / "summary.json").read_text())["sweep"]
    }
    assert standard[0] == pytest.approx(step, rel=0.35) and standard[1] < 0.2 * step
    assert (runs[2] / "kl_sweep.png").stat().st_size > 5000 and (runs[2] / "kl_sweep.csv").is_file()
    assert (runs[2] / "samples" / "step_0002000.png").is_file()  # held-out points and samples
    out = tmp_path / "compared"
    result = cli("compare-runs", str(runs[1]), str(runs[2]), "--out", str(out))
    assert result.returncode == 0, result.stderr
    table = (out / "comparison.csv").read_text().splitlines()
    assert table[0].startswith("run,dataset,arch,prior,latent_dim") and "gaussian" in table[1]
    assert ",standard," in table[1] and ",learned," in table[2]
    sweep = (out / "kl_sweep.csv").read_text().splitlines()
    assert len(sweep) == 1 + 2 + 3  # given 0..1 for d = 1, 0..2 for d = 2
    assert (out / "kl_sweep.png").stat().st_size > 5000
    bad = cli("train", "cvae", "--dataset", "gaussian", "--prior", "flat", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "--prior must be one of learned, standard" in bad.stderr
    assert not (tmp_path / "bad").exists()
    lonely = cli("compare-runs", str(runs[1]), "--out", str(tmp_path / "lonely"))
    assert lonely.returncode == 2 and "compare at least two runs" in lonely.stderr
    assert not (tmp_path / "lonely").exists()


def test_train_cvae_on_a_csv_table(cli, tmp_path):  # noqa: F811
    table = tmp_path / "cells.csv"
    rng = np.random.default_rng(0)
    rows = [f"{a:.4f},{b:.4f},{'ab'[i % 2]}" for i, (a, b) in enumerate(rng.standard_normal((400, 2)))]
    table.write_text("area,volume,kind\n" + "\n".join(rows) + "\n")
    run = tmp_path / "run"
    result = cli("train", "cvae", "--dataset", "csv", "--csv", str(table), "--label-column", "kind", "--steps",
                 "50", "--eval-every", "50", "--out", str(run), "--device", "cpu", "--quiet")  # fmt: skip
    assert result.returncode == 0, result.stderr
    model, meta, _ = load_cvae(run)
    assert meta["class_names"] == ["a", "b"] and meta["attribute_names"] == ["area", "volume"]
    assert model.num_classes == 2 and model.num_attributes == 2
    missing = cli("train", "cvae", "--dataset", "csv", "--out", str(tmp_path / "none"))
    assert missing.returncode == 2 and "--dataset csv needs --csv FILE" in missing.stderr


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"dataset": "gaussian", "arch": "mlp", "classifier": "runs/clf"}, "--classifier judges images"),
        ({"dataset": "digits", "arch": "mlp", "classifier": "runs/clf"}, "--classifier judges images"),
        ({"dataset": "gaussian", "arch": "mlp", "label_column": "kind"}, "--label-column names a column"),
        ({"dataset": "swissroll", "arch": "mlp", "attributes": False}, "features are its conditions"),
    ],
)
def test_options_that_cannot_apply_to_vectors_are_refused(values, message):
    from core.config import build
    from training.cvae import CVAEConfig

    with pytest.raises(UserError, match=message):
        build(CVAEConfig, values).validate()
