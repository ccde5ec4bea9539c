"""Batch samplers for step-based training that resume where the step counter says.

`ShuffledSteps`: step s is batch `s % per_epoch` of epoch `s // per_epoch` of a DistributedSampler shuffle
seeded by (seed, epoch), so every image is seen once per epoch. `DrawnSteps`: each step's indices are drawn
with replacement from a generator seeded by (seed, step, rank), independent of every other step. Either way
a run resumed at step s draws exactly what an uninterrupted run draws from there on.
"""

from __future__ import annotations

import torch
from torch.utils.data import DistributedSampler, Sampler

from core.errors import UserError
from core.seeding import derive_seed


class ShuffledSteps(Sampler):
    """Index batches of one rank for steps `start`, `start+1`, ... without end (epochs of shuffled data)."""

    def __init__(self, dataset, batch_size: int, rank: int, world_size: int, seed: int, start: int = 0):
        self.sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed
        )
        self.batch_size = batch_size
        self.per_epoch = self.sampler.num_samples // batch_size
        if self.per_epoch == 0:
            raise UserError(
                f"the training set has {len(dataset)} images, fewer than one batch of {batch_size} per process; "
                "lower --batch-size"
            )
        self.start = start

    def __iter__(self):
        step, epoch, order = self.start, None, []
        while True:
            if step // self.per_epoch != epoch:
                epoch = step // self.per_epoch
                self.sampler.set_epoch(epoch)
                order = list(self.sampler)
            k = step % self.per_epoch
            yield order[k * self.batch_size : (k + 1) * self.batch_size]
            step += 1


class DrawnSteps(Sampler):
    """Index batches for steps `start` .. `stop - 1`, each drawn with replacement from (seed, step, rank)."""

    def __init__(self, n: int, batch: int, seed: int, rank: int, start: int, stop: int):
        self.n, self.batch, self.seed, self.rank, self.start, self.stop = n, batch, seed, rank, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self):
        for step in range(self.start, self.stop):
            g = torch.Generator().manual_seed(derive_seed(self.seed, "batch", step, self.rank))
            yield torch.randint(0, self.n, (self.batch,), generator=g).tolist()
