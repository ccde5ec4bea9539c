"""StyleGAN2 training: loss formulas against hand values, EMA and lazy-regularisation arithmetic, the Fréchet
distance, generator checkpoints, and a tiny GAN on the small world (learning, snapshots, kill-and-resume)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, assert_user_error, run_cli
from safetensors.torch import load_file
from test_gan_cli import cli  # noqa: F401  (fixture: the CLI in this process)
from test_stylegan2 import randomise_extras, tiny_generator

from core.config import build
from core.errors import UserError
from core.seeding import seed_everything
from datasets.registry import build_dataset, resolve_meta
from datasets.transforms import square_transform
from models.stylegan2.checkpoint import load_generator, save_generator
from testing.gan_metrics import feature_statistics, frechet_distance
from testing.sampling import image_grid
from training.gan import losses
from training.gan.trainer import (
    Evaluator,
    GanConfig,
    build_networks,
    new_state,
    train_step,
)
from training.lifecycle import ShuffledSteps

# ----------------------------------------------------------------------------
# Formulas.


def test_nonsaturating_losses_hand_values() -> None:
    real, fake = torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [-3.0]])
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    assert losses.g_nonsaturating(fake).item() == pytest.approx((sp(-1.0) + sp(3.0)) / 2)
    assert losses.d_logistic(real, fake).item() == pytest.approx(
        (sp(1.0) + sp(-3.0)) / 2 + (sp(0.0) + sp(-2.0)) / 2
    )
    assert losses.g_nonsaturating(torch.zeros(3, 1)).item() == pytest.approx(math.log(2))


def test_r1_is_the_sum_of_squared_input_gradients() -> None:
    x = torch.tensor([[[[1.0, -2.0]], [[0.5, 0.0]], [[3.0, 1.0]]]]).repeat(2, 1, 1, 1)
    x[1] *= 2
    x.requires_grad_(True)
    logits = x.square().sum(dim=[1, 2, 3]) + (x * 0.5).sum(dim=[1, 2, 3])  # dD/dx = 2x + 0.5
    penalty = losses.r1_penalty(x, logits)
    expected = (2 * x.detach() + 0.5).square().sum(dim=[1, 2, 3])
    torch.testing.assert_close(penalty, expected)
    assert penalty[0].item() == pytest.approx(2.5**2 + 3.5**2 + 1.5**2 + 0.5**2 + 6.5**2 + 2.5**2)
    penalty.sum().backward()  # differentiable: the penalty trains D
    assert x.grad is not None


def test_path_length_of_a_linear_map() -> None:
    torch.manual_seed(0)
    M = torch.randn(2, 4, 3 * 2 * 2)  # image = sum_l ws[:, l] @ M[l]: J^T y = M[l] @ y for every l
    ws = torch.randn(5, 2, 4, requires_grad=True)
    images = torch.einsum("nld,ldk->nk", ws, M).reshape(5, 3, 2, 2)
    torch.manual_seed(1)
    lengths = losses.path_lengths(images, ws)
    torch.manual_seed(1)
    y = torch.randn(5, 3, 2, 2).reshape(5, -1) / 2  # / sqrt(H * W)
    jty = torch.einsum("ldk,nk->nld", M, y)
    torch.testing.assert_close(lengths, jty.square().sum(2).mean(1).sqrt())
    penalty, mean = losses.path_length_penalty(lengths, torch.tensor(1.0), decay=0.25)
    assert mean.item() == pytest.approx(1 + 0.25 * (lengths.mean().item() - 1))
    torch.testing.assert_close(penalty, (lengths - mean).square())


def test_lazy_regularisation_correction() -> None:
    lr, betas = losses.lazy_regularization(0.0025, (0.0, 0.99), 16)
    assert lr == pytest.approx(0.0025 * 16 / 17)
    assert betas == (0.0, pytest.approx(0.99 ** (16 / 17)))
    assert losses.lazy_regularization(0.002, (0.5, 0.9), 4) == (pytest.approx(0.0016), (0.5**0.8, 0.9**0.8))


def test_ema_beta_and_update() -> None:
    assert losses.ema_beta(32, 10**6, 10) == pytest.approx(0.5 ** (32 / 10_000))
    assert losses.ema_beta(32, 1000, 10, rampup=0.05) == pytest.approx(
        0.5 ** (32 / 50)
    )  # ramp: 5% of 1000 images
    assert losses.ema_beta(32, 10**6, 10, rampup=0.05) == pytest.approx(0.5 ** (32 / 10_000))
    assert losses.ema_beta(8, 0, 10, rampup=0.05) == 0.0  # the first step copies G
    G, G_ema = tiny_generator(8, seed=1).train(), tiny_generator(8, seed=2)
    randomise_extras(G)
    before = {k: v.clone() for k, v in G_ema.state_dict().items()}
    losses.update_ema(G_ema, G, 0.9)
    for name, p in G.named_parameters():
        expected = p.detach() + 0.9 * (before[name] - p.detach())
        torch.testing.assert_close(G_ema.state_dict()[name], expected, rtol=1e-6, atol=1e-4)  # |p| ~ 100
    for name, b in G.named_buffers():  # w_avg and noise maps follow G exactly
        assert torch.equal(G_ema.state_dict()[name], b), name


def test_frechet_distance_known_answers() -> None:
    torch.manual_seed(0)
    a = torch.randn(6, 6, dtype=torch.float64)
    s = a @ a.T + torch.eye(6, dtype=torch.float64)
    mu = torch.randn(6, dtype=torch.float64)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0, abs=1e-9)
    # Commuting covariances S and 4S: Tr(S) + Tr(4S) - 2 Tr(2S) = Tr(S); plus |mu1 - mu2|^2.
    shift = torch.arange(6, dtype=torch.float64)
    assert frechet_distance(mu, s, mu + shift, 4 * s) == pytest.approx(s.trace().item() + 55.0)
    # Diagonal: sum (sqrt(v1) - sqrt(v2))^2, symmetric in its arguments.
    v1, v2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 0.0])
    fd = frechet_distance(torch.zeros(3), torch.diag(v1), torch.ones(3), torch.diag(v2))
    assert fd == pytest.approx(3 + 1 + 1 + 9)
    assert frechet_distance(torch.ones(3), torch.diag(v2), torch.zeros(3), torch.diag(v1)) == pytest.approx(
        fd
    )
    features = torch.randn(500, 3) * torch.tensor([1.0, 2.0, 3.0]) + 5
    mu_f, sigma_f = feature_statistics(features)
    torch.testing.assert_close(sigma_f, torch.from_numpy(np.cov(features.double().numpy(), rowvar=False)))
    assert mu_f.dtype == torch.float64


def test_step_batches_resume_where_the_step_counter_says() -> None:
    data = list(range(21))
    full = ShuffledSteps(data, 4, rank=0, world_size=1, seed=3)
    it = iter(full)
    first = [next(it) for _ in range(12)]
    per_epoch = full.per_epoch
    assert per_epoch == 5  # 21 // 4, the last partial batch dropped
    epoch0 = sum(first[:per_epoch], [])
    assert len(set(epoch0)) == 20 and all(len(b) == 4 for b in first)
    assert first[:per_epoch] != first[per_epoch : 2 * per_epoch]  # reshuffled per epoch
    resumed = iter(ShuffledSteps(data, 4, rank=0, world_size=1, seed=3, start=7))
    assert [next(resumed) for _ in range(5)] == first[7:12]
    ranks = [next(iter(ShuffledSteps(data, 2, rank=r, world_size=2, seed=3))) for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])
    with pytest.raises(UserError, match="fewer than one batch"):
        ShuffledSteps(data[:3], 4, rank=0, world_size=1, seed=0)


def test_train_step_with_path_length_and_style_mixing() -> None:
    """The `world`/`cub` recipes' extras on the tiny networks: both lazy regularisers at step 0, none at 1."""
    cfg = GanConfig.preset("tiny", {"pl_weight": 2.0, "style_mixing": 0.9, "device": "cpu"})
    state = new_state(cfg, torch.device("cpu"))
    real = torch.rand(8, 3, 32, 32) * 2 - 1
    torch.manual_seed(0)
    first = train_step(state, real, cfg, world=1, amp=False)
    assert {"pl", "r1"} <= set(first) and torch.isfinite(first["window"]).all()
    assert state.pl_mean.item() > 0 and first["pl_mean"] == state.pl_mean  # decayed mean of |J^T y|
    second = train_step(state, real, cfg, world=1, amp=False)
    assert "pl" not in second and "r1" not in second and (state.step, state.nimg) == (2, 16)
    assert all(torch.isfinite(p).all() for p in state.G.parameters())


# ----------------------------------------------------------------------------
# Generator checkpoints.


def test_generator_checkpoint_round_trip_and_checks(tmp_path) -> None:
    G = tiny_generator(16, seed=4, conv_clamp=256)
    randomise_extras(G)
    path = save_generator(tmp_path / "g.safetensors", G, {"source": "test", "kimg": 1.5})
    meta = yaml.safe_load(path.with_suffix(".yaml").read_text())
    assert meta["kind"] == "stylegan2-generator" and meta["generator"] == G.config
    assert (meta["img_resolution"], meta["num_ws"], meta["source"]) == (16, G.num_ws, "test")
    loaded, meta2 = load_generator(path, expect={"img_resolution": 16, "w_dim": 16})
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    z = torch.randn(2, 16)
    assert torch.equal(loaded(z, noise_mode="const"), G(z, noise_mode="const"))
    assert meta2["kimg"] == 1.5

    with pytest.raises(UserError, match="img_resolution is 16, expected 32"):
        load_generator(path, expect={"img_resolution": 32})
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match="G_ema.safetensors"):
        load_generator(tmp_path / "run")
    save_generator(tmp_path / "run" / "G_ema.safetensors", G)
    assert torch.equal(load_generator(tmp_path / "run")[0].mapping.w_avg, G.mapping.w_avg)

    meta["kind"] = "classifier"
    path.with_suffix(".yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(UserError, match="not a StyleGAN2 generator checkpoint.*'classifier'"):
        load_generator(path)
    meta.update(kind="stylegan2-generator", img_resolution=32)
    meta["generator"]["img_resolution"] = 32
    path.with_suffix(".yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(UserError, match="inconsistent sidecar: num_ws 6 in the sidecar vs 8"):
        load_generator(path)
    meta["num_ws"] = 8
    path.with_suffix(".yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(UserError, match="does not fit this architecture.*missing synthesis.b32"):
        load_generator(path)


# ----------------------------------------------------------------------------
# A tiny GAN on the small world (32 px): learning, snapshots, kill-and-resume equality.

TRAIN = ["train", "gan", "--dataset", "world", "--world", "small", "--preset", "tiny", "--kimg", "1.6",
         "--snapshot-kimg", "0.4", "--device", "cpu", "--num-workers", "0", "--quiet"]  # fmt: skip


# One OpenMP thread: on shared CPU cores, torch's spinning worker threads slow small networks down tenfold.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    """The in-process computations of these tests on one thread too (restored afterwards)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _events(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_run(small_world, tmp_path_factory):
    """200 steps of batch 8 (1.6 kimg) of the tiny preset on the small world."""
    run = tmp_path_factory.mktemp("gan") / "whole"
    result = run_cli(*TRAIN, "--out", str(run), env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


@pytest.mark.slow
def test_tiny_gan_learns_and_snapshots(tiny_run) -> None:
    events = _events(tiny_run)
    train = [e for e in events if e["split"] == "train"]
    val = [e for e in events if e["split"] == "val"]
    assert [e["step"] for e in train] == list(range(25, 201, 25))
    for e in train:
        assert all(math.isfinite(e[k]) for k in ("loss_G", "loss_D", "d_real", "d_fake", "r1"))
        assert e["images_per_s"] > 0 and e["kimg"] == pytest.approx(e["step"] * 8 / 1000)
    # D separates real from fake from the first logged window on.
    assert all(e["d_real"] > e["d_fake"] for e in train)
    # The metric is logged at every snapshot (every 50 steps); recomputed here, it is far from its value for
    # the untrained generator, and the saved G_ema gives exactly the logged value.
    assert [e["step"] for e in val] == [50, 100, 150, 200]
    fd = [e["fd_random_resnet18"] for e in val]
    assert all(e["fd_images"] == 64 for e in val)
    cfg = build(GanConfig, yaml.safe_load((tiny_run / "config.yaml").read_text()))
    spec = cfg.data_spec()
    dataset = build_dataset(spec, "train", train_transform=False, meta=resolve_meta(spec, quiet=True))
    dataset.transform = square_transform(cfg.data.image_size)
    evaluate = Evaluator(cfg, dataset, torch.device("cpu"), 8)
    seed_everything(cfg.seed)
    untrained = build_networks(cfg)[0].eval()
    assert evaluate(untrained)["fd_random_resnet18"] > 10 * max(fd)
    recomputed = evaluate(load_generator(tiny_run)[0])["fd_random_resnet18"]
    assert recomputed == pytest.approx(fd[-1], rel=1e-6)  # rounding: the run used another thread count
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["best"]["fd"] == pytest.approx(min(fd)) and summary["steps"] == 200
    assert yaml.safe_load((tiny_run / "run.yaml").read_text())["status"] == "finished"

    G, meta = load_generator(tiny_run)
    assert meta["source"] == "train gan" and meta["kimg"] == pytest.approx(1.6) and G.img_resolution == 32
    assert meta["metrics"]["fd_random_resnet18"] == pytest.approx(fd[-1])
    best = yaml.safe_load((tiny_run / "G_ema_best.yaml").read_text())
    assert best["metrics"]["fd_random_resnet18"] == pytest.approx(min(fd))
    state = torch.load(tiny_run / "last.pt", weights_only=True)
    assert {"G", "D", "G_ema", "opt_G", "opt_D", "pl_mean", "step", "nimg"} <= set(state)
    assert state["step"] == 200 and state["nimg"] == 1600
    for key, tensor in load_file(str(tiny_run / "G_ema.safetensors")).items():
        assert torch.equal(state["G_ema"][key], tensor), key


@pytest.mark.slow
def test_sample_grid_is_regenerated_by_generate_gan(tiny_run, tmp_path, cli) -> None:  # noqa: F811
    from PIL import Image

    info = json.loads((tiny_run / "samples" / "fakes_0000200.json").read_text())
    assert info["seeds"] == list(range(16)) and info["noise_mode"] == "const"
    out = tmp_path / "gen"
    result = cli("generate", "gan", "--checkpoint", tiny_run, "--n", "16", "--seed", "0", "--batch-size", "8",
                 "--device", "cpu", "--out", out, "--quiet")  # fmt: skip
    assert result.returncode == 0, result.stderr
    images = np.stack([np.asarray(Image.open(out / "images" / f"{i:06d}.png")) for i in range(16)])
    grid = np.asarray(Image.open(tiny_run / "samples" / "fakes_0000200.png"))
    assert np.array_equal(image_grid(images), grid)


def test_bad_training_settings(small_world, tmp_path, cli) -> None:  # noqa: F811
    assert_user_error(cli(*TRAIN, "--image-size", "48", "--out", tmp_path / "a"), "power of two", "48")
    assert_user_error(cli(*TRAIN, "--batch-size", "6", "--out", tmp_path / "b"), "multiple of --mbstd-group")
    generator = save_generator(tmp_path / "g.safetensors", tiny_generator(8))
    assert_user_error(
        cli(*TRAIN, "--metric-classifier", generator, "--out", tmp_path / "c"), "not a classifier checkpoint"
    )
    assert not any((tmp_path / name).exists() for name in "abc")


@pytest.mark.slow
def test_resume_refuses_changed_settings(tiny_run, cli) -> None:  # noqa: F811
    from conftest import snapshot

    before = snapshot(tiny_run)
    assert_user_error(cli(*TRAIN, "--lr", "0.01", "--out", tiny_run, "--resume"), "cannot change lr")
    assert snapshot(tiny_run) == before


@pytest.mark.slow
def test_ddp_two_processes_one_writer(small_world, tmp_path) -> None:
    """torchrun with two CPU processes (gloo): gradients averaged by hand, rank 0 alone writes."""
    run = tmp_path / "ddp"
    args = [a if a != "1.6" else "0.4" for a in TRAIN]  # 50 steps of 2 x 4 images
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(ROOT / "main.py"),
           *args, "--snapshot-kimg", "0.2", "--log-every", "10", "--out", str(run)]  # fmt: skip
    result = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, **ONE_THREAD}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert yaml.safe_load((run / "run.yaml").read_text())["world_size"] == 2
    train = [e for e in _events(run) if e["split"] == "train"]
    assert [e["step"] for e in train] == [10, 20, 30, 40, 50]  # one line per log step: one writer
    assert train[-1]["kimg"] == pytest.approx(0.4)  # kimg counts the images of both ranks
    assert load_generator(run)[1]["step"] == 50


def test_metric_features_from_the_projects_classifier(tmp_path) -> None:
    from core.checkpoint import save_weights
    from models.classifiers import Classifier
    from testing.gan_metrics import RANDOM_EXTRACTOR, build_extractor

    torch.manual_seed(0)
    model = Classifier("tiny", 5).eval()
    meta = {"kind": "classifier", "model": model.config, "image_size": 16}
    path = save_weights(tmp_path / "clf.safetensors", model.state_dict(), meta)
    extractor = build_extractor(path, torch.device("cpu"))
    assert extractor.name == "classifier_tiny"
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    small = torch.nn.functional.interpolate(images, size=(16, 16), mode="bilinear", antialias=True)
    with torch.no_grad():
        expected = model(small)[1][-1].mean(dim=[2, 3])  # pooled last stage at the classifier's resolution
    torch.testing.assert_close(extractor(images), expected)
    random = build_extractor(None, torch.device("cpu"))
    assert random.name == RANDOM_EXTRACTOR and random(images).shape == (3, 512)
    torch.testing.assert_close(random(images), build_extractor(None, torch.device("cpu"))(images))  # seeded


@pytest.mark.slow
def test_preempted_then_killed_run_ends_with_the_uninterrupted_weights(tiny_run, tmp_path) -> None:
    """SIGTERM (SLURM's preemption) between two steps: last.pt at that step, the run marked preempted, exit
    75. `--resume auto` continues it; SIGKILL after its next snapshot; `--resume` then ends with the weights,
    optimiser state and metric of the uninterrupted run."""
    run = tmp_path / "run"

    def start(*extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *TRAIN, "--out", str(run), *extra],
                                cwd=ROOT, env={**os.environ, **ONE_THREAD}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip

    def wait_for_snapshot(proc: subprocess.Popen, after_ns: int) -> None:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if (run / "last.pt").exists() and (run / "last.pt").stat().st_mtime_ns != after_ns:
                return
            time.sleep(0.01)

    proc = start("--resume", "auto")
    wait_for_snapshot(proc, after_ns=-1)
    time.sleep(0.5)  # a few steps past the first snapshot
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 75, err[-3000:]
    info = yaml.safe_load((run / "run.yaml").read_text())
    step = torch.load(run / "last.pt", weights_only=True)["step"]
    assert info["status"] == "preempted" and info["reason"] == f"SIGTERM at step {step}" and 50 <= step < 200

    proc = start("--resume", "auto")
    wait_for_snapshot(proc, after_ns=(run / "last.pt").stat().st_mtime_ns)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert step < torch.load(run / "last.pt", weights_only=True)["step"] < 200

    result = run_cli(*TRAIN, "--out", str(run), "--resume", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("G_ema.safetensors", "G_ema_best.safetensors"):
        a, b = load_file(str(tiny_run / name)), load_file(str(run / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    whole, resumed = (torch.load(p / "last.pt", weights_only=True) for p in (tiny_run, run))
    for key in ("G", "D"):
        assert all(torch.equal(whole[key][k], resumed[key][k]) for k in whole[key]), key
    assert whole["opt_D"]["state"][0]["exp_avg_sq"].equal(resumed["opt_D"]["state"][0]["exp_avg_sq"])
    fd = lambda run: [e["fd_random_resnet18"] for e in _events(run) if e["split"] == "val"][-1]  # noqa: E731
    assert fd(run) == fd(tiny_run)
