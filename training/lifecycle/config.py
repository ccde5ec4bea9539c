"""What every trainer's config holds for the lifecycle, and how it is validated.

`TrainerConfig` is the base of the six trainers' configs. Its fields are the ones the lifecycle and the loop
read of any trainer: where it computes (`hardware`), the seed every random draw derives from (`seed`) and how
many steps one log line averages (`log_every`). A trainer's config subclasses it (a dataclass), adds its own
fields (its `data` block among them) and its own checks in `check()`; a different default is a field
declared again (`seed: int = 42`). `validate()` checks the blocks, the log cadence and every learning rate
(`LEARNING_RATES`) the same way for all of them, then calls `check()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from core.config import MAX_LR, require_positive, require_range, validate_blocks
from core.device import HardwareConfig


@dataclass
class TrainerConfig:
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    seed: int = 0
    log_every: int = 50

    LEARNING_RATES: ClassVar[tuple[str, ...]] = ("lr",)  # the fields that are an optimiser's step size

    def validate(self) -> None:
        validate_blocks(self)
        require_positive(self, "log_every", *self.LEARNING_RATES)
        for name in self.LEARNING_RATES:
            require_range(self, name, 0, MAX_LR)
        self.check()

    def check(self) -> None:
        """The trainer's own checks (after the shared ones)."""
