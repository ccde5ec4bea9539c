"""Run directories: one folder per command invocation holding config, log, checkpoints and figures.

`run.yaml` records the command and a status (`running` / `finished`). A folder that holds a finished run
is never reused unless the user says `--overwrite` (start again) or `--resume` (continue).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from core.atomic import write_text
from core.errors import UserError

RUN_FILE = "run.yaml"


def default_run_dir(command: str, name: str | None = None, root: str | os.PathLike = "runs") -> Path:
    return Path(root) / command / (name or time.strftime("%Y%m%d-%H%M%S"))


def read_run_info(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def prepare_run_dir(
    run_dir: str | os.PathLike, command: str, overwrite: bool = False, resume: bool = False
) -> Path:
    """Create or reopen `run_dir`, refusing to clobber an existing run unless asked to.

    Only the process that writes (rank 0) should call this.
    """
    run_dir = Path(run_dir)
    if overwrite and resume:
        raise UserError("--overwrite and --resume exclude each other")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} exists and is not a folder")
    info = read_run_info(run_dir)
    occupied = run_dir.is_dir() and any(run_dir.iterdir())
    if resume:
        if not info:
            raise UserError(f"--resume: {run_dir} holds no run to resume")
    elif occupied and overwrite:
        if not info:
            raise UserError(f"--overwrite refused: {run_dir} is not a run directory of this toolkit")
        shutil.rmtree(run_dir)
    elif occupied:
        state = info.get("status", "unknown") if info else "other files"
        raise UserError(
            f"{run_dir} already holds a run ({state}); pass --resume to continue it, --overwrite to start "
            "again, or another --out"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    mark_run(run_dir, command=command, status="running")
    return run_dir


def mark_run(run_dir: str | os.PathLike, **fields: Any) -> None:
    """Update `run.yaml` (command line, status, timestamps, anything else worth keeping)."""
    info = read_run_info(run_dir)
    if "argv" not in info:
        info["argv"] = sys.argv
        info["started"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    info.update(fields)
    if fields.get("status") == "finished":
        info["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_text(Path(run_dir) / RUN_FILE, yaml.safe_dump(info, sort_keys=False))
