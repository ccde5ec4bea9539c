"""Host syncs made by a piece of code: what makes a training step wait for the GPU (issue 15).

On CUDA, torch's sync debug mode reports each synchronising operation as a warning; `count_syncs` counts
them. On the CPU nothing synchronises, so it counts instead the conversions the project's own code makes that
would on a GPU (`Tensor.item`, `bool`, `float`, `int`, `tolist`, `numpy`, `cpu`); torch's own (an optimiser
reading its step counter, which it keeps on the host) are left out. `no_syncs` makes those conversions raise,
for a test that the step function never makes one.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONVERSIONS = ("item", "__bool__", "__float__", "__int__", "tolist", "numpy", "cpu")


def _from_project(frame) -> bool:
    name = frame.f_code.co_filename
    return name.startswith(str(ROOT)) and "site-packages" not in name and Path(name).name != "syncs.py"


@contextlib.contextmanager
def patched_conversions(on_call):
    """Within the block, `on_call(name)` runs before each CONVERSIONS call that project code makes."""
    import torch

    originals = {name: getattr(torch.Tensor, name) for name in CONVERSIONS}

    def wrap(name, original):
        def conversion(self, *args, **kwargs):
            if _from_project(sys._getframe(1)):
                on_call(name)
            return original(self, *args, **kwargs)

        return conversion

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, wrap(name, original))
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


class HostSyncError(AssertionError):
    pass


def no_syncs():
    """A block in which project code may not convert a tensor to a host value (HostSyncError)."""

    def refuse(name: str) -> None:
        raise HostSyncError(f"Tensor.{name} called: a host sync on a GPU")

    return patched_conversions(refuse)


@contextlib.contextmanager
def count_syncs(device):
    """`with count_syncs(device) as counts: ...`: `counts` (a Counter) fills with the syncs made inside, by
    kind: CUDA's sync debug warnings on a GPU, the project's conversions (see the module docstring) elsewhere."""
    import torch

    counts: Counter = Counter()
    if getattr(device, "type", str(device)) != "cuda":
        with patched_conversions(lambda name: counts.update([name])):
            yield counts
        return
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield counts
        finally:
            torch.cuda.set_sync_debug_mode(previous)
            counts.update("cuda sync" for w in caught if "synchroniz" in str(w.message))
