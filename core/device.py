"""Device choice (`--device auto|cpu|cuda|cuda:N`) and the mixed-precision context used on CUDA."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

from core.errors import UserError

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


@dataclass
class HardwareConfig:
    """Where and how a trainer computes (its config's `hardware` block): the device, bf16 autocast on CUDA,
    DataLoader workers (None: the device's default, see `loader_settings`)."""

    device: str = "auto"
    amp: bool = True
    num_workers: int | None = None

    def validate(self) -> None:
        if not DEVICE_PATTERN.match(self.device):
            raise UserError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.num_workers is not None and self.num_workers < 0:
            raise UserError(f"--num-workers must be at least 0, got {self.num_workers}")


def resolve_device(name: str = "auto", local_rank: int | None = None):
    """Return a torch.device; `auto` picks CUDA (the local rank's GPU under DDP) when available."""
    import torch

    if not DEVICE_PATTERN.match(name):
        raise UserError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps asked for, but this machine has no Apple GPU (use --device cpu)")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for, but no CUDA device is visible (use --device cpu)")
        if name == "cuda":
            name = f"cuda:{local_rank or 0}"
        index = int(name.split(":")[1])
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
        torch.cuda.set_device(index)
    return torch.device(name)


def autotune(device) -> None:
    """On CUDA, let cuDNN time its convolution algorithms once per shape and keep the fastest (a trainer's
    shapes are fixed; NVlabs' training loop does the same). The chosen algorithms may differ between
    processes, so GPU runs agree to rounding, not bit for bit; a no-op elsewhere."""
    import torch

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def autocast(device, enabled: bool = True):
    """bf16 autocast on CUDA when enabled; a no-op context elsewhere."""
    import torch

    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def usable_cpus() -> int:
    """CPU cores this process may run on: its affinity mask (what SLURM or taskset granted; srun gives each
    task its own share), divided among torchrun's ranks on this node, which share one mask."""
    import os

    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    ranks = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return max(1, cpus // (int(ranks) if ranks.isdigit() and int(ranks) > 0 else 1))


def loader_settings(device, num_workers: int | None) -> dict:
    """DataLoader keywords for a device. On CUDA by default: one worker per usable core (decoding is what
    starves a GPU), kept alive across epochs, pinned memory (so that `.to(device, non_blocking=True)`
    overlaps the copy). Each worker prefetches two batches (torch's default: with a worker per core that is
    already many batches ahead; more would only hold more shared memory). On CPU: no workers unless asked."""
    if num_workers is not None and num_workers < 0:
        raise UserError(f"--num-workers must be at least 0, got {num_workers}")
    if num_workers is None:
        num_workers = usable_cpus() if device.type == "cuda" else 0
    settings = {"num_workers": num_workers, "pin_memory": device.type == "cuda"}
    if num_workers > 0:
        settings["persistent_workers"] = True
    return settings
