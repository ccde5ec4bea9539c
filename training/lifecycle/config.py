"""What every trainer's config holds for the lifecycle, and how it is validated.

`TrainerConfig` is the base of the six trainers' configs. Its fields are the ones the lifecycle and the loop
read of any trainer: where it computes (`hardware`), the seed every random draw derives from (`seed`) and how
many steps one log line averages (`log_every`). A trainer's config subclasses it (a dataclass), adds its own
fields (its `data` block among them) and its own checks in `check()`; a different default is a field
declared again (`seed: int = 42`). `validate()` checks the blocks, the log cadence and every learning rate
(`LEARNING_RATES`) the same way for all of them, then calls `check()`. The trainer's recipes are in
training/presets/<PRESETS>.yaml: `preset(name, overrides)` builds one, and without a name the one that the
file's `defaults` names for the dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from core.config import MAX_LR, from_preset, require_positive, require_range, validate_blocks
from core.device import HardwareConfig

PRESET_DIR = Path(__file__).parents[1] / "presets"


@dataclass
class TrainerConfig:
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    seed: int = 0
    log_every: int = 50

    LEARNING_RATES: ClassVar[tuple[str, ...]] = ("lr",)  # the fields that are an optimiser's step size
    PRESETS: ClassVar[str] = ""  # its recipes: training/presets/<PRESETS>.yaml

    @classmethod
    def presets_file(cls) -> Path:
        return PRESET_DIR / f"{cls.PRESETS}.yaml"

    @classmethod
    def preset(cls, name: str | None = None, overrides: dict[str, Any] | None = None):
        """The config of preset `name` (None: the one its file names for the dataset of `overrides`, by
        default the world), then the `overrides` that are not None."""
        dataset = (overrides or {}).get("dataset") or "world"
        return from_preset(cls, cls.presets_file(), name, overrides, dataset)

    def validate(self) -> None:
        validate_blocks(self)
        require_positive(self, "log_every", *self.LEARNING_RATES)
        for name in self.LEARNING_RATES:
            require_range(self, name, 0, MAX_LR)
        self.check()

    def check(self) -> None:
        """The trainer's own checks (after the shared ones)."""
