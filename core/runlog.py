"""Run logs as JSON Lines: one object per event with `step`, `split`, wall time and metrics.

One writer (rank 0 only) appends whole lines; the reader tolerates a half-written last line, so a run
that is still going, or one that was killed mid-write, can always be read.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from core.atomic import write_text
from core.errors import UserError

SPLITS = ("train", "val", "test")


def json_ready(value: Any) -> Any:
    """`value` as plain JSON data: tensors and numpy scalars as numbers (or lists), tuples as lists, and every
    non-finite float as null, inside dicts and lists too (a diverged run's per-dimension values), so that
    `json.dumps(..., allow_nan=False)` passes."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if hasattr(value, "item"):
        value = value.item() if getattr(value, "ndim", 0) == 0 else json_ready(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLog:
    """Appends events to `log.jsonl`. Disabled (a no-op) on non-zero ranks.

    `resume_step`: the step a resumed run continues from. Events logged after it by the interrupted run
    are dropped (the resumed run logs those steps again), so a resumed log has no duplicate rows. A trainer of
    several stages, each counting its own steps, drops them per stage (`truncate_after(step, stage)`).
    """

    def __init__(self, path: str | os.PathLike, enabled: bool = True, resume_step: int | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self.start = time.time()
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None and self.path.is_file():
                self.truncate_after(resume_step)

    def truncate_after(self, step: int, stage: str | None = None) -> None:
        """Drop the events of `stage` (those without a `stage` field when None) logged after `step`, and a
        half-written last line."""
        if not (self.enabled and self.path.is_file()):
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # the half-written last line of a killed run
            if not isinstance(event, dict):
                continue
            if event.get("stage") != stage or int(event.get("step", 0)) <= step:
                kept.append(line + "\n")
        write_text(self.path, "".join(kept))

    def write(self, step: int, split: str, **metrics: Any) -> dict:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        event = {"step": int(step), "split": split, "time": round(time.time(), 3)}
        event.update({k: json_ready(v) for k, v in metrics.items()})
        if self.enabled:
            line = json.dumps(event, allow_nan=False) + "\n"
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
        return event


def read_events(path: str | os.PathLike) -> list[dict]:
    """Read every complete event; a trailing partial line (run still writing or killed) is ignored."""
    path = Path(path)
    if path.is_dir():
        path = path / "log.jsonl"
    if not path.is_file():
        raise UserError(f"no run log at {path}: pass a run directory or its log.jsonl")
    events = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise UserError(f"{path}:{number} is not a JSON object ({err.msg})") from None
        if not isinstance(event, dict) or "step" not in event or "split" not in event:
            raise UserError(f"{path}:{number} lacks 'step' or 'split': not a run log of this toolkit")
        events.append(event)
    return events


def read_log(path: str | os.PathLike):
    """The run log as a pandas DataFrame (one row per event)."""
    import pandas as pd

    events = read_events(path)
    if not events:
        raise UserError(f"the run log {path} holds no events yet")
    return pd.DataFrame(events)
