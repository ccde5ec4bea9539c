"""Dataclass configs with YAML presets and validated overrides.

A preset file maps preset names (`tiny`, `cub`, ...) to field values of one dataclass. CLI options that
the user gave override preset fields; the resolved config is saved in the run directory.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml

from core.errors import UserError

T = TypeVar("T")
MAX_LR = 10.0  # no optimiser here trains with a larger step; beyond it the first update overflows


def read_yaml(path: str | os.PathLike, default: Any = None) -> Any:
    """A YAML file of plain data. Tags (`!!python/...`) and syntax errors are refused in one line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except PermissionError:
        raise UserError(f"cannot read {path}: permission denied") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{path} is not plain YAML data{where}: {problem}") from None
    return default if data is None else data


def load_presets(path: str | os.PathLike) -> dict[str, dict]:
    presets = read_yaml(path, {})
    if not isinstance(presets, dict):
        raise UserError(f"{path} is not a mapping of preset names to settings")
    return presets


def from_preset(
    cls: type[T], path: str | os.PathLike, name: str, overrides: dict[str, Any] | None = None
) -> T:
    """Build `cls` from preset `name` of the YAML file at `path`, then apply non-None `overrides`."""
    presets = load_presets(path)
    if name not in presets:
        raise UserError(f"unknown preset {name!r} in {Path(path).name}; choices: {', '.join(presets)}")
    values = dict(presets[name] or {})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return build(cls, values, source=f"preset {name!r}")


def build(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Instantiate a dataclass from a dict, refusing unknown keys with a clear message."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"{source} has unknown setting(s) {', '.join(unknown)} for {cls.__name__}")
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{option_name(name)} must be a finite number, got {value}")
    return cls(**values)


def option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def to_yaml(config: Any) -> str:
    data = config if isinstance(config, dict) else to_dict(config)
    return yaml.safe_dump(data, sort_keys=False)


def require_positive(config: Any, *names: str) -> None:
    """UserError if any of the named numeric fields is not a finite number > 0."""
    for name in names:
        value = getattr(config, name)
        if value is None or not value > 0 or not math.isfinite(value):
            raise UserError(f"{option_name(name)} must be positive, got {value}")


def require_range(
    config: Any, name: str, low: float, high: float | None = None, optional: bool = False
) -> None:
    """UserError naming the valid range if the field is outside [low, high] (None: allowed if `optional`)."""
    value = getattr(config, name)
    if value is None and optional:
        return
    inside = value is not None and math.isfinite(value) and value >= low and (high is None or value <= high)
    if not inside:
        valid = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise UserError(f"{option_name(name)} must be {valid}, got {value}")


def require_per_process(config: Any, *names: str) -> int:
    """UserError unless each named count (images per step over all processes) splits evenly over the
    processes of this launch (torchrun/srun); returns the number of processes."""
    from core.distributed import dist_env

    world = dist_env().world_size
    for name in names:
        if getattr(config, name) % world:
            raise UserError(
                f"{option_name(name)} {getattr(config, name)} is not divisible by the {world} processes"
            )
    return world
