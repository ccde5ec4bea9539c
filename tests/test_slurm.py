"""`submit` and the sbatch scripts: launch lines for 1 GPU, 4 GPUs, 2 nodes x 4 GPUs and arrays, `bash -n`,
signal forwarding in the script, job-id parsing, refusals; the ready-made scripts are current; rank layout."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, assert_user_error, run_cli, run_main

from core.distributed import dist_env
from core.slurm import SlurmJob, render

sys.path.insert(0, str(ROOT / "scripts" / "slurm"))
from make_scripts import ready_jobs  # noqa: E402

GAN = ["train", "gan", "--dataset", "world", "--kimg", "5"]


def _submit(capsys, monkeypatch, *options: str, command=GAN) -> tuple[str, Path]:
    result = run_main(("submit", "--dry-run", *options, "--", *command), capsys, monkeypatch)
    assert result.returncode == 0, result.stderr
    script = Path(re.search(r"# written to (\S+);", result.stdout).group(1))
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert script.read_text() in result.stdout
    return script.read_text(), script


def _sbatch(text: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=?(.*)$", text, re.M))


@pytest.mark.parametrize(
    ("options", "nodes", "gpus"),
    [((), 1, 1), (("--gpus", "4"), 1, 4), (("--nodes", "2", "--gpus", "4", "--cpus", "8"), 2, 4)],
    ids=["1gpu", "4gpus", "2nodes-4gpus"],
)
def test_rendered_launch(options, nodes, gpus, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    text, script = _submit(capsys, monkeypatch, *options, command=[*GAN, "--out", str(run)])
    header = _sbatch(text)
    assert script == run / "slurm" / "train-gan-run.sbatch"
    assert (header["nodes"], header["ntasks-per-node"], header["gpus-per-node"]) == (
        str(nodes),
        str(gpus),
        str(gpus),
    )
    assert header["signal"] == "B:USR1@120" and "requeue" in header and header["open-mode"] == "append"
    assert header["output"] == str(run / "slurm" / "%x-%j.out") and header["chdir"] == str(ROOT)
    assert f"RUN_DIR={run}" in text
    launch = re.search(r"^srun .*?&$", text, re.M | re.S).group(0)
    assert (
        launch.startswith("srun --kill-on-bad-exit=1") and f'"$PYTHON" {ROOT / "main.py"} train gan' in launch
    )
    assert launch.count("--out") == 1 and '--out "$RUN_DIR"' in launch and "--resume auto" in launch
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST"' in text
    assert "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))" in text
    assert ("--cpus-per-task" in launch) == ("--cpus" in options)
    assert "trap 'forward USR1' USR1" in text and "trap 'forward TERM' TERM" in text


def test_rendered_array_gives_each_task_its_run(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    text, script = _submit(capsys, monkeypatch, "--array", "0-3%2", "--gpus", "2",
                           command=["train", "classifier", "--seed", "{task}", "--name", "seeds"])  # fmt: skip
    header = _sbatch(text)
    assert header["array"] == "0-3%2" and header["ntasks-per-node"] == header["gpus-per-node"] == "2"
    assert (
        script.resolve()
        == tmp_path / "runs" / "train-classifier" / "seeds" / "slurm" / "train-classifier-seeds.sbatch"
    )
    assert header["output"].endswith("seeds/slurm/%x-%A_%a.out")
    assert 'RUN_DIR=runs/train-classifier/seeds/task-"${SLURM_ARRAY_TASK_ID}"' in text
    assert '--seed "${SLURM_ARRAY_TASK_ID}"' in text and "--name" not in text


def test_non_resumable_command_restarts_with_overwrite(capsys, monkeypatch, tmp_path):
    text, script = _submit(
        capsys, monkeypatch, command=["vdna", "make", "world:small:test", "--out", str(tmp_path / "v")]
    )
    assert script.parent == tmp_path / "slurm" and "signal" not in _sbatch(text)
    assert "${SLURM_RESTART_COUNT:+--overwrite}" in text and "--resume" not in text


def test_refusals(tmp_path, capsys, monkeypatch):
    def refused(*args: str, fragment: str) -> None:
        result = run_main(("submit", "--dry-run", *args), capsys, monkeypatch)
        assert result.returncode == 2 and fragment in result.stderr, result.stderr

    refused("--", *GAN, "--overwrite", "--out", str(tmp_path / "a"), fragment="wipe its own progress")
    refused("--signal", "KILL@10", "--", *GAN, "--out", str(tmp_path / "b"), fragment="--signal")
    refused("--array", "0-3;rm", "--", *GAN, "--out", str(tmp_path / "c"), fragment="--array")
    refused("--", "train", "nothing", fragment="not a main.py command")
    refused("--", *GAN, "--bogus", fragment="--bogus")
    assert not any((tmp_path / n).exists() for n in "abc")


def _fake(folder: Path, name: str, body: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(f"#!/bin/bash\n{body}\n")
    (folder / name).chmod(0o755 | stat.S_IEXEC)


def test_submit_prints_the_job_id(tmp_path):
    _fake(tmp_path / "bin", "sbatch", 'echo "4242;cluster"')
    env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    result = run_cli("submit", "--", *GAN, "--out", str(tmp_path / "r"), env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "submitted job 4242"
    _fake(tmp_path / "bin", "sbatch", 'echo "sbatch: error: Invalid partition name specified" >&2; exit 1')
    assert_user_error(run_cli("submit", "--partition", "nope", "--", *GAN, "--out", str(tmp_path / "r"), env=env),
                      "sbatch refused", "Invalid partition")  # fmt: skip


def test_script_forwards_the_signal_to_the_step(tmp_path):
    """The batch script under bash with stand-ins for srun and the training: USR1 to the script reaches the
    training, and the script ends with the training's exit status."""
    bin_dir = tmp_path / "bin"
    _fake(bin_dir, "srun", 'while [[ "$1" == --* ]]; do shift; done; exec "$@"')
    _fake(bin_dir, "scontrol", "exit 1")
    got = tmp_path / "got"
    _fake(bin_dir, "train", f"trap 'echo USR1 > {got}; exit 75' USR1; touch {tmp_path}/ready; "
          "while :; do sleep 0.05; done")  # fmt: skip
    job = SlurmJob(["train", "x"], str(tmp_path / "run"), "t", gpus=0, python=str(bin_dir / "train"))
    script = tmp_path / "job.sbatch"
    script.write_text(render(job))
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NODELIST": "n1",
    }
    proc = subprocess.Popen(["bash", str(script)], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (tmp_path / "ready").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=30)
    assert got.read_text() == "USR1\n" and proc.returncode == 75, err
    assert "SIGUSR1 received, forwarding it to the job step" in err


def test_ready_made_scripts_are_current():
    jobs = ready_jobs()
    assert set(jobs) == {p.name for p in (ROOT / "scripts" / "slurm").glob("*.sbatch")}
    for name, job in jobs.items():
        path = ROOT / "scripts" / "slurm" / name
        assert path.read_text() == render(job), f"{name}: run python scripts/slurm/make_scripts.py"
        assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0, name
        header = _sbatch(path.read_text())
        assert header["ntasks-per-node"] == header["gpus-per-node"]
        assert ("signal" in header) == name.startswith("train_")


def test_rank_layout_from_torchrun_and_srun():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "99",
           "SLURM_JOB_NODELIST": "node[3,5-6]", "PATH": ""}  # fmt: skip
    layout = dist_env(env)
    assert (layout.rank, layout.world_size, layout.local_rank, layout.is_main) == (5, 8, 1, False)
    assert env["MASTER_ADDR"] == "node3" and env["MASTER_PORT"] == "20099"
    # torchrun inside an allocation: its variables win over SLURM's
    both = {**env, "RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2"}
    assert (dist_env(both).rank, dist_env(both).world_size, dist_env(both).launcher) == (2, 4, "torchrun")
