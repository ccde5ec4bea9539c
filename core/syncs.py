"""Host syncs made by a piece of code: what makes a training step wait for the GPU (issue 15).

On CUDA, torch's sync debug mode reports each synchronising operation as a warning; `watch_syncs` hands each
one to a callback with the Python frame that made it. On the CPU nothing synchronises, so it reports instead
the conversions the project's own code makes that would on a GPU (`Tensor.item`, `bool`, `float`, `int`,
`tolist`, `numpy`, `cpu`); torch's own (an optimiser reading its step counter, which it keeps on the host)
are left out. `no_syncs` makes those conversions raise, for a test that a step function never makes one;
`count_syncs` counts them by kind.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONVERSIONS = ("item", "__bool__", "__float__", "__int__", "tolist", "numpy", "cpu")


def _from_project(frame) -> bool:
    name = frame.f_code.co_filename
    return name.startswith(str(ROOT)) and "site-packages" not in name and Path(name).name != "syncs.py"


@contextlib.contextmanager
def patched_conversions(on_call: Callable[[str, object], None]):
    """Within the block, `on_call(name, frame)` runs before each CONVERSIONS call that project code makes."""
    import torch

    originals = {name: getattr(torch.Tensor, name) for name in CONVERSIONS}

    def wrap(name, original):
        def conversion(self, *args, **kwargs):
            frame = sys._getframe(1)
            if _from_project(frame):
                on_call(name, frame)
            return original(self, *args, **kwargs)

        return conversion

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, wrap(name, original))
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@contextlib.contextmanager
def watch_syncs(device, on_sync: Callable[[str, object], None]):
    """Within the block, `on_sync(kind, frame)` for each host sync (see the module docstring): kind
    "cuda sync" on a CUDA device, else the conversion's name; frame the Python frame that made it."""
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        with patched_conversions(on_sync):
            yield
        return

    def report(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return shown(message, category, filename, lineno, file, line)
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename == warnings.__file__:
            frame = frame.f_back
        on_sync("cuda sync", frame)

    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        shown, warnings.showwarning = warnings.showwarning, report
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)


class HostSyncError(AssertionError):
    pass


def no_syncs():
    """A block in which project code may not convert a tensor to a host value (HostSyncError)."""

    def refuse(name: str, frame) -> None:
        where = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
        raise HostSyncError(f"Tensor.{name} called at {where}: a host sync on a GPU")

    return patched_conversions(refuse)


@contextlib.contextmanager
def count_syncs(device):
    """`with count_syncs(device) as counts: ...`: `counts` (a Counter) fills with the syncs made inside, by kind."""
    counts: Counter = Counter()
    with watch_syncs(device, lambda kind, frame: counts.update([kind])):
        yield counts
