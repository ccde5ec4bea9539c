"""Distributed setup for DDP, launched by `torchrun` or by `srun` (one task per GPU).

`dist_env()` reads the launcher's environment; `init_distributed()` starts the process group with
nccl on CUDA and gloo on CPU. A single process (no launcher) gives world size 1 and no process group.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _first_slurm_host(nodelist: str) -> str:
    """First host name of a SLURM node list, via scontrol when present (e.g. `gpu[01-04]` -> `gpu01`)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    match = re.match(r"([^\[,]+)(?:\[(\d+))?", nodelist)
    if not match:
        return nodelist
    return match.group(1) + (match.group(2) or "")


def dist_env(environ: dict[str, str] | None = None) -> DistEnv:
    """Rank layout from torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or srun (SLURM_PROCID/SLURM_NTASKS/...).

    Under srun it also fills MASTER_ADDR (first node of the job) and MASTER_PORT (derived from the job id)
    when they are unset, so the default `env://` rendezvous works.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        env.setdefault("MASTER_ADDR", _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return DistEnv(
            int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)), "srun"
        )
    return DistEnv()


def init_distributed(env: DistEnv, device) -> None:
    """Start the default process group when running under a launcher (idempotent)."""
    import torch.distributed as dist

    if not env.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size)


def shutdown_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor):
    """Sum a tensor over ranks in place (no-op for one process); returns it."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
