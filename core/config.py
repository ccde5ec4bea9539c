"""Dataclass configs with YAML presets and validated overrides.

A preset file maps preset names (`tiny`, `cub`, ...) to field values of one dataclass. CLI options that
the user gave override preset fields; the resolved config is saved in the run directory.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml

from core.errors import UserError

T = TypeVar("T")


def load_presets(path: str | os.PathLike) -> dict[str, dict]:
    with open(path, encoding="utf-8") as f:
        presets = yaml.safe_load(f) or {}
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
    return cls(**values)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def to_yaml(config: Any) -> str:
    data = config if isinstance(config, dict) else to_dict(config)
    return yaml.safe_dump(data, sort_keys=False)


def require_positive(config: Any, *names: str) -> None:
    """UserError if any of the named numeric fields is not > 0."""
    for name in names:
        value = getattr(config, name)
        if value is None or value <= 0:
            option = "--" + name.replace("_", "-")
            raise UserError(f"{option} must be positive, got {value}")
