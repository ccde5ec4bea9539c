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


# ----- hostile values: quoted for their context or refused -----


def sbatch_reads(text: str) -> list[str]:
    """The arguments sbatch takes from a script's `#SBATCH` lines: its own reading (src/sbatch/opt.c,
    `_opt_batch_script` and `_get_argument`), ported: stop at the first line that is not a comment; per
    line, whitespace separates arguments, quotes group, a backslash takes the next character as it is, an
    unquoted `#` ends the line. A line naming `hetjob`/`packjob` anywhere would start a new job component."""
    args = []
    for line in text.split("\n"):
        if not line.startswith("#SBATCH"):
            if line.strip() and not line.lstrip().startswith("#"):
                break
            continue
        assert not re.search("hetjob|packjob", line, re.I), f"sbatch would split the job at: {line!r}"
        pos, rest = 0, line[len("#SBATCH") :]
        while True:
            while pos < len(rest) and rest[pos] in " \t\v\f\r":
                pos += 1
            if pos == len(rest):
                break
            arg, quote, escape = "", None, False
            while pos < len(rest) and (quote or rest[pos] not in " \t\v\f\r"):
                char = rest[pos]
                pos += 1
                if escape:
                    escape = False
                elif char == "\\":
                    escape = True
                    continue
                elif quote:
                    if char == quote:
                        quote = None
                        continue
                elif char in "\"'":
                    quote = char
                    continue
                elif char == "#":
                    pos = len(rest)
                    break
                arg += char
            assert quote is None, f"sbatch: unmatched quote in {line!r}"
            if arg:
                args.append(arg)
    return args


def _stub_bin(folder: Path) -> Path:
    """srun, scontrol and sbatch stand-ins: srun records the argv it gets (NUL-separated) and exits 0."""
    _fake(folder, "srun", 'printf "%s\\0" "$@" > "$BIOVIS_TEST_ARGV"')
    _fake(folder, "scontrol", 'echo "${SLURM_JOB_NODELIST:-n1}"')
    _fake(folder, "sbatch", 'cp "${@: -1}" "$BIOVIS_TEST_SCRIPT"; echo "4242;cluster"')
    return folder


def _run_script(script: Path, tmp_path: Path, bin_dir: Path) -> list[str]:
    """Run a job script under bash with the stand-ins; the argv that srun got."""
    argv, cwd = tmp_path / "argv", tmp_path / "job-cwd"
    cwd.mkdir(exist_ok=True)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "n1", "SLURM_CPUS_PER_TASK": "1", "BIOVIS_TEST_ARGV": str(argv)}  # fmt: skip
    done = subprocess.run(["bash", str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert not any(cwd.iterdir()), "the job script created files in its working directory"
    return argv.read_bytes().decode().split("\0")[:-1]


HOSTILE = {
    "command-substitution": "$(touch {mark}/a)",
    "backticks": "`touch {mark}/b`",
    "single-quotes": "'; touch {mark}/c; echo '",
    "double-quotes": '"; touch {mark}/d; echo "',
    "expansions": "${{IFS}}$((6*7))$HOME~!!*?[a]",
    "sbatch-syntax": "#SBATCH --wrap=touch {mark}/e # --requeue hetjob PackJob",
    "percent-backslash-free": "100% %j %x %%",
    "unicode": "ü🦉 ‮ spéciès ",
    "long": "/".join(["y" * 150] * 20) + "/$(touch {mark}/f)",
}


@pytest.mark.parametrize("payload", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_values_reach_the_job_as_text(payload, tmp_path, capsys, monkeypatch):
    """One hostile value in every place a user's text reaches the script (the Python path, the run folder,
    the working directory, a value of the command, an sbatch option): submitted with sbatch stubbed, the
    script's #SBATCH lines read back as sbatch reads them equal what was asked, and run under bash with
    srun and scontrol stubbed it hands srun the values unchanged and runs none of them."""
    mark = tmp_path / "marks"
    mark.mkdir()
    value = payload.format(mark=mark)
    cwd = tmp_path / "cwd" / value
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    bin_dir = _stub_bin(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("BIOVIS_TEST_SCRIPT", str(tmp_path / "submitted.sbatch"))
    run = tmp_path / "runs" / value / "run"
    python = str(tmp_path / "py" / value)
    command = [*GAN, "--world", value, "--out", str(run)]
    result = run_main(("submit", "--python", python, f"--sbatch=--comment={value}", "--job-name", "hostile",
                       "--", *command), capsys, monkeypatch)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "submitted job 4242"
    script = run / "slurm" / "hostile.sbatch"
    assert (tmp_path / "submitted.sbatch").read_bytes() == script.read_bytes()

    sbatch = sbatch_reads(script.read_text())
    log = str(run.resolve() / "slurm").replace("%", "%%") + "/%x-%j.out"
    assert sbatch == ["--job-name=hostile", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=1",
                      f"--chdir={cwd}", f"--output={log}", "--open-mode=append", "--requeue",
                      "--signal=B:USR1@120", f"--comment={value}"]  # fmt: skip

    argv = _run_script(script, tmp_path, bin_dir)
    assert argv == ["--kill-on-bad-exit=1", python, str(ROOT / "main.py"), "train", "gan", "--dataset", "world",
                    "--kimg", "5", "--world", value, "--out", str(run), "--resume", "auto"]  # fmt: skip
    assert not any(mark.iterdir()), "a value in the job script was run as a command"


def test_ready_made_scripts_keep_their_sbatch_lines(tmp_path):
    """Each shipped script as sbatch reads it, and run under bash with the stand-ins."""
    bin_dir = _stub_bin(tmp_path / "bin")
    for name, job in ready_jobs().items():
        path = ROOT / "scripts" / "slurm" / name
        read = sbatch_reads(path.read_text())
        assert read[0] == f"--job-name={job.job_name}" and "--requeue" in read, name
        assert ("--signal=B:USR1@120" in read) == job.resumable, name
        argv = _run_script(path, tmp_path, bin_dir)
        expected = ["--kill-on-bad-exit=1", "--cpus-per-task=1", ".venv/bin/python", "main.py", *job.command]
        expected += ["--out", job.run_dir.replace("{job}", "7")] if job.run_dir else []
        assert argv == expected + (["--resume", "auto"] if job.resumable else []), name


NEWLINE_OUT = "/x/run\ntouch Y #"


@pytest.mark.parametrize(
    ("options", "command", "message"),
    [
        (("--python", "/usr/bin/python\ntouch X"), GAN,
         "error: --python '/usr/bin/python\\ntouch X' holds the control character '\\n', which a job script "
         "cannot carry safely; rename it or choose another"),
        ((), [*GAN, "--out", NEWLINE_OUT],
         "error: the run directory '/x/run\\ntouch Y #' holds the control character '\\n', which a job script "
         "cannot carry safely; rename it or choose another"),
        ((), [*GAN, "--world", "small\rtouch Z"],
         "error: the command's value 'small\\rtouch Z' holds the control character '\\r', which a job script "
         "cannot carry safely; rename it or choose another"),
        (("--sbatch=--comment=a\nb",), GAN,
         "error: --sbatch '--comment=a\\nb' holds the control character '\\n', which a job script cannot carry "
         "safely; rename it or choose another"),
        (("--sbatch=--comment a100",), GAN,
         "error: --sbatch takes sbatch options like --constraint=a100, got '--comment a100'"),
        (("--sbatch=--hetjob",), GAN,
         "error: --sbatch '--hetjob': sbatch reads `hetjob` or `packjob` on an #SBATCH line as the start of "
         "another job component; submit components as separate jobs"),
        (("--job-name", "a b"), GAN, "error: --job-name 'a b' holds characters that SLURM does not take there"),
        ((), [*GAN, "--world", "x" * 131072],
         "error: the command's value is 131072 bytes long, more than 131071; shorten it"),
        ((), [*GAN, "--world", "\udcff"],
         "error: the command's value '\\udcff' is not valid UTF-8; rename it for the job script"),
        ((), [*GAN, "--out", "/x/back\\slash"],
         "error: the log folder '/x/back\\\\slash/slurm' holds a backslash, which turns SLURM's file-name "
         "patterns off; choose an --out without one"),
        (("--gpus", "99999999999999999999"), GAN, "error: --gpus must be between 0 and 64, got 99999999999999999999"),
        (("--gpus", "-1"), GAN, "error: --gpus must be between 0 and 64, got -1"),
        (("--nodes", "0"), GAN, "error: --nodes must be between 1 and 65536, got 0"),
        (("--nodes", "65537"), GAN, "error: --nodes must be between 1 and 65536, got 65537"),
        (("--cpus", "10000000000"), GAN, "error: --cpus must be between 1 and 4096, got 10000000000"),
        (("--array", "0-99999999999"), GAN,
         "error: --array takes indices like 0-3, 1,5,9, 0-15:2 or 0-15%4, each at most 4000000, got '0-99999999999'"),
        (("--array", "0-3%99999999999"), GAN,
         "error: --array takes indices like 0-3, 1,5,9, 0-15:2 or 0-15%4, each at most 4000000, got '0-3%99999999999'"),
        (("--time", "99999999999"), GAN,
         "error: --time takes MINUTES, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS up to ten years (e.g. 12:00:00), got "
         "'99999999999'"),
        (("--time", "3651-00"), GAN,
         "error: --time takes MINUTES, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS up to ten years (e.g. 12:00:00), got "
         "'3651-00'"),
        (("--mem", "99999999999999999999G"), GAN,
         "error: --mem takes a size per node like 64G or 500M, up to 1024T, got '99999999999999999999G'"),
        (("--mem", "2000T"), GAN, "error: --mem takes a size per node like 64G or 500M, up to 1024T, got '2000T'"),
    ],
    ids=["python-newline", "out-newline", "value-cr", "sbatch-newline", "sbatch-space", "sbatch-hetjob",
         "job-name", "value-too-long", "value-not-utf8", "out-backslash", "gpus-huge", "gpus-negative", "nodes-0",
         "nodes-huge", "cpus-huge", "array-huge", "array-limit-huge", "time-huge", "time-days", "mem-huge",
         "mem-over"],
)  # fmt: skip
def test_values_no_quoting_makes_safe_are_refused(options, command, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    command = [a.replace("/x/", f"{tmp_path}/x/") if a.startswith("/x/") else a for a in command]
    message = message.replace("'/x/", f"'{tmp_path}/x/")
    if "--out" not in command:
        command = [*command, "--out", str(tmp_path / "run")]
    result = run_main(("submit", "--dry-run", *options, "--", *command), capsys, monkeypatch)
    assert (result.returncode, result.stderr.strip()) == (2, message)
    assert list(tmp_path.iterdir()) == [], "a refused submit wrote something"


def test_a_working_directory_with_a_newline_is_refused(tmp_path, capsys, monkeypatch):
    cwd = tmp_path / "a\nb"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    result = run_main(
        ("submit", "--dry-run", "--", *GAN, "--out", str(tmp_path / "run")), capsys, monkeypatch
    )
    assert result.returncode == 2 and result.stderr.startswith(
        f"error: the working directory {str(cwd)!r} holds the control character '\\n'"
    ), result.stderr
    assert not (tmp_path / "run").exists()
