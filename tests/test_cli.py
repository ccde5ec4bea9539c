"""The real commands, run as a user runs them: end to end on the small world, resume, and bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from typing import Annotated

import pandas as pd
import pytest
import torch
import typer
import yaml
from conftest import ROOT, assert_user_error, run_cli, snapshot
from helpers_cub import make_mini_cub
from safetensors.torch import load_file

from cli.common import OPTIM, TRAINING_OPTIONS, Shared, with_options

TRAIN = [
    "train",
    "classifier",
    "--dataset",
    "world",
    "--world",
    "small",
    "--image-size",
    "32",
    "--no-amp",
    "--quiet",
]


@pytest.fixture(scope="module")
def trained(small_world, tmp_path_factory):
    """One epoch of the tiny classifier on the small world."""
    run = tmp_path_factory.mktemp("runs") / "clf"
    result = run_cli(*TRAIN, "--epochs", "1", "--batch-size", "16", "--log-every", "1", "--out", str(run))
    assert result.returncode == 0, result.stderr
    return run


def test_help_is_fast_and_does_not_import_torch():
    code = "import sys; sys.argv=['main.py','--help']; import main\ntry:\n main.app()\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip().endswith("False"), out.stdout + out.stderr
    for command in ("train", "test", "logs", "prefetch", "demo"):
        assert command in out.stdout


@pytest.mark.slow
def test_train_test_logs_end_to_end(trained, tmp_path):
    for name in (
        "best.safetensors",
        "best.yaml",
        "last.safetensors",
        "last.pt",
        "config.yaml",
        "log.jsonl",
        "summary.json",
    ):
        assert (trained / name).is_file(), name
    assert yaml.safe_load((trained / "run.yaml").read_text())["status"] == "finished"
    events = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    val = [e for e in events if e["split"] == "val"]
    assert len(val) == 1 and val[0]["epoch"] == 1 and 0 <= val[0]["top1"] <= 1
    assert any(e["split"] == "train" and "loss" in e for e in events)

    out = tmp_path / "test"
    result = run_cli(
        "test", "classifier", "--checkpoint", str(trained), "--out", str(out), "--no-amp", "--quiet"
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    confusion = pd.read_csv(out / "confusion.csv").to_numpy()
    per_class = pd.read_csv(out / "per_class_accuracy.csv")
    assert confusion.sum() == metrics["n"] == 64  # 8 species x 8 test images
    assert metrics["top1"] == pytest.approx(confusion.trace() / confusion.sum())
    assert len(per_class) == 8 and (per_class["n"] == 8).all()
    assert metrics["top5"] >= metrics["top1"]
    assert (out / "confusion.png").stat().st_size > 1000

    result = run_cli("logs", str(trained / "log.jsonl"))
    assert result.returncode == 0, result.stderr
    summary = pd.read_csv(trained / "logs" / "summary.csv")
    top1 = summary[(summary.split == "val") & (summary.metric == "top1")]
    assert float(top1["last"].iloc[0]) == pytest.approx(val[0]["top1"])
    assert (trained / "logs" / "curves.png").is_file() and "top1" in result.stdout


def _weights(path):
    return load_file(str(path))


@pytest.mark.slow
def test_killed_and_resumed_run_matches_uninterrupted(small_world, tmp_path):
    args = [*TRAIN, "--epochs", "4", "--batch-size", "8", "--num-workers", "0", "--device", "cpu"]
    whole = tmp_path / "whole"
    assert run_cli(*args, "--out", str(whole)).returncode == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args, "--out", str(killed)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while not (killed / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    epoch = torch.load(killed / "last.pt", weights_only=True)["epoch"]
    assert epoch < 4
    result = run_cli(*args, "--out", str(killed), "--resume")
    assert result.returncode == 0, result.stderr
    a, b = _weights(whole / "last.safetensors"), _weights(killed / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    best_a, best_b = _weights(whole / "best.safetensors"), _weights(killed / "best.safetensors")
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    # the resumed log holds each event once: the same rows as the uninterrupted run's, times aside
    rows = [pd.read_json(run / "log.jsonl", lines=True).drop(columns=["time", "images_per_s"], errors="ignore")
            for run in (whole, killed)]  # fmt: skip
    assert rows[0][["step", "split", "epoch"]].equals(rows[1][["step", "split", "epoch"]])


def test_unknown_dataset_lists_choices():
    assert_user_error(run_cli("train", "classifier", "--dataset", "imagenet"), "world, cub, folder")


def test_cub_missing_offline_says_prefetch(tmp_path):
    offline = {
        "KAGGLEHUB_CACHE": str(tmp_path),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
    }
    assert_user_error(run_cli("train", "classifier", "--dataset", "cub", "--out", str(tmp_path / "r"), env=offline),
           "prefetch cub", "--data-dir")  # fmt: skip
    assert not (tmp_path / "r" / "best.safetensors").exists()


def test_dataset_folder_missing_a_file(tmp_path):
    root = make_mini_cub(tmp_path / "cub")
    (root / "classes.txt").unlink()
    assert_user_error(run_cli("train", "classifier", "--dataset", "cub", "--data-dir", str(root), "--out", str(tmp_path / "r")),
           "classes.txt")  # fmt: skip


@pytest.mark.slow
def test_truncated_image_named_then_skipped(tmp_path):
    root = make_mini_cub(tmp_path / "cub", n_per_class=8)
    bad = sorted((root / "images").rglob("*.jpg"))[0]
    bad.write_bytes(bad.read_bytes()[:64])
    args = ["train", "classifier", "--dataset", "cub", "--data-dir", str(root), "--preset", "tiny", "--epochs", "1",
            "--batch-size", "4", "--val-fraction", "0.2", "--log-every", "1", "--quiet"]  # fmt: skip
    assert_user_error(run_cli(*args, "--out", str(tmp_path / "a")), bad.name, "--skip-bad-images")
    result = run_cli(*args, "--out", str(tmp_path / "b"), "--skip-bad-images")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert (
        sum(e.get("skipped", 0) for e in events if e["split"] == "train" and "loss" in e)
        + sum(e.get("skipped", 0) for e in events if e["split"] == "val")
        == 1
    )


def test_weights_of_another_architecture_names_keys(trained, tmp_path):
    assert_user_error(run_cli(*TRAIN, "--arch", "resnet18", "--weights", str(trained / "best.safetensors"), "--out", str(tmp_path / "r")),
           "does not fit this architecture", "conv1.weight")  # fmt: skip


@pytest.mark.parametrize("option", ["--batch-size", "--epochs", "--lr"])
def test_non_positive_settings(option, tmp_path):
    assert_user_error(
        run_cli(*TRAIN, option, "0", "--out", str(tmp_path / "r")), f"{option} must be positive"
    )
    assert not (tmp_path / "r").exists()


def test_finished_run_is_not_overwritten(trained):
    before = snapshot(trained)
    assert_user_error(
        run_cli(*TRAIN, "--epochs", "1", "--out", str(trained)), "already holds a finished", "--overwrite"
    )
    assert snapshot(trained) == before


def test_resume_refuses_changed_settings(trained):
    before = snapshot(trained)
    assert_user_error(run_cli(*TRAIN, "--lr", "0.5", "--out", str(trained), "--resume"), "cannot change lr")
    assert snapshot(trained) == before


@pytest.mark.slow
def test_ddp_two_processes_gloo(small_world, tmp_path):
    """torchrun with two CPU processes: one writer, every val image counted once."""
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(ROOT / "main.py"),
           *TRAIN, "--epochs", "1", "--batch-size", "8", "--log-every", "1", "--device", "cpu", "--out", str(run)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert yaml.safe_load((run / "run.yaml").read_text())["world_size"] == 2
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in events if e["split"] == "train" and "loss" in e]
    assert steps == list(range(1, len(steps) + 1))  # one line per step: only rank 0 writes
    val = [e for e in events if e["split"] == "val"]
    assert len(val) == 1 and val[0]["n"] == 8  # the small world's val split: one image per species


def test_shared_options_take_the_place_of_their_parameter():
    """A parameter annotated `Shared` becomes the table's declaration at its own position (order kept),
    reworded by `helps`, with the parameter's default; the value reaches the function; an unknown name is
    refused when the command is declared."""
    from typer.testing import CliRunner

    app, seen = typer.Typer(add_completion=False), {}

    @app.command()
    @with_options(table=TRAINING_OPTIONS, helps={"lr": "Adam's step size."})
    def fit(
        alpha: Annotated[int, typer.Option(help="First own option.")] = 1,
        lr: Shared = 0.25,
        beta: Annotated[int, typer.Option(help="Last own option.")] = 2,
    ) -> None:
        seen.update(alpha=alpha, lr=lr, beta=beta)

    params = typer.main.get_command(app).params
    assert [p.name for p in params] == ["alpha", "lr", "beta"]
    assert (params[1].opts, params[1].help, params[1].rich_help_panel, params[1].default) == (
        ["--lr"],
        "Adam's step size.",
        OPTIM,
        0.25,
    )
    assert CliRunner().invoke(app, ["--lr", "0.5", "--beta", "3"]).exit_code == 0
    assert seen == {"alpha": 1, "lr": 0.5, "beta": 3}

    def misspelt(learning_rate: Shared = None) -> None:
        pass

    with pytest.raises(TypeError, match="no shared option 'learning_rate'"):
        with_options(table=TRAINING_OPTIONS)(misspelt)
