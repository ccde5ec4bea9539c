"""One training run from start to finish: everything a trainer does that is not its own model.

`TrainingRun(cfg, run_dir, resume, quiet)` validates the config, installs the preemption watch (SIGUSR1/SIGTERM
stop the run between two steps, see core.preemption), reads the launcher's distributed environment, picks the
device and starts the process group (nccl on CUDA, gloo on CPU). Then, in a trainer's order: `prepare(build)`
builds the data on rank 0 first (a world is generated once) and on the other ranks after it; `load_state()`
reads the resume state when resuming and `restore(state, ...)` loads modules, optimisers and schedules from it;
`ddp(module)` / `broadcast(...)` make one set of weights for every rank (`all_reduce(tensor)` sums a count over
them); `loader(...)` is a DataLoader with the device's settings; `begin()` saves config.yaml, marks the run
`running` and opens its log (dropping what an interrupted run logged past the resume point, so a resumed log
holds each event once); `steps(...)` and `epoch(...)` run the steps (training.lifecycle.loop); `save_state(...)`
writes the resume state atomically on rank 0, only once the loss window is known to be finite; `finish(summary)`
writes summary.json and marks the run `finished` (`failed` is marked by main.py, `preempted` by
core.preemption).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader, DistributedSampler

from core import checkpoint, preemption
from core.atomic import write_text
from core.config import to_yaml
from core.device import autotune, loader_settings, resolve_device
from core.distributed import all_reduce_sum, barrier, dist_env, init_distributed
from core.rundir import mark_run
from core.runlog import RunLog, json_ready
from training.lifecycle.loop import EpochLoop, StepLoop

T = TypeVar("T")
RESUME_FILE = "last.pt"


class TrainingRun:
    """The lifecycle of one training run; see the module docstring."""

    def __init__(
        self, cfg, run_dir: str | Path, resume: bool = False, quiet: bool = False, tune: bool = True
    ):
        cfg.validate()
        self.cfg, self.run_dir, self.resume, self.quiet = cfg, Path(run_dir), resume, quiet
        self.preempt = preemption.watch(self.run_dir)
        self.env = dist_env()
        self.device = resolve_device(cfg.hardware.device, self.env.local_rank)
        if tune:
            autotune(self.device)
        init_distributed(self.env, self.device)
        self.log: RunLog | None = None
        self.loop: StepLoop | None = None  # the loop running now (its window is checked before saves)

    @property
    def main(self) -> bool:
        return self.env.is_main

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world(self) -> int:
        return self.env.world_size

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def prepare(self, build: Callable[..., T]) -> T:
        """`build(quiet=...)` on rank 0 first (it may write shared files), then on the other ranks."""
        result = build(quiet=self.quiet) if self.main else None
        barrier()
        return result if self.main else build(quiet=True)

    def barrier(self) -> None:
        barrier()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the ranks, in place (itself for one process)."""
        return all_reduce_sum(tensor)

    def ddp(self, module: torch.nn.Module) -> torch.nn.Module:
        """`module` wrapped in DistributedDataParallel under a launcher; itself otherwise."""
        if not self.env.enabled:
            return module
        return torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[self.device.index] if self.cuda else None
        )

    def broadcast(self, *modules: torch.nn.Module) -> None:
        """Rank 0's weights (and buffers) on every rank, whatever each rank's initialisation did."""
        if self.world > 1:
            for module in modules:
                for tensor in module.state_dict().values():
                    torch.distributed.broadcast(tensor, 0)

    def loader(self, dataset, persistent: bool = True, **kwargs: Any) -> DataLoader:
        """A DataLoader with the device's worker and pinning settings (`persistent=False` for loaders used
        now and then, such as evaluation's, whose workers should not stay alive)."""
        settings = loader_settings(self.device, self.cfg.hardware.num_workers)
        if not persistent:
            settings["persistent_workers"] = False
        return DataLoader(dataset, **kwargs, **settings)

    def shuffled_loader(self, dataset, batch_size: int, seed: int, **kwargs: Any) -> DataLoader:
        """This rank's share of `dataset`, reshuffled per epoch from (seed, epoch) (`EpochLoop` sets the epoch);
        no size-1 last batch (BatchNorm) when there is more than one batch."""
        sampler = DistributedSampler(
            dataset, num_replicas=self.world, rank=self.rank, shuffle=True, seed=seed
        )
        drop_last = len(dataset) // self.world > batch_size
        return self.loader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **kwargs)

    def sharded_loader(self, dataset, batch_size: int, **kwargs: Any) -> DataLoader:
        """Every `world`-th item for this rank, in order: each item is evaluated exactly once over all ranks
        (a DistributedSampler would pad with repeats)."""
        indices = list(range(self.rank, len(dataset), self.world))
        return self.loader(dataset, batch_size=batch_size, sampler=indices, **kwargs)

    def load_state(self, name: str | Path = RESUME_FILE) -> dict | None:
        """The resume state `name` (relative to the run directory) when resuming and it exists, else None."""
        path = self.run_dir / name
        if not (self.resume and path.is_file()):
            return None
        return checkpoint.load_state(path, device=str(self.device))

    def restore(self, state: dict, name: str | Path = RESUME_FILE, **parts: Any) -> None:
        """Load each of `parts` (a module, an optimiser, a schedule: anything with `load_state_dict`; None is
        skipped) from the key of its name in the resume state `state` that `load_state(name)` read. A module
        whose weights do not fit is a one-line error naming the file and the key."""
        for key, part in parts.items():
            if isinstance(part, torch.nn.Module):
                checkpoint.load_state_dict_checked(part, state[key], f"{self.run_dir / name} [{key}]")
            elif part is not None:
                part.load_state_dict(state[key])

    def save_state(self, state: dict, name: str | Path = RESUME_FILE) -> None:
        """Write the resume state atomically (call on rank 0): tensors and plain values only, after the running
        loop's loss window was found finite, with that window so that a resumed run logs the same lines."""
        if self.loop is not None:
            self.loop.check_finite()
            state = {**state, **self.loop.resume_fields()}
        checkpoint.save_state(self.run_dir / name, state)

    def begin(self, resume_step: int | None = None, **record: Any) -> RunLog:
        """config.yaml, run.yaml `running` (with `record`), and the run log. `resume_step`: drop the log lines
        past it that an interrupted run wrote (for trainers that do not log through a StepLoop)."""
        if self.main:
            write_text(self.run_dir / "config.yaml", to_yaml(self.cfg))
            mark_run(self.run_dir, status="running", world_size=self.world, device=str(self.device), **record)
        self.log = self.open_log(self.run_dir / "log.jsonl")
        if self.resume and self.main and resume_step is not None:
            self.log.truncate_after(resume_step)
        return self.log

    def open_log(self, path: Path) -> RunLog:
        return RunLog(path, enabled=self.main)

    def steps(self, total: int, start: int = 0, **kwargs: Any) -> StepLoop:
        """The step loop of a stage (training.lifecycle.loop.StepLoop), logging into this run's log by default."""
        return StepLoop(self, total, start, **kwargs)

    def epoch(self, loader, epoch: int, step: int, **kwargs: Any) -> EpochLoop:
        """The batches of one epoch (training.lifecycle.loop.EpochLoop); `step` counts the steps before it."""
        return EpochLoop(self, loader, epoch, step, **kwargs)

    def finish(self, summary: dict) -> dict:
        """summary.json (plain JSON: a non-finite number is null) and run.yaml `finished` (rank 0); returns
        `summary`."""
        if self.main:
            write_text(
                self.run_dir / "summary.json", json.dumps(json_ready(summary), indent=2, allow_nan=False)
            )
            mark_run(self.run_dir, status="finished")
        return summary
