"""SLURM batch scripts around a `main.py` command: render a readable sbatch script, and submit it.

The launch is one task per GPU by `srun` (`--ntasks-per-node` = `--gpus-per-node`, so ranks and GPUs never
mismatch; each task takes its rank from SLURM_PROCID and its GPU from SLURM_LOCALID, core.distributed), with
the rendezvous on the allocation's first node. Resumable commands ask SLURM for a signal before the time
limit (`--signal=B:USR1@<seconds>`); the script traps it (and SIGTERM) and forwards it to the job step,
where the trainer saves, marks its run `preempted` and requeues the job (core.preemption). The requeued job
runs the same script: `--resume auto` continues the run. Array tasks each get their own run directory.

In `run_dir` and in the command's arguments, `{job}` stands for the job id (the array's, for an array) and
`{task}` for the array task id: they become shell variables in the script.

Text that becomes code: every value is written for its context. Shell words are single-quoted
(`shlex.quote`); `#SBATCH` values that are not plain are double-quoted with `\\` and `"` escaped, as sbatch's
own line parser reads them; `%` in the log path is doubled (SLURM's file-name patterns). Values that no quoting
makes safe are refused in one line: control characters (a newline would end the line and start a shell
command, and sbatch would stop reading the `#SBATCH` lines after it), text that is not UTF-8, `hetjob` or
`packjob` in an `#SBATCH` option name (sbatch splits the job there), a backslash in the log path (SLURM then drops
its patterns), and every count outside the bounds below.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import unicodedata
from dataclasses import dataclass, field

from core.errors import UserError

SIGNALS = ("USR1", "TERM")  # what core.preemption catches
DEFAULT_SIGNAL = "USR1@120"
PLACEHOLDERS = {"{job}": "${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}", "{task}": "${SLURM_ARRAY_TASK_ID}"}
_SAFE_VALUE = re.compile(r"[A-Za-z0-9_.,:%@=+/\-\[\]]+")
# Bounds of every count: far above any cluster, far below where SLURM's own integers overflow.
MAX_NODES = 65536
MAX_GPUS = 64  # per node
MAX_CPUS = 4096  # per task
MAX_ARRAY_INDEX = 4_000_000  # SLURM's MaxArraySize cannot exceed 4000001
MAX_TIME_MINUTES = 3650 * 24 * 60  # ten years
MAX_MEM_MB = 1 << 30  # 1 PiB per node
MAX_WORD = 131071  # Linux's longest single argument (MAX_ARG_STRLEN) less its NUL
MAX_PATH = 4095  # PATH_MAX less its NUL
_SPLITS_JOB = re.compile(r"hetjob|packjob", re.IGNORECASE)  # sbatch starts a heterogeneous component there


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
_TIME = re.compile(r"UNLIMITED|\d{1,9}(:[0-5]?\d){0,2}|\d{1,6}-\d{1,2}(:[0-5]?\d){0,2}")


def _valid_array(spec: str) -> bool:
    """sbatch --array: comma-separated N or A-B[:STEP] with A <= B, then an optional %MAX_RUNNING."""
    indices, _, limit = spec.partition("%")
    if len(spec) > 4096 or (limit and not (limit.isdigit() and int(limit) > 0)):
        return False
    for part in indices.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part)
        if not match:
            return False
        first, last, step = match.groups()
        if (last is not None and int(last) < int(first)) or (step is not None and int(step) < 1):
            return False
        if max(int(n) for n in (first, last, step) if n is not None) > MAX_ARRAY_INDEX:
            return False
    return not limit or int(limit) <= MAX_ARRAY_INDEX


def _shown(value: str) -> str:
    """`value` in an error message: repr (newlines stay visible and the message one line), cut to 300."""
    text = repr(value)
    return text if len(text) <= 300 else text[:200] + "..." + text[-97:]


def check_text(what: str, value: str, limit: int = MAX_WORD) -> str:
    """Refuse text that no quoting carries into a job script intact; `value` otherwise."""
    for char in value:
        category = unicodedata.category(char)
        if category == "Cs":
            raise UserError(f"{what} {_shown(value)} is not valid UTF-8; rename it for the job script")
        if category in ("Cc", "Zl", "Zp"):
            raise UserError(
                f"{what} {_shown(value)} holds the control character {char!r}, which a job script cannot "
                "carry safely; rename it or choose another"
            )
    if len(value.encode("utf-8")) > limit:
        raise UserError(f"{what} is {len(value.encode('utf-8'))} bytes long, more than {limit}; shorten it")
    return value


def sbatch_value(text: str) -> str:
    """`text` as one argument of an `#SBATCH` line: plain, or double-quoted with `\\` and `"` escaped (sbatch
    reads quotes and backslashes there; whitespace and an unquoted `#` would end the value). sbatch looks for
    `hetjob`/`packjob` in the raw line before it reads any quoting: a backslash inside the word hides it and
    is dropped with the other escapes."""
    if _SAFE_VALUE.fullmatch(text) and not _SPLITS_JOB.search(text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = _SPLITS_JOB.sub(lambda m: m.group()[:-3] + "\\" + m.group()[-3:], escaped)
    return f'"{escaped}"'


def log_pattern(folder: str, pattern: str) -> str:
    """A log path in `folder` for `#SBATCH --output`: `%` in the folder doubled, so that only `pattern`'s
    `%x`, `%j`, `%A`, `%a` are SLURM's."""
    if "\\" in folder:
        raise UserError(
            f"the log folder {_shown(folder)} holds a backslash, which turns SLURM's file-name patterns off; "
            "choose an --out without one"
        )
    return f"{folder.replace('%', '%%')}/{pattern}"


def _minutes(spec: str) -> float:
    """An sbatch --time value (checked by _TIME) in minutes."""
    if spec == "UNLIMITED":
        return 0.0
    days, _, rest = spec.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-HH[:MM[:SS]]
        parts += [0] * (3 - len(parts))
        return int(days) * 1440 + parts[0] * 60 + parts[1] + parts[2] / 60
    if len(parts) == 3:  # HH:MM:SS
        return parts[0] * 60 + parts[1] + parts[2] / 60
    return parts[0] + (parts[1] / 60 if len(parts) == 2 else 0)  # MM[:SS]


def _mem_mb(spec: str) -> float:
    number, unit = (spec[:-1], spec[-1]) if spec[-1] in "KMGT" else (spec, "M")
    return int(number) * {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024**2}[unit]


def _check_counts(job: SlurmJob) -> None:
    counts = (("--nodes", job.nodes, 1, MAX_NODES), ("--gpus", job.gpus, 0, MAX_GPUS),
              ("--cpus", job.cpus, 1, MAX_CPUS))  # fmt: skip
    for option, value, low, high in counts:
        if value is not None and not low <= value <= high:
            raise UserError(f"{option} must be between {low} and {high}, got {value}")


def _check(job: SlurmJob) -> None:
    _check_counts(job)
    named = {"--partition": job.partition, "--account": job.account, "--qos": job.qos, "--mem": job.mem,
             "--time": job.time, "--array": job.array, "--job-name": job.job_name}  # fmt: skip
    for option, value in named.items():
        if value is not None and not _SAFE_VALUE.fullmatch(value):
            raise UserError(f"{option} {_shown(value)} holds characters that SLURM does not take there")
    if job.array is not None and not _valid_array(job.array):
        raise UserError(
            f"--array takes indices like 0-3, 1,5,9, 0-15:2 or 0-15%4, each at most {MAX_ARRAY_INDEX}, "
            f"got {_shown(job.array)}"
        )
    if job.time is not None and not (_TIME.fullmatch(job.time) and _minutes(job.time) <= MAX_TIME_MINUTES):
        raise UserError(
            "--time takes MINUTES, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS up to ten years (e.g. 12:00:00), "
            f"got {_shown(job.time)}"
        )
    if job.mem is not None and not (
        re.fullmatch(r"[1-9][0-9]{0,15}[KMGT]?", job.mem) and _mem_mb(job.mem) <= MAX_MEM_MB
    ):
        raise UserError(f"--mem takes a size per node like 64G or 500M, up to 1024T, got {_shown(job.mem)}")
    for option in job.extra:
        check_text("--sbatch", option)
        if not re.fullmatch(r"--[A-Za-z][A-Za-z0-9-]*(=.*)?", option, re.S):
            raise UserError(f"--sbatch takes sbatch options like --constraint=a100, got {_shown(option)}")
    parse_signal(job.signal)
    check_text("--job-name", job.job_name, 1024)
    for what, path in (("the run directory", job.run_dir), ("--python", job.python), ("main.py's path", job.main),
                       ("the working directory", job.workdir), ("the log path", job.output)):  # fmt: skip
        if path is not None:
            check_text(what, path, MAX_PATH)
    for word in job.command:
        check_text("the command's value", word)


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
    header += [
        tuple(option[2:].split("=", 1)) if "=" in option else (option[2:], None) for option in job.extra
    ]
    lines = ["#!/bin/bash"]
    lines += [f"# {line}" for line in job.description.splitlines()]
    for key, value in header:
        line = f"#SBATCH --{key}" if value is None else f"#SBATCH --{key}={sbatch_value(str(value))}"
        if _SPLITS_JOB.search(line):
            raise UserError(
                f"--sbatch {_shown('--' + key)}: sbatch reads `hetjob` or `packjob` on an #SBATCH line as the start "
                "of another job component; submit components as separate jobs"
            )
        lines.append(line)

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

    body = ["", "set -uo pipefail", f"PYTHON={shlex.quote(job.python)}", 'PYTHON="${BIOVIS_PYTHON:-$PYTHON}"']
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
