"""Conditional VAEs: the ELBO's terms by hand, the condition layout, conditional samples recognised by the world's
classifier, the digits MLP reproducing given pixels, exact resume, and bad input as a user runs it."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import ROOT, assert_user_error, run_cli, snapshot
from helpers_generate import classifier as tiny_classifier
from helpers_generate import cvae as tiny_cvae
from test_gan_cli import cli  # noqa: F401  (the in-process CLI fixture)
from test_gan_training import ONE_THREAD, one_thread  # noqa: F401  (autouse: small networks on one thread)

from core.rundir import prepare_run_dir
from models.classifiers import load_classifier
from models.cvae import CVAE, condition_vector, elbo_terms, gaussian_kl, load_cvae
from testing.cvae import class_attributes, recognition
from training.cvae import CVAEConfig, build_data, condition_masks, train_cvae

# ------------------------------------------------------------------------------------------- the ELBO


def test_kl_by_hand():
    mu = torch.tensor([[0.0, 1.0, -2.0]])
    logvar = torch.tensor([[0.0, math.log(4.0), math.log(0.25)]])
    # 0.5 (mu^2 + s^2 - log s^2 - 1) per dimension
    expected = [0.0, 0.5 * (1 + 4 - math.log(4) - 1), 0.5 * (4 + 0.25 - math.log(0.25) - 1)]
    assert gaussian_kl(mu, logvar)[0].tolist() == pytest.approx(expected)
    # to another Gaussian, N(1, 4): 0.5 (log 4 - logvar + (e^logvar + (mu - 1)^2) / 4 - 1)
    prior_mu, prior_logvar = torch.ones(1, 3), torch.full((1, 3), math.log(4.0))
    expected = [
        0.5 * (math.log(4) + (1 + 1) / 4 - 1),
        0.5 * (0.0 + 4 / 4 - 1),
        0.5 * (math.log(16) + (0.25 + 9) / 4 - 1),
    ]
    assert gaussian_kl(mu, logvar, prior_mu, prior_logvar)[0].tolist() == pytest.approx(expected)


def test_elbo_terms_by_hand():
    x = torch.tensor([[[[0.5, -0.5]]], [[[1.0, 0.0]]]])  # two samples of 2 values
    recon = torch.tensor([[[[0.3, -0.5]]], [[[0.0, 0.0]]]])
    mu = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    logvar = torch.zeros(2, 2)
    sigma, beta = 0.5, 2.0
    terms = elbo_terms(x, recon, mu, logvar, beta=beta, sigma=sigma)
    constant = 2 * (math.log(sigma) + 0.5 * math.log(2 * math.pi))
    rec = [0.5 * 0.2**2 / sigma**2 + constant, 0.5 * 1.0 / sigma**2 + constant]
    assert terms["rec"].tolist() == pytest.approx(rec)
    normal = torch.distributions.Normal(recon, sigma)  # the same as a log-likelihood
    assert terms["rec"].tolist() == pytest.approx((-normal.log_prob(x)).flatten(1).sum(1).tolist())
    assert terms["kl"].tolist() == pytest.approx([0.5, 0.0])
    assert terms["kl_per_dim"].tolist() == pytest.approx([0.0, 0.25])
    assert terms["loss"].item() == pytest.approx((rec[0] + beta * 0.5 + rec[1]) / 2)
    shifted = elbo_terms(x, recon, mu, logvar, sigma=sigma, prior=(torch.ones(2, 2), torch.zeros(2, 2)))
    assert shifted["kl"].tolist() == pytest.approx([0.5, 1.0])  # 0.5 (mu - 1)^2 summed over dimensions


def test_condition_layout_values_and_indicators():
    c = condition_vector(
        3,
        torch.tensor([2, 1]),
        torch.tensor([1.0, 0.0]),
        torch.tensor([[1.0, 0.0], [1.0, 1.0]]),
        torch.tensor([[1.0, 1.0], [0.0, 1.0]]),
        2,
        2,
    )
    # [one-hot * present (3), present (1), value * given (2), given (2)]
    assert c.tolist() == [[0, 0, 1, 1, 1, 0, 1, 1], [0, 0, 0, 0, 0, 1, 0, 1]]
    none = condition_vector(3, None, None, None, None, 2, 2)
    assert none.shape == (2, 8) and none.abs().sum() == 0


def test_training_draws_every_kind_of_condition_set():
    torch.manual_seed(0)
    labels, attributes = torch.zeros(4000, dtype=torch.long), torch.ones(4000, 10)
    cfg = CVAEConfig(p_class=0.9, p_attrs_none=0.3, p_attrs_all=0.3)
    label_present, present = condition_masks(labels, attributes, cfg)
    given = present.sum(1)
    assert label_present.mean().item() == pytest.approx(0.9, abs=0.03)
    assert (given == 0).float().mean().item() == pytest.approx(0.3 + 0.4 / 11, abs=0.03)
    assert (given == 10).float().mean().item() == pytest.approx(0.3 + 0.4 / 11, abs=0.03)
    assert ((given > 0) & (given < 10)).float().mean().item() > 0.3  # partial sets too


# --------------------------------------------------------------------------------------- trained models


@pytest.fixture(scope="module")
def trained(small_world, tmp_path_factory):
    root = tmp_path_factory.getbasetemp()
    return tiny_cvae(root), tiny_classifier(root)


def test_conditional_samples_are_recognised_by_the_worlds_classifier(trained):
    run, classifier_run = trained
    model, meta, _ = load_cvae(run)
    classifier, clf_meta = load_classifier(classifier_run)
    data = build_data(CVAEConfig.preset("tiny", meta["config"]), quiet=True)
    labels = [data.val[i]["label"] for i in range(len(data.val))]
    attributes = torch.stack([torch.as_tensor(data.val[i]["attributes"]) for i in range(len(data.val))])
    per_class = class_attributes(torch.tensor(labels).numpy(), attributes.numpy(), model.num_classes)
    result = recognition(model, classifier, per_class, 10, seed=7, classifier_size=clf_meta["image_size"])
    assert result["chance"] == 1 / 8
    assert result["all"] >= 0.5, result  # class and every attribute given: 4x chance or better
    assert result["class"] >= 3 * result["chance"], result  # the class alone
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    val = [e for e in logged if e["split"] == "val"][-1]
    assert len(val["kl_per_dim_class"]) == model.latent_dim
    assert val["all_neg_elbo"] < val["none_neg_elbo"]  # given conditions explain the held-out images better
    table = (run / "kl_per_dim.csv").read_text().splitlines()
    assert table[0] == "dimension,kl_none,kl_class,kl_all" and len(table) == model.latent_dim + 1
    assert (run / "kl_per_dim.png").stat().st_size > 5000


def test_digits_mlp_reproduces_the_pixels_it_is_given(tmp_path):
    cfg = CVAEConfig.preset("digits", {"steps": 400, "eval_every": 400, "device": "cpu",
                            "amp": False, "latent_dim": 4})  # fmt: skip
    run = prepare_run_dir(tmp_path / "digits", "train cvae")
    train_cvae(cfg, run, quiet=True)
    model, meta, _ = load_cvae(run)
    assert meta["attribute_names"][0] == "pixel_0_0" and meta["value_range"] == [0.0, 1.0]
    data = build_data(cfg, quiet=True)
    x = torch.as_tensor(data.val.x[:64])
    labels = torch.as_tensor(data.val.labels[:64])
    eps = torch.randn(64, model.latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        given, class_only = (
            model.decode(model.prior_latent(c, eps), c).flatten(1)
            for c in (model.conditions(64, labels=labels, attributes=x), model.conditions(64, labels=labels))
        )
    error_given, error_class = (given - x).square().mean().item(), (class_only - x).square().mean().item()
    assert error_given < 0.5 * error_class, (error_given, error_class)


def test_resume_reaches_the_same_weights(tmp_path):
    overrides = {
        "steps": 12,
        "eval_every": 6,
        "log_every": 3,
        "device": "cpu",
        "amp": False,
        "batch_size": 32,
    }
    straight = prepare_run_dir(tmp_path / "straight", "train cvae")
    train_cvae(CVAEConfig.preset("digits", overrides), straight, quiet=True)
    halves = prepare_run_dir(tmp_path / "halves", "train cvae")
    train_cvae(CVAEConfig.preset("digits", {**overrides, "steps": 6}), halves, quiet=True)
    train_cvae(CVAEConfig.preset("digits", overrides), halves, resume=True, quiet=True)
    a, b = (load_cvae(run)[0].state_dict() for run in (straight, halves))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigterm_saves_and_resume_auto_matches_uninterrupted(tmp_path):
    """SLURM's preemption signal between two steps: last.pt at that step, the run marked preempted, exit 75;
    `--resume auto` then ends with the weights of an uninterrupted run."""
    args = ["train", "cvae", "--dataset", "digits", "--steps", "200", "--eval-every", "50", "--device", "cpu"]
    run = tmp_path / "run"
    command = [sys.executable, str(ROOT / "main.py"), *args, "--out", str(run), "--resume", "auto", "--quiet"]
    proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **ONE_THREAD}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 240
    while not (run / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 75, err[-3000:]
    step = torch.load(run / "last.pt", weights_only=True)["step"]
    info = yaml.safe_load((run / "run.yaml").read_text())
    assert info["status"] == "preempted" and info["reason"] == f"SIGTERM at step {step}" and 50 <= step < 200
    result = run_cli(*args, "--out", str(run), "--resume", "auto", "--quiet", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    whole = prepare_run_dir(tmp_path / "whole", "train cvae")
    train_cvae(CVAEConfig.preset("digits", {"steps": 200, "eval_every": 50, "device": "cpu"}),
                                 whole, quiet=True)  # fmt: skip
    a, b = (load_cvae(r)[0].state_dict() for r in (whole, run))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------- bad input


def test_cvae_bad_input(trained, cli, tmp_path):  # noqa: F811
    run, classifier_run = trained
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "mine.txt").write_text("data")
    before = snapshot(keep)
    base = ("generate", "cvae", "--checkpoint", str(run), "--out", str(keep), "--device", "cpu")
    model, meta, _ = load_cvae(run)
    name = meta["class_names"][3]
    assert_user_error(cli(*base, "--class", name[:-1] + "q"), "unknown class", f"closest: '{name}'")
    assert_user_error(
        cli(*base, "--attr", "has_crest::maybe=1"), "unknown attribute", "closest: 'has_crest::"
    )
    assert_user_error(cli(*base, "--attrs", "1,0,?"), "--attrs has 3 values", "41 attributes")
    assert_user_error(cli(*base, "--attr", "has_crest::yes=high"), "is not a number")
    weights = str(classifier_run / "best.safetensors")
    assert_user_error(cli(*base[:3], weights, *base[4:]), "not a CVAE or Phylo-NN checkpoint", "'classifier'")
    assert_user_error(cli("train", "cvae", "--dataset", "digits", "--arch", "conv", "--out", str(keep)),
                      "use --arch mlp")  # fmt: skip
    assert snapshot(keep) == before
    assert isinstance(model, CVAE)
