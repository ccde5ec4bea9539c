"""Run directories: one folder per command invocation holding config, log, checkpoints and figures.

`run.yaml` records the command, the process and a status: `running`, `finished`, `failed` (with the
one-line reason) or `preempted`. A folder that holds a run is never reused unless the user says
`--overwrite` (start again) or `--resume` (continue a run of the same command).

Nothing is lost to a bad input or a crash: an output folder may not be, or contain, one of the command's
inputs; `--overwrite` moves the old run aside and deletes it only once the new one has finished; when the
new one fails instead, the old run is put back (`abandon_active_runs`, called by `main.py`).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from core.atomic import write_text
from core.errors import UserError

RUN_FILE = "run.yaml"
STATES = ("running", "finished", "failed", "preempted")
# Runs this process prepared and has not finished: run dir -> (the old run that --overwrite moved aside,
# whether this process created the folder).
_active: dict[Path, tuple[Path | None, bool]] = {}
# Files a run writes before it has produced anything worth keeping.
_BOOKKEEPING = {RUN_FILE, "config.yaml"}
# The folder of a SLURM job's script and logs (`python main.py submit`), there before the run starts.
JOB_FOLDER = "slurm"


def default_run_dir(command: str, name: str | None = None, root: str | os.PathLike = "runs") -> Path:
    return Path(root) / command / (name or time.strftime("%Y%m%d-%H%M%S"))


def read_run_info(run_dir: str | os.PathLike) -> dict:
    from core.config import read_yaml

    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return {}
    info = read_yaml(path, {})
    if not isinstance(info, dict):
        raise UserError(f"{path} is not a run record of this toolkit")
    return info


def _alive_here(info: dict) -> bool:
    """True when the run's process is alive on this host (a killed run stays `running` on disk)."""
    if info.get("status") != "running" or info.get("host") != socket.gethostname():
        return False
    pid = info.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_apart(run_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse an output folder that is, or contains, one of the command's inputs."""
    out = Path(run_dir).expanduser().resolve()
    for item in inputs:
        if item is None:
            continue
        path = Path(item).expanduser().resolve()
        if path == out or out in path.parents:
            raise UserError(
                f"--out {run_dir} would hold the command's own input {item}; choose another --out"
            )


def check_resumable(run_dir: str | os.PathLike, command: str) -> dict:
    """The run record of `run_dir` if `--resume` may continue it as `command`; a one-line refusal otherwise."""
    info = read_run_info(run_dir)
    if not info:
        raise UserError(f"--resume: {run_dir} holds no run to resume")
    if info.get("command") != command:
        raise UserError(
            f"--resume: {run_dir} holds a `{info.get('command')}` run; `{command}` cannot continue it"
        )
    if _alive_here(info):
        raise UserError(f"{run_dir} is still running (process {info['pid']}); wait for it or stop it")
    return info


def auto_resume(run_dir: str | os.PathLike, main: bool) -> bool:
    """`--resume auto`: whether to continue the run in `run_dir` (else start one).

    Every rank decides before rank 0 touches the folder: a run that saved its config is continued by all
    ranks; one that stopped earlier (a run record only) is restarted in place by rank 0 (`--resume`) and
    started afresh by the others, which is the same start. Ranks >0 never look at `run.yaml`, which rank 0
    may be writing for this very job.
    """
    run_dir = Path(run_dir)
    return (run_dir / "config.yaml").is_file() or (main and (run_dir / RUN_FILE).is_file())


def _carry_job_folder(source: Path, target: Path) -> None:
    """Keep a SLURM job's script and logs with the run directory that is in use."""
    if (source / JOB_FOLDER).is_dir() and not (target / JOB_FOLDER).exists():
        os.replace(source / JOB_FOLDER, target / JOB_FOLDER)


def _occupied_message(run_dir: Path, info: dict, resumable: bool) -> str:
    if not info:
        return f"--out {run_dir} holds other files; choose an empty or new folder"
    state = info.get("status", "unknown")
    what = f"a {state} `{info.get('command', '?')}` run"
    if state == "failed" and info.get("reason"):
        what += f" ({info['reason']})"
    options = (
        "--resume to continue it, --overwrite to start again" if resumable else "--overwrite to replace it"
    )
    return f"{run_dir} already holds {what}; pass {options}, or another --out"


def _remove_stale_temporaries(run_dir: Path) -> None:
    """Temporary files of saves that a kill interrupted (`.<name>.<random>.tmp`, see core.atomic)."""
    for tmp in run_dir.rglob(".*.tmp"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def _make_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except PermissionError:
        raise UserError(f"cannot write to {run_dir}: permission denied; choose another --out") from None
    except OSError as err:
        raise UserError(f"cannot write to {run_dir}: {err.strerror}; choose another --out") from None


def prepare_run_dir(
    run_dir: str | os.PathLike,
    command: str,
    overwrite: bool = False,
    resume: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
    resumable: bool = True,
) -> Path:
    """Create or reopen `run_dir` for `command`, refusing to clobber an existing run unless asked to.

    `inputs` are the paths the command reads (the output may not be or contain one). `resumable=False`
    for commands without `--resume`. Call it after every input was validated. Only rank 0 calls this.
    """
    run_dir = Path(run_dir)
    if overwrite and resume:
        raise UserError("--overwrite and --resume exclude each other")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} exists and is not a folder")
    check_apart(run_dir, inputs)
    info = read_run_info(run_dir)
    occupied = run_dir.is_dir() and any(p.name != JOB_FOLDER for p in run_dir.iterdir())
    created = not occupied or overwrite
    aside = None
    if resume:
        check_resumable(run_dir, command)
        _make_dir(run_dir)
        _remove_stale_temporaries(run_dir)
    elif occupied and overwrite:
        if not info:
            raise UserError(f"--overwrite refused: {run_dir} is not a run directory of this toolkit")
        if _alive_here(info):
            raise UserError(f"{run_dir} is still running (process {info['pid']}); wait for it or stop it")
        aside = run_dir.with_name(f".{run_dir.name}.replaced-{os.getpid()}")
        _make_dir(run_dir.parent)
        os.replace(run_dir, aside)
    elif occupied:
        raise UserError(_occupied_message(run_dir, info, resumable))
    _make_dir(run_dir)
    if aside is not None:
        _carry_job_folder(aside, run_dir)
    _active[run_dir.resolve()] = (aside, created and not resume)
    info_fields = {"command": command, "status": "running", "pid": os.getpid(), "host": socket.gethostname()}
    if not resume:
        info_fields["argv"] = sys.argv
    mark_run(run_dir, reason=None, **info_fields)
    return run_dir


def mark_run(run_dir: str | os.PathLike, **fields: Any) -> None:
    """Update `run.yaml` (command line, status, timestamps, anything else worth keeping).

    Marking a run `finished` also deletes the old run that `--overwrite` moved aside for it.
    """
    info = read_run_info(run_dir)
    if "argv" not in info or fields.get("argv"):
        info["argv"] = fields.pop("argv", None) or sys.argv
        info["started"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    info.update(fields)
    info = {k: v for k, v in info.items() if v is not None}
    if fields.get("status") == "finished":
        info["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_text(Path(run_dir) / RUN_FILE, yaml.safe_dump(info, sort_keys=False))
    if fields.get("status") in ("finished", "preempted"):
        aside, _ = _active.pop(Path(run_dir).resolve(), (None, False))
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


def abandon_active_runs(reason: str) -> list[str]:
    """After an error: put back each old run that `--overwrite` moved aside (dropping the new attempt); drop
    a folder this process created that holds nothing yet; mark any other run `failed` with `reason`.
    Returns a short note per run for the user."""
    notes = []
    for run_dir, (aside, created) in list(_active.items()):
        _active.pop(run_dir)
        try:
            if aside is not None and aside.exists():
                _carry_job_folder(run_dir, aside)
                shutil.rmtree(run_dir, ignore_errors=True)
                os.replace(aside, run_dir)
                notes.append(f"the previous run in {run_dir} was kept")
            elif created and run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= _BOOKKEEPING:
                shutil.rmtree(run_dir, ignore_errors=True)
            elif (run_dir / RUN_FILE).is_file():
                mark_run(run_dir, status="failed", reason=reason[:300])
                notes.append(f"run {run_dir} marked failed")
        except (OSError, UserError) as err:
            notes.append(f"could not update {run_dir}: {err}")
    return notes
