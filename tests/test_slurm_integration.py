"""A real SLURM (Debian's slurm-wlm on this machine): a training submitted with `main.py submit` is stopped
twice, once as at a time limit (USR1 to the batch script) and once by `scontrol requeue`, and still ends
with the weights of an uninterrupted run."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, run_cli
from safetensors.torch import load_file
from slurm_cluster import Cluster, ensure_installed
from test_preemption import ONE_THREAD
from test_preemption import train_steps as _steps

TRAIN = ["train", "classifier", "--dataset", "world", "--world", "small", "--image-size", "32", "--no-amp",
         "--quiet", "--epochs", "6", "--batch-size", "8", "--num-workers", "0", "--device", "cpu",
         "--log-every", "1"]  # fmt: skip


pytestmark = pytest.mark.slow  # a real SLURM: installs and starts slurmctld/slurmd, runs jobs


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = ensure_installed()
    if reason:
        pytest.skip(f"no SLURM for the integration test: {reason}")
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        cluster.stop()
        pytest.skip(f"SLURM daemons do not start on this machine: {str(err)[:2000]}")
    yield cluster
    cluster.stop()


def _wait(condition, timeout: float, what: str, cluster: Cluster, job: str, run: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.05)
    output = "\n".join(p.read_text()[-3000:] for p in (run / "slurm").glob("*.out"))
    pytest.fail(f"timed out waiting for {what}; job: {cluster.job(job)}\n{output}\n{cluster.logs()}")


def test_requeued_job_finishes_from_its_resume_state(cluster, small_world, tmp_path):
    whole, run = tmp_path / "whole", tmp_path / "run"
    reference = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *TRAIN, "--out", str(whole)], cwd=ROOT,
                                 env={**cluster.env, **ONE_THREAD}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip

    submitted = run_cli("submit", "--gpus", "0", "--cpus", "1", "--time", "10", "--signal", "USR1@60",
                        "--", *TRAIN, "--out", str(run), env=cluster.env)  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job = re.search(r"submitted job (\d+)", submitted.stdout).group(1)
    script = (run / "slurm" / f"train-classifier-{run.name}.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@60" in script and "--resume auto" in script

    def requeued(n):  # the job restarts about cred_expire (5 s here) after the requeue
        _wait(lambda: cluster.job(job).get("Restarts") == str(n), 60, f"requeue {n}", cluster, job, run)

    # 1. as before a time limit: SLURM signals the batch script, which forwards USR1 to the training
    _wait(lambda: _steps(run) >= 10, 120, "the first training steps", cluster, job, run)
    assert cluster.call("scancel", "--batch", "--signal=USR1", job).returncode == 0
    requeued(1)
    first = torch.load(run / "last.pt", weights_only=True)
    assert 10 <= first["step"] < 48 and first["batch"] > 0, "a mid-epoch resume state"

    # 2. requeued from outside while it runs again (SIGTERM to the job step)
    _wait(lambda: _steps(run) >= first["step"] + 12, 120, "the resumed run to train", cluster, job, run)
    assert cluster.call("scontrol", "requeue", job).returncode == 0
    requeued(2)
    second = torch.load(run / "last.pt", weights_only=True)
    assert first["step"] < second["step"] < 48

    _wait(lambda: cluster.job(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 180,
          "the job to finish", cluster, job, run)  # fmt: skip
    log = "\n".join(p.read_text() for p in (run / "slurm").glob("*.out"))
    assert cluster.job(job)["JobState"] == "COMPLETED", log[-3000:]
    assert "forwarding it to the job step" in log and f"requeueing SLURM job {job}" in log
    assert yaml.safe_load((run / "run.yaml").read_text())["status"] == "finished"

    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]
    for name in ("last.safetensors", "best.safetensors"):
        a, b = load_file(str(whole / name)), load_file(str(run / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_sbatch_reads_hostile_values_as_written(cluster, tmp_path):
    """The real sbatch and slurmd take every #SBATCH line of a script whose folders hold spaces, quotes, `#`,
    `%`, `$(...)` and `hetjob` as written: one job (not a heterogeneous one) with the asked working directory,
    comment and requeue flag, whose log lands in the asked folder, and nothing in the values runs. The job's
    Python is /bin/true, so that the job ends at once."""
    odd = "a b'c\"d #e %f $(touch g) HetJob ü"
    cwd, run = tmp_path / f"cwd {odd}", tmp_path / f"run {odd}"
    cwd.mkdir()
    submitted = run_cli("submit", "--gpus", "0", "--time", "5", "--job-name", "hostile-hetjob", "--python",
                        "/bin/true", f"--sbatch=--comment={odd}", "--", "train", "classifier", "--dataset",
                        "world", "--out", str(run), env=cluster.env, cwd=cwd)  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job = re.search(r"submitted job (\d+)", submitted.stdout).group(1)
    log = run / "slurm" / f"hostile-hetjob-{job}.out"
    _wait(lambda: cluster.job(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 60,
          "the job to finish", cluster, job, run)  # fmt: skip
    shown = cluster.call("scontrol", "show", "job", job).stdout
    fields = {k: v.strip() for k, v in re.findall(r"\b(WorkDir|Comment|JobName)=(.*)$", shown, re.M)}
    assert "HetJobId" not in shown and "Requeue=1" in shown and "JobState=COMPLETED" in shown, shown
    assert fields == {"JobName": "hostile-hetjob", "WorkDir": str(cwd), "Comment": odd}, shown
    assert "the job step ended with exit status 0" in log.read_text(), sorted(run.rglob("*"))
    assert not (cwd / "g").exists() and not (tmp_path / "g").exists()
