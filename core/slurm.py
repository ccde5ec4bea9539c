"""SLURM batch scripts around a `main.py` command: render a readable sbatch script, and submit it.

The launch is one task per GPU by `srun` (`--ntasks-per-node` = `--gpus-per-node`, so ranks and GPUs never
mismatch; each task takes its rank from SLURM_PROCID and its GPU from SLURM_LOCALID, core.distributed), with
the rendezvous on the allocation's first node. Resumable commands ask SLURM for a signal before the time
limit (`--signal=B:USR1@<seconds>`); the script traps it (and SIGTERM) and forwards it to the job step,
where the trainer saves, marks its run `preempted` and requeues the job (core.preemption). The requeued job
runs the same script: `--resume auto` continues the run. Array tasks each get their own run directory.

In `run_dir` and in the command's arguments, `{job}` stands for the job id (the array's, for an array) and
`{task}` for the array task id: they become shell variables in the script.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass, field

from core.errors import UserError

SIGNALS = ("USR1", "TERM")  # what core.preemption catches
DEFAULT_SIGNAL = "USR1@120"
PLACEHOLDERS = {"{job}": "${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}", "{task}": "${SLURM_ARRAY_TASK_ID}"}
_SAFE_VALUE = re.compile(r"[A-Za-z0-9_.,:%@=+/\-\[\]]+")


@dataclass
class SlurmJob:
    command: list[str]  # main.py's arguments, e.g. ["train", "gan", "--dataset", "cub"]
    run_dir: str | None  # the command's --out (given to it as "$RUN_DIR"); None: the command has no run dir
    job_name: str
    description: str = ""
    nodes: int = 1
    gpus: int = 1  # per node; 0 for a CPU job (one task per node)
    cpus: int | None = None  # per task
    mem: str | None = None  # per node, e.g. 64G
    time: str | None = None  # e.g. 12:00:00 or 2-00:00:00
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    array: str | None = None  # e.g. 0-3, 1,5,9 or 0-15%4
    signal: str = DEFAULT_SIGNAL  # [SIG@]SECONDS before the time limit
    resumable: bool = True  # the command continues a run: signal, requeue and --resume auto
    output: str = "%x-%A_%a.out"
    python: str = ".venv/bin/python"  # $BIOVIS_PYTHON overrides it when the job runs
    main: str = "main.py"
    workdir: str | None = None  # None: where sbatch was called
    restart_overwrite: bool = False  # a requeued run of a non-resumable command replaces its partial output
    extra: list[str] = field(default_factory=list)  # more sbatch options, e.g. ["--constraint=a100"]


def parse_signal(value: str) -> tuple[str, int]:
    """`USR1@120`, `TERM@60` or `300` (USR1) -> (signal name, seconds before the time limit)."""
    name, _, seconds = value.upper().removeprefix("SIG").rpartition("@")
    name = name.removeprefix("B:").removeprefix("SIG") or "USR1"
    if name not in SIGNALS or not seconds.isdigit() or not 0 < int(seconds) <= 65535:
        raise UserError(
            f"--signal must be SECONDS or SIG@SECONDS with SIG one of {', '.join(SIGNALS)} "
            f"(e.g. USR1@120), got {value!r}"
        )
    return name, int(seconds)


# sbatch --time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (or UNLIMITED)
_TIME = re.compile(r"UNLIMITED|\d+(:[0-5]?\d){0,2}|\d+-\d{1,2}(:[0-5]?\d){0,2}")


def _valid_array(spec: str) -> bool:
    """sbatch --array: comma-separated N or A-B[:STEP] with A <= B, then an optional %MAX_RUNNING."""
    indices, _, limit = spec.partition("%")
    if limit and not (limit.isdigit() and int(limit) > 0):
        return False
    for part in indices.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part)
        if not match:
            return False
        first, last, step = match.groups()
        if (last is not None and int(last) < int(first)) or (step is not None and int(step) < 1):
            return False
    return True


def _check(job: SlurmJob) -> None:
    if job.nodes < 1 or job.gpus < 0 or (job.cpus is not None and job.cpus < 1):
        raise UserError("--nodes and --cpus must be at least 1, --gpus at least 0")
    named = {"--partition": job.partition, "--account": job.account, "--qos": job.qos, "--mem": job.mem,
             "--time": job.time, "--array": job.array, "--job-name": job.job_name}  # fmt: skip
    for option, value in named.items():
        if value is not None and not _SAFE_VALUE.fullmatch(value):
            raise UserError(f"{option} {value!r} holds characters that SLURM does not take there")
    if job.array is not None and not _valid_array(job.array):
        raise UserError(f"--array takes indices like 0-3, 1,5,9, 0-15:2 or 0-15%4, got {job.array!r}")
    if job.time is not None and not _TIME.fullmatch(job.time):
        raise UserError(
            f"--time takes MINUTES, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (e.g. 12:00:00), got {job.time!r}"
        )
    if job.mem is not None and not re.fullmatch(r"[1-9][0-9]*[KMGT]?", job.mem):
        raise UserError(f"--mem takes a size per node like 64G or 500M, got {job.mem!r}")
    for option in job.extra:
        if not option.startswith("--") or "\n" in option:
            raise UserError(f"--sbatch takes sbatch options like --constraint=a100, got {option!r}")
    parse_signal(job.signal)


def shell_word(text: str) -> str:
    """`text` quoted for bash, with `{job}` and `{task}` turned into the job's variables."""
    pieces = re.split(r"(\{job\}|\{task\})", text)
    quoted = "".join(
        f'"{PLACEHOLDERS[p]}"' if p in PLACEHOLDERS else shlex.quote(p) if p else "" for p in pieces
    )
    return quoted or "''"


def _command_lines(prefix: list[str], args: list[str]) -> str:
    """The launch line, continued before each option of the command."""
    groups = [list(prefix)]
    for word in args:
        if word.startswith("-") and len(groups[-1]) > (len(prefix) if len(groups) == 1 else 0):
            groups.append([])
        groups[-1].append(word)
    return " \\\n    ".join(" ".join(group) for group in groups)


def render(job: SlurmJob) -> str:
    """The sbatch script of `job`: #SBATCH header, environment, signal forwarding, the srun launch."""
    _check(job)
    sig, seconds = parse_signal(job.signal)
    tasks = max(job.gpus, 1)
    header = [("job-name", job.job_name), ("nodes", job.nodes), ("ntasks-per-node", tasks)]
    header += [("gpus-per-node", job.gpus)] if job.gpus else []
    optional = {"cpus-per-task": job.cpus, "mem": job.mem, "time": job.time, "partition": job.partition,
                "account": job.account, "qos": job.qos, "array": job.array, "chdir": job.workdir}  # fmt: skip
    header += [(k, v) for k, v in optional.items() if v is not None]
    header += [("output", job.output), ("open-mode", "append"), ("requeue", None)]
    if job.resumable:
        header.append(("signal", f"B:{sig}@{seconds}"))
    lines = ["#!/bin/bash"]
    lines += [f"# {line}" for line in job.description.splitlines()]
    lines += [f"#SBATCH --{k}" if v is None else f"#SBATCH --{k}={v}" for k, v in header]
    lines += [f"#SBATCH {option}" for option in job.extra]

    world = "one task" if tasks * job.nodes == 1 else f"{job.nodes} x {tasks} = {job.nodes * tasks} tasks"
    run_dir = job.run_dir
    if run_dir is not None and job.array is not None:
        run_dir = f"{run_dir}/task-{{task}}"
    args = [shell_word(a) for a in job.command]
    if run_dir is not None:
        args += ["--out", '"$RUN_DIR"']
    if job.resumable:
        args += ["--resume", "auto"]
    if job.restart_overwrite:
        args.append("${SLURM_RESTART_COUNT:+--overwrite}")
    srun = ["srun", "--kill-on-bad-exit=1"]
    if job.cpus is not None:
        srun.append('--cpus-per-task="$SLURM_CPUS_PER_TASK"')  # srun does not inherit it from sbatch
    launch = _command_lines([*srun, '"$PYTHON"', shell_word(job.main)], args)

    body = ["", "set -uo pipefail", f'PYTHON="${{BIOVIS_PYTHON:-{job.python}}}"']
    if run_dir is not None:
        body.append(f"RUN_DIR={shell_word(run_dir)}")
    body += [
        "# DDP rendezvous: the allocation's first node, a port derived from the job id (as core.distributed).",
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1)',
        'export MASTER_ADDR="${MASTER_ADDR:-$(hostname)}"',
        "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
        'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"',
        "",
    ]
    if job.resumable:
        body += [
            f"# SLURM sends {sig} to this script {seconds} s before the time limit, and TERM when it preempts",
            "# the job: forward both to the job step. The training then saves its resume state, marks its run",
            "# `preempted` and requeues this job, which continues the run (--resume auto) when it starts again.",
        ]
    else:
        body.append("# A requeued job (preemption, node failure) starts this command again.")
    body += [
        'STEP=""',
        'forward() { echo "biovis: SIG$1 received, forwarding it to the job step" >&2; '
        '[ -n "$STEP" ] && kill -s "$1" "$STEP" 2>/dev/null; }',
        *(f"trap 'forward {s}' {s}" for s in dict.fromkeys([sig, "TERM"])),
        "",
        f"# One task per {'GPU' if job.gpus else 'node'} ({world}); each takes its rank from SLURM_PROCID.",
        launch + " &",
        "STEP=$!",
        "while :; do",
        '    wait "$STEP"; status=$?',
        '    kill -0 "$STEP" 2>/dev/null || break  # wait returned for a trapped signal: the step still runs',
        "done",
        'echo "biovis: the job step ended with exit status $status" >&2',
        'exit "$status"',
        "",
    ]
    return "\n".join(lines + body)


def submit(script: str, sbatch: str = "sbatch") -> str:
    """Submit a written script with sbatch; the job id."""
    try:
        done = subprocess.run([sbatch, "--parsable", script], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise UserError(
            f"{sbatch} not found: submit from a SLURM login node, or use --dry-run and sbatch {script} there"
        ) from None
    except subprocess.SubprocessError as err:
        raise UserError(f"sbatch did not answer ({err}); the script is {script}") from None
    match = re.match(r"\s*(\d+)", done.stdout)
    if done.returncode != 0 or not match:
        why = (done.stderr or done.stdout).strip().splitlines()
        raise UserError(f"sbatch refused {script}: {why[-1] if why else f'exit {done.returncode}'}")
    return match.group(1)
