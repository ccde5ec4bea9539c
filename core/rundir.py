"""Run directories: one folder per command invocation holding config, log, checkpoints and figures.

`run.yaml` records the command, the process and a status: `running`, `finished`, `failed` (with the
one-line reason) or `preempted`. A folder that holds a run is never reused unless the user says
`--overwrite` (start again) or `--resume` (continue a run of the same command).

Nothing is lost to a bad input or a crash: an output folder may not be, or contain, one of the command's
inputs; `--overwrite` replaces only a run of the same command (`check_output_file` is the same rule for
commands that write a file), moves the old run aside (`.NAME.replaced-HOST-PID`) and deletes it only once
the new one has finished; when the new one fails instead, the old run is put back (`abandon_active_runs`,
called by `main.py`). A process killed outright (SIGKILL, a node lost) cleans nothing up; the next command
that prepares the same folder does: it puts the old run back if the new one never started, deletes it if
the new one finished since (e.g. after `--resume`), and otherwise says where it is kept.

`run.yaml` records the host, pid, boot and process start time, so that a run left `running` by a process
that no longer exists on this host reads as `killed` (resumable), not as running.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import time
import unicodedata
from collections.abc import Callable, Iterable
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


# An old run that `--overwrite` moved aside: .NAME.replaced-HOST-PID (.NAME.replaced-PID before the host).
_ASIDE = re.compile(r"\.(?P<name>.+)\.replaced-(?:(?P<host>.+)-)?(?P<pid>\d+)")


def check_run_name(name: str, command: str) -> str:
    """Refuse a `--name` that would leave runs/<command>/ or hide the run (a path, `.`, `..`, a leading dot,
    a control character); `name` otherwise."""
    bad = (
        name in (".", "..")
        or name.startswith(".")
        or any(sep in name for sep in (os.sep, os.altsep, "/") if sep)
        or any(unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") for c in name)
    )
    if bad:
        raise UserError(
            f"--name {name!r} is not a plain folder name (no '/', no control characters, not '.' or '..', "
            f"no leading '.'); it names the run under runs/{command}/, use --out for another place"
        )
    return name


def default_run_dir(command: str, name: str | None = None, root: str | os.PathLike = "runs") -> Path:
    if name:
        check_run_name(name, command)
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


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _start_time(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (/proc/PID/stat field 22); None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def process_fields() -> dict:
    """This process as `run.yaml` records it: host, pid, and the boot and start time that tell a pid reused
    after a reboot or by another program from the run's own process."""
    fields = {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": _boot_id()}
    fields["pid_start"] = _start_time(os.getpid())
    return {k: v for k, v in fields.items() if v is not None}


def _pid_alive(pid: int, boot_id: str | None = None, start: int | None = None) -> bool:
    """Whether `pid` on this host is still the process that was recorded (same boot, same start time)."""
    if pid <= 0 or (boot_id and _boot_id() not in (None, boot_id)):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except (OverflowError, OSError):
        return False
    return start is None or _start_time(pid) in (None, start)


def _owner(info: dict) -> str:
    """The recorded process: `this process`, `alive`, `gone` (on this host), or `elsewhere` (another host,
    where it cannot be checked)."""
    pid = info.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or info.get("host") != socket.gethostname():
        return "elsewhere"
    if pid == os.getpid():
        return "this process"
    return "alive" if _pid_alive(pid, info.get("boot_id"), info.get("pid_start")) else "gone"


def run_state(info: dict) -> str | None:
    """The run's status as it is now: as recorded, except that a `running` run whose process is gone from
    this host is `killed` (it can be resumed)."""
    status = info.get("status")
    return "killed" if status == "running" and _owner(info) == "gone" else status


def _alive_here(info: dict) -> bool:
    """True when the run's process is alive on this host (a killed run stays `running` on disk)."""
    return info.get("status") == "running" and _owner(info) == "alive"


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


def check_output_file(
    path: str | os.PathLike, overwrite: bool, is_own: Callable[[Path], bool], what: str
) -> Path:
    """The rule of `--overwrite` for a command whose output is a file: a new path is fine; an existing one
    needs `--overwrite` and must be `what` (e.g. "a VDNA file"), this command's own kind of output, as
    `is_own(path)` tells from its content (a reader that fails on it means no). A folder is refused."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--out {path} is a folder; name the file to write")
    if not path.exists() and not path.is_symlink():
        return path
    if not overwrite:
        raise UserError(f"{path} already exists; pass --overwrite to replace it, or another --out")
    try:
        own = path.is_file() and bool(is_own(path))
    except Exception:  # a foreign file may break any reader: then it is not this command's output
        own = False
    if not own:
        raise UserError(f"--overwrite refused: {path} is not {what}, so it is kept; choose another --out")
    return path


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


def _occupied_message(run_dir: Path, info: dict, resumable: bool, kept: list[Path]) -> str:
    if not info:
        return f"--out {run_dir} holds other files; choose an empty or new folder"
    command, state = info.get("command", "?"), run_state(info)
    if _alive_here(info):
        return (
            f"{run_dir} holds a `{command}` run that is still running (process {info['pid']}); wait for it "
            "or stop it, or choose another --out"
        )
    what = f"a {state or 'unknown'} `{command}` run"
    if state == "killed":
        what += f" (its process {info['pid']} ended without finishing it)"
    elif state == "running":
        what += (
            f" (marked running by process {info.get('pid')} on {info.get('host')}; if it no longer runs there"
        )
        what += ", it was killed)"
    elif state == "failed" and info.get("reason"):
        what += f" ({info['reason']})"
    options = (
        "--resume to continue it, --overwrite to start again" if resumable else "--overwrite to replace it"
    )
    message = f"{run_dir} already holds {what}; pass {options}, or another --out"
    if kept:
        message += f" (the run it replaced is kept in {', '.join(map(str, kept))})"
    return message


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr, flush=True)


def _leftovers(run_dir: Path, info: dict) -> list[Path]:
    """Old runs of `run_dir` that `--overwrite` moved aside and no live process holds (newest first): their
    replacing process was killed, or finished elsewhere without cleaning up."""
    here, found = socket.gethostname(), []
    ours = {aside for aside, _ in _active.values() if aside is not None}
    try:
        entries = list(run_dir.parent.iterdir()) if run_dir.parent.is_dir() else []
    except OSError:
        return []
    for entry in entries:
        match = _ASIDE.fullmatch(entry.name)
        if not match or match["name"] != run_dir.name or entry in ours or not entry.is_dir():
            continue
        host, pid = match["host"] or here, int(match["pid"])
        if host == here and (pid == os.getpid() or _pid_alive(pid)):
            continue  # an --overwrite in progress
        if host != here and info.get("status") == "running" and info.get("host") == host:
            continue  # perhaps in progress on that host
        found.append(entry)
    return sorted(found, key=lambda p: p.stat().st_ctime, reverse=True)


def _settle_leftovers(run_dir: Path) -> list[Path]:
    """Clean up after an `--overwrite` that was killed: put the old run back when the new one never started,
    delete it when the new one has finished since; the old runs kept (the new one is killed, failed or
    preempted: the user decides), each announced with where it is."""
    try:
        info = read_run_info(run_dir)
    except UserError:
        info = {}
    kept = []
    for aside in _leftovers(run_dir, info):
        holds = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else set()
        if not info and holds <= {JOB_FOLDER}:
            if holds:
                _carry_job_folder(run_dir, aside)
                if any(run_dir.iterdir()):  # job logs on both sides: the user sorts them out
                    kept.append(aside)
                    continue
                run_dir.rmdir()
            os.replace(aside, run_dir)
            _note(
                f"put the previous run back into {run_dir} from {aside} (the --overwrite that moved it was killed)"
            )
            info = read_run_info(run_dir)
        elif run_state(info) == "finished":
            shutil.rmtree(aside, ignore_errors=True)
            _note(f"removed {aside}, the old run that the finished run in {run_dir} replaced")
        else:
            kept.append(aside)
    return kept


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


def check_run_dir(
    run_dir: str | os.PathLike,
    command: str,
    overwrite: bool = False,
    resume: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
    resumable: bool = True,
) -> None:
    """Every refusal of `prepare_run_dir`, without touching the disk: for commands that work long before they
    write, so that a folder they may not use is refused before the work."""
    run_dir = Path(run_dir)
    if overwrite and resume:
        raise UserError("--overwrite and --resume exclude each other")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} exists and is not a folder")
    check_apart(run_dir, inputs)
    info = read_run_info(run_dir)
    occupied = run_dir.is_dir() and any(p.name != JOB_FOLDER for p in run_dir.iterdir())
    if resume:
        check_resumable(run_dir, command)
    elif occupied and overwrite:
        if not info:
            raise UserError(f"--overwrite refused: {run_dir} is not a run directory of this toolkit")
        if info.get("command") != command:
            raise UserError(
                f"--overwrite refused: {run_dir} holds a `{info.get('command')}` run, which `{command}` does "
                "not replace; choose another --out"
            )
        if _alive_here(info):
            raise UserError(f"{run_dir} is still running (process {info['pid']}); wait for it or stop it")
    elif occupied:
        raise UserError(_occupied_message(run_dir, info, resumable, _leftovers(run_dir, info)))


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
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} exists and is not a folder")
    check_apart(run_dir, inputs)
    kept = _settle_leftovers(run_dir)
    check_run_dir(run_dir, command, overwrite, resume, (), resumable)
    occupied = run_dir.is_dir() and any(p.name != JOB_FOLDER for p in run_dir.iterdir())
    aside = None
    if resume:
        _make_dir(run_dir)
        _remove_stale_temporaries(run_dir)
    elif occupied:  # and --overwrite, which check_run_dir allowed
        aside = run_dir.with_name(f".{run_dir.name}.replaced-{socket.gethostname()}-{os.getpid()}")
        _make_dir(run_dir.parent)
        os.replace(run_dir, aside)
    if kept:
        _note(
            f"the run that {run_dir} replaced before is kept in {', '.join(map(str, kept))}; it is deleted "
            "when this run finishes"
        )
    _make_dir(run_dir)
    if aside is not None:
        _carry_job_folder(aside, run_dir)
    _active[run_dir.resolve()] = (aside, (not occupied or overwrite) and not resume)
    info_fields = {"command": command, "status": "running", **process_fields()}
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
        if fields["status"] == "finished":  # also what a killed --overwrite left for this run to replace
            for leftover in _leftovers(Path(run_dir), info):
                shutil.rmtree(leftover, ignore_errors=True)


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
