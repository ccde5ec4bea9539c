"""Preemption: a signal to a running training saves its resume state, marks the run and exits for requeue;
`--resume auto` continues it to the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, assert_user_error, run_cli, snapshot
from safetensors.torch import load_file

from core.preemption import EXIT_PREEMPTED, requeue, resume_command, slurm_job

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
TRAIN = ["train", "classifier", "--dataset", "world", "--world", "small", "--image-size", "32", "--no-amp",
         "--quiet", "--epochs", "3", "--batch-size", "8", "--num-workers", "0", "--device", "cpu",
         "--log-every", "1"]  # fmt: skip


def train_steps(run) -> int:
    """The last training step logged in the run (0 before the first)."""
    try:
        lines = (run / "log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(x)["step"] for x in lines if x.endswith("}") and '"train"' in x), default=0)


@pytest.fixture(scope="module")
def whole(small_world, tmp_path_factory):
    run = tmp_path_factory.mktemp("preempt") / "whole"
    result = run_cli(*TRAIN, "--out", str(run), env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    return run


@pytest.mark.slow
def test_signal_saves_mid_epoch_and_resume_auto_matches_uninterrupted(whole, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *TRAIN, "--out", str(run), "--resume", "auto"],
                            cwd=ROOT, env={**os.environ, **ONE_THREAD}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    deadline = time.time() + 120
    while train_steps(run) < 10 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err
    info = yaml.safe_load((run / "run.yaml").read_text())
    state = torch.load(run / "last.pt", weights_only=True)
    assert info["status"] == "preempted" and "SIGUSR1" in info["reason"]
    assert state["batch"] > 0 and state["step"] >= 10, "a resume state written between two steps of an epoch"
    assert "not under SLURM; continue with: python main.py train classifier" in err and "--resume" in err

    result = run_cli(*TRAIN, "--out", str(run), "--resume", "auto", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load((run / "run.yaml").read_text())["status"] == "finished"
    for name in ("last.safetensors", "best.safetensors"):
        a, b = load_file(str(whole / name)), load_file(str(run / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    steps = [
        e["step"]
        for e in map(json.loads, (run / "log.jsonl").read_text().splitlines())
        if e["split"] == "train" and "loss" in e
    ]
    assert steps == sorted(set(steps)), "each step logged once"
    logs = [[{k: v for k, v in e.items() if k not in ("time", "images_per_s")}
             for e in map(json.loads, (r / "log.jsonl").read_text().splitlines())] for r in (whole, run)]  # fmt: skip
    assert logs[0] == logs[1], "the resumed run logs the uninterrupted run's values (sums saved mid-epoch)"


@pytest.mark.slow
def test_resume_auto_starts_a_new_run_and_refuses_overwrite(whole, tmp_path):
    before = snapshot(whole)
    assert_user_error(run_cli(*TRAIN, "--out", str(whole), "--resume", "auto", "--overwrite"),
                      "--overwrite and --resume auto")  # fmt: skip
    assert snapshot(whole) == before
    # a finished run is continued (nothing left to do), never replaced
    result = run_cli(*TRAIN, "--out", str(whole), "--resume", "auto", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    for name in ("last.safetensors", "best.safetensors", "last.pt"):
        assert (whole / name).read_bytes() == before[name], name
    # a folder with only a SLURM job's files is a new run
    fresh = tmp_path / "fresh"
    (fresh / "slurm").mkdir(parents=True)
    (fresh / "slurm" / "job.sbatch").write_text("#!/bin/bash\n")
    result = run_cli(*TRAIN, "--epochs", "1", "--out", str(fresh), "--resume", "auto", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    assert (fresh / "last.safetensors").is_file() and (fresh / "slurm" / "job.sbatch").is_file()


def test_slurm_job_ids_and_the_requeue_call(tmp_path, monkeypatch):
    assert slurm_job({}) is None
    assert slurm_job({"SLURM_JOB_ID": "77"}) == "77"
    assert slurm_job({"SLURM_JOB_ID": "78", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "3"}) == "70_3"
    assert resume_command(["main.py", "train", "gan", "--overwrite"], tmp_path / "r") == (
        f"python main.py train gan --resume --out {tmp_path / 'r'}"
    )
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    said = []
    assert requeue(
        tmp_path, {"SLURM_JOB_ID": "78", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "3"}, said.append
    )
    assert calls.read_text() == "requeue 70_3\n" and said == [
        f"requeueing SLURM job 70_3; it continues from {tmp_path} (--resume auto)"
    ]
    fake.write_text("#!/bin/sh\necho 'Invalid job id specified' >&2\nexit 1\n")
    said.clear()
    assert not requeue(tmp_path, {"SLURM_JOB_ID": "79"}, said.append)
    assert (
        len(said) == 2
        and "`scontrol requeue 79` failed (Invalid job id specified); continue with: python" in said[1]
    )
    said.clear()
    assert not requeue(tmp_path, {}, said.append) and said[0].startswith(
        "not under SLURM; continue with: python"
    )


def _children(pid: int) -> list[int]:
    kids = []
    for stat_file in os.listdir("/proc"):
        if stat_file.isdigit():
            try:
                fields = Path(f"/proc/{stat_file}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(stat_file))
    return sorted(kids)


@pytest.mark.slow
def test_ddp_ranks_stop_at_the_same_step_and_resume(small_world, tmp_path):
    """Two gloo ranks under torchrun: a signal to one rank stops both after the same step (they agree every
    10 steps); `--resume auto` under torchrun then finishes the run."""
    run = tmp_path / "ddp"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(ROOT / "main.py"),
            *TRAIN, "--batch-size", "4", "--epochs", "2", "--out", str(run), "--resume", "auto"]  # fmt: skip
    launcher = subprocess.Popen(args, cwd=ROOT, env={**os.environ, **ONE_THREAD}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 180
    while train_steps(run) < 3 and time.time() < deadline and launcher.poll() is None:
        time.sleep(0.01)
    ranks = _children(launcher.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[-1], signal.SIGUSR1)
    _, err = launcher.communicate(timeout=180)
    assert "exitcode  : 75" in err and "exitcode  : 1" not in err, err[-3000:]
    info = yaml.safe_load((run / "run.yaml").read_text())
    step = torch.load(run / "last.pt", weights_only=True)["step"]
    assert info["status"] == "preempted" and info["reason"].endswith(f"at step {step}") and step % 10 == 0
    done = subprocess.run(args, cwd=ROOT, env={**os.environ, **ONE_THREAD}, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert yaml.safe_load((run / "run.yaml").read_text())["status"] == "finished"
