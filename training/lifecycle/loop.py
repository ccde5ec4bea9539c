"""The step loop of one training stage, and the device-side loss window it logs from.

`for index in StepLoop(...)` runs steps `start` .. `total - 1`. Before each step it seeds torch's generator
from (seed, seed_key, index, rank), so a step draws the same numbers whether or not the run was resumed;
inside the step, `loop.step` is the count of steps done once it ends (what log lines and checkpoints record).
The body trains and calls `loop.log(...)` with the step's losses as device tensors: they are summed on the
device and read with one host sync per `log_every` steps, where they must be finite (`TrainingDiverged`
otherwise, after the line that shows it was written). Between two steps the loop asks core.preemption whether
a stop was signalled; if so `save()` writes the resume state (rank 0), the run is marked preempted and the
process exits for requeue.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from core.errors import TrainingDiverged
from core.progress import Progress
from core.seeding import derive_seed

if TYPE_CHECKING:
    from core.runlog import RunLog
    from training.lifecycle.run import TrainingRun


class LossWindow:
    """Named scalars summed on the device between two log lines (weighted: `sum / weight` is the mean), and
    the latest value of others (penalties computed every few steps, kept until the next one); read with one
    host sync."""

    def __init__(self, state: dict | None = None) -> None:
        self.names: list[str] | None = None
        self.sums: torch.Tensor | None = None
        self.weight = 0.0
        self.latest: dict[str, torch.Tensor] = {}
        if state:
            self.names, self.weight = state["names"], state["weight"]
            self.sums, self.latest = state["sums"], dict(state["latest"])

    def add(self, values: dict[str, torch.Tensor], weight: float = 1.0, latest: dict | None = None) -> None:
        stacked = torch.stack([v.detach().reshape(()).double() for v in values.values()])
        if self.sums is None:
            self.names, self.sums = list(values), stacked
        else:
            self.sums = self.sums.to(stacked.device) + stacked
        self.weight += weight
        self.latest.update({k: v.detach() for k, v in (latest or {}).items()})

    def empty(self) -> bool:
        return self.sums is None

    def read(self) -> tuple[dict[str, float], dict[str, Any]]:
        """(means, latest values) as Python numbers (lists for non-scalars), then start a new window."""
        flat = [self.sums / max(self.weight, 1e-12)] if self.sums is not None else []
        flat += [v.double().reshape(-1) for v in self.latest.values()]
        values = torch.cat(flat).tolist() if flat else []  # the one host sync of a log interval
        names = self.names or []
        means = dict(zip(names, values[: len(names)], strict=True))
        latest, at = {}, len(names)
        for key, tensor in self.latest.items():
            size = tensor.numel()
            latest[key] = values[at] if tensor.dim() == 0 else values[at : at + size]
            at += size
        self.names, self.sums, self.weight = None, None, 0.0
        return means, latest

    def finite(self) -> bool:
        """Whether every sum is finite (one host sync; true for an empty window)."""
        return self.sums is None or bool(torch.isfinite(self.sums).all())

    def state(self) -> dict:
        """Tensors and plain values for the resume state, so a resumed run logs what an uninterrupted one does."""
        sums = self.sums.cpu() if self.sums is not None else None
        return {"names": self.names, "sums": sums, "weight": self.weight,
                "latest": {k: v.cpu() for k, v in self.latest.items()}}  # fmt: skip


class StepLoop:
    """Steps `start` .. `total - 1` of one stage; see the module docstring.

    `samples_per_step`: images (or records) per step over all processes, for the throughput field `rate_key`.
    `seed_key`: the stage's name in the per-step seed (None: the trainer seeds itself). `stage`: written into
    every log line of the stage (and, on resume, the stage's lines after `start` are dropped from the log, which
    the resumed run writes again). `fields()`: extra values for each train log line (learning rate, epoch...).
    `save()`: writes the resume state (rank 0) when a preemption signal comes. `log_last`: a line at the last
    step too. `state`: the resume state the run was loaded from (its loss window is restored, so a resumed
    run writes the log lines an uninterrupted one writes).
    """

    def __init__(
        self,
        run: TrainingRun,
        total: int,
        start: int = 0,
        *,
        name: str,
        log_every: int,
        samples_per_step: int,
        save: Callable[[], object],
        seed_key: str | None = "step",
        stage: str | None = None,
        log: RunLog | None = None,
        fields: Callable[[], dict] | None = None,
        rate_key: str = "images_per_s",
        log_last: bool = True,
        state: dict | None = None,
        what: str = "the training loss",
        hint: str = "lower --lr",
    ) -> None:
        self.run, self.total, self.start, self.name = run, total, start, name
        self.log_every, self.samples_per_step, self.save = log_every, samples_per_step, save
        self.seed_key, self.stage, self.fields, self.rate_key = seed_key, stage, fields, rate_key
        self.log_last, self.what, self.hint = log_last, what, hint
        self.runlog = log if log is not None else run.log
        self.window = LossWindow((state or {}).get("window"))
        self.step = start
        self._steps_since, self._tick, self._paused, self._updated = 0, time.time(), 0.0, False
        if run.resume and run.main and self.truncates:
            self.runlog.truncate_after(start, stage=stage)

    truncates = (
        True  # on resume, drop the stage's log lines past `start` (an EpochLoop leaves that to begin())
    )

    def __iter__(self) -> Iterator[int]:
        def steps(bar: Progress) -> Iterator[int]:
            for index in range(self.start, self.total):
                if self.seed_key is not None:
                    torch.manual_seed(derive_seed(self.run.cfg.seed, self.seed_key, index, self.run.rank))
                self.step = index + 1
                yield index

        return self._drive(max(self.total - self.start, 0), self.name, steps)

    def _drive(
        self, length: int, description: str, items: Callable[[Progress], Iterator[Any]]
    ) -> Iterator[Any]:
        """Yield `items(bar)` under a progress bar, this loop being the run's current one: a step the body did
        not log still moves the bar, and a requested stop is honoured between two items."""
        run = self.run
        previous, run.loop = run.loop, self
        try:
            with Progress(length, description, enabled=run.main and not run.quiet) as bar:
                self.bar = bar
                for item in items(bar):
                    self._updated = False
                    yield item
                    if not self._updated:
                        bar.update(1)
                    run.preempt.check(self.step, self.save)
        finally:
            run.loop = previous

    def due(self, every: int) -> bool:
        """Whether a cadence of `every` steps falls on this step (the last step always counts)."""
        return self.step % every == 0 or self.step == self.total

    def log(self, values: dict[str, torch.Tensor], *, weight: float = 1.0, latest: dict | None = None,
            show: tuple[str, ...] | None = None) -> dict[str, float] | None:  # fmt: skip
        """Add the step's losses (device tensors) to the window; on a log step write their means (one sync) and
        return them. Non-finite means: the line is written, then `TrainingDiverged`. `show`: the keys the
        progress bar displays (default all means)."""
        self._advance()
        self.window.add(values, weight, latest)
        self._steps_since += 1
        self._updated = True
        if not self._log_due():
            self.bar.update(1)
            return None
        means, latest_values = self.window.read()
        elapsed = max(time.time() - self._tick - self._paused, 1e-9)
        rate = round(self._steps_since * self.samples_per_step / elapsed, 2)
        extra = self.fields() if self.fields is not None else {}
        stage = {"stage": self.stage} if self.stage is not None else {}
        self.runlog.write(
            self.step, "train", **stage, **extra, **means, **latest_values, **{self.rate_key: rate}
        )
        bad = [k for k, v in means.items() if not math.isfinite(v)]
        if bad:
            raise TrainingDiverged(f"{self.what} ({', '.join(bad)})", self.step, self.hint)
        self._steps_since, self._tick, self._paused = 0, time.time(), 0.0
        keys = show if show is not None else tuple(means)
        self.bar.update(1, **{k: means[k] for k in keys if k in means})  # shown to 4 significant digits
        return means

    def check_finite(self) -> None:
        """Before a save: nothing trained on a non-finite loss since the last log line (one host sync)."""
        if not self.window.finite():
            raise TrainingDiverged(self.what, self.step, self.hint)

    @contextlib.contextmanager
    def paused(self):
        """Evaluation or snapshots inside: their time does not count in the throughput."""
        began = time.time()
        try:
            yield
        finally:
            self._paused += time.time() - began

    def resume_fields(self) -> dict:
        """What the loop adds to a resume state saved while it runs."""
        return {"window": self.window.state()}

    def _advance(self) -> None:
        """A step was taken (before its losses are logged)."""

    def _log_due(self) -> bool:
        return self.step % self.log_every == 0 or (self.log_last and self.step == self.total)


class EpochLoop(StepLoop):
    """The batches of epoch `epoch` of a DataLoader with a DistributedSampler: epoch-style training, where the
    random stream (augmentation drawn on the device) runs through the epoch instead of being seeded per step.

    Before the epoch, torch is seeded from (seed, epoch, rank) and the sampler set to the epoch. Each yielded
    batch is one step once the body calls `log` (a batch without images may be passed over: no step). A resume
    state saved mid-epoch records the batches consumed and the random state; resuming replays those batches'
    data without training on them, then restores the random state (under DDP only rank 0's was saved: each
    rank reseeds from (seed, epoch, rank, batches), exact on one process), so the run goes on as it would have.
    """

    truncates = False

    def __init__(self, run: TrainingRun, loader, epoch: int, step: int, *, epochs: int, state: dict | None = None,
                 **kwargs: Any) -> None:  # fmt: skip
        mid = state if state is not None and state.get("epoch") == epoch and state.get("batch") else None
        super().__init__(run, step + len(loader), step, seed_key=None, state=mid, log_last=False, **kwargs)
        self.loader, self.epoch, self.epochs = loader, epoch, epochs
        self.batches_done = mid["batch"] if mid else 0
        self._rng = (mid["rng"], mid.get("cuda_rng")) if mid else None

    def __iter__(self) -> Iterator[Any]:
        run = self.run
        torch.manual_seed(derive_seed(run.cfg.seed, self.epoch, run.rank))
        self.loader.sampler.set_epoch(self.epoch)

        def batches(bar: Progress) -> Iterator[Any]:
            remaining = iter(self.loader)
            if self.batches_done:
                bar.update(sum(1 for _ in itertools.islice(remaining, self.batches_done)))
                self._restore_random_state()
            for batch in remaining:
                self.batches_done += 1
                yield batch

        return self._drive(len(self.loader), f"epoch {self.epoch + 1}/{self.epochs}", batches)

    def _restore_random_state(self) -> None:
        run = self.run
        if run.world == 1:  # states loaded onto the device: the generators take host tensors
            cpu, cuda = self._rng
            torch.set_rng_state(cpu.cpu())
            if run.cuda and cuda is not None:
                torch.cuda.set_rng_state(cuda.cpu(), run.device)
        else:
            torch.manual_seed(derive_seed(run.cfg.seed, self.epoch, run.rank, self.batches_done))

    def _advance(self) -> None:
        self.step += 1

    def _log_due(self) -> bool:
        return self.step % self.log_every == 0

    def resume_fields(self) -> dict:
        cuda = torch.cuda.get_rng_state(self.run.device) if self.run.cuda else None
        return {
            **super().resume_fields(),
            "batch": self.batches_done,
            "rng": torch.get_rng_state(),
            "cuda_rng": cuda,
        }
