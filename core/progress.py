"""Progress for long loops: a rich bar on a terminal, one plain line every N steps otherwise (SLURM logs)."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

_observer = threading.local()  # this thread's `observe` callback, if any


def _format_metrics(metrics: dict[str, Any]) -> str:
    parts = []
    for key, value in metrics.items():
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


class Progress:
    """`with Progress(total, "train") as p: ... p.update(1, loss=0.3)`.

    On a terminal it draws a rich progress bar; when stdout is not a terminal it prints a plain line every
    `every` steps and at the end, so batch-system log files stay readable. `enabled=False` (non-zero DDP
    ranks, quiet mode) prints nothing.
    """

    def __init__(self, total: int | None, description: str, enabled: bool = True, every: int | None = None):
        self.total = total
        self.description = description
        self.enabled = enabled
        self.tty = sys.stdout.isatty()
        self.every = every or max(1, (total or 100) // 10)
        self.count = 0
        self.metrics: dict[str, Any] = {}
        self._start = time.time()
        self._bar = None

    def __enter__(self) -> Progress:
        if self.enabled and self.tty:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[metrics]}"),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total, metrics="")
        return self

    def update(self, n: int = 1, **metrics: Any) -> None:
        self.count += n
        self.metrics.update(metrics)
        callback = getattr(_observer, "callback", None)
        if callback is not None:
            callback(self.description, self.count, self.total)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, advance=n, metrics=_format_metrics(self.metrics))
        elif self.count % self.every < n or self.count == self.total:
            self._print_line()

    def _print_line(self) -> None:
        elapsed = time.time() - self._start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        total = f"/{self.total}" if self.total else ""
        line = f"{self.description}: {self.count}{total} [{elapsed:.0f}s, {rate:.2f} it/s] "
        print(line + _format_metrics(self.metrics), flush=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif self.enabled and self.count % self.every != 0 and self.count != self.total:
            self._print_line()


@contextlib.contextmanager
def observe(callback: Callable[[str, int, int | None], None]):
    """Call `callback(description, count, total)` on every update of a Progress in this thread (e.g. for a web
    page showing how far a computation is), whether or not the Progress prints."""
    previous = getattr(_observer, "callback", None)
    _observer.callback = callback
    try:
        yield
    finally:
        _observer.callback = previous
