"""Dataclass configs with YAML presets and validated overrides.

A preset file maps preset names (`tiny`, `cub`, ...) to field values of one dataclass, and its `defaults` key
maps each dataset to the preset it trains with when none is named. CLI options that the user gave override
preset fields; the resolved config is saved in the run directory.

A config may embed blocks, fields whose default is itself a dataclass (every trainer's `data` and `hardware`).
Their fields are named without the block wherever values come from (a preset's `image_size: 32`, an option,
a run's config.yaml written before the blocks existed): `build` moves them into their block (`nest`), and
`flat` reads a config back under those names. A name is therefore unique over a config and its blocks.
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
DEFAULTS = "defaults"  # the key of a preset file that maps each dataset to its preset (not a preset itself)


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


def load_presets(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """(the presets of a file by name, its `defaults`: dataset -> preset name), from one read."""
    presets = read_yaml(path, {})
    if not isinstance(presets, dict):
        raise UserError(f"{path} is not a mapping of preset names to settings")
    defaults = presets.pop(DEFAULTS, None) or {}
    return presets, defaults


def from_preset(
    cls: type[T],
    path: str | os.PathLike,
    name: str | None,
    overrides: dict[str, Any] | None = None,
    dataset: str = "world",
) -> T:
    """Build `cls` from preset `name` of the YAML file at `path` (None: the preset its `defaults` names for
    `dataset`), then apply non-None `overrides`."""
    presets, defaults = load_presets(path)
    if name is None:
        if dataset not in defaults:
            raise UserError(
                f"{Path(path).name} names no preset for --dataset {dataset}: choose one with --preset"
            )
        name = defaults[dataset]
    if name not in presets:
        raise UserError(f"unknown preset {name!r} in {Path(path).name}; choices: {', '.join(presets)}")
    values = nest(cls, dict(presets[name] or {}))
    for key, value in nest(cls, {k: v for k, v in (overrides or {}).items() if v is not None}).items():
        values[key] = {**values[key], **value} if key in blocks(cls) else value
    return build(cls, values, source=f"preset {name!r}")


def blocks(cls: type) -> dict[str, Any]:
    """The embedded blocks of a config class: field name -> the block's default instance."""
    found = {}
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            if dataclasses.is_dataclass(default):
                found[f.name] = default
    return found


def nest(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """`values` with the flat names of block fields moved into their block (see the module docstring)."""
    values = dict(values)
    top = {f.name for f in dataclasses.fields(cls)}
    for name, default in blocks(cls).items():
        given = values.get(name)
        block = dict(given) if isinstance(given, dict) else {}
        for key in (f.name for f in dataclasses.fields(default)):
            if key in values and key not in top:
                block[key] = values.pop(key)
        values[name] = block
    return values


def build(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Instantiate a dataclass from a dict (flat names of block fields allowed), refusing unknown keys and
    non-finite numbers with a clear message."""
    values = nest(cls, values)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    retired = [k for k in unknown if k in getattr(cls, "RETIRED", {})]
    if retired:  # settings of an earlier design of the model, which says why they no longer apply
        raise UserError(f"{source}: {cls.RETIRED[retired[0]]}")
    if unknown:
        raise UserError(f"{source} has unknown setting(s) {', '.join(unknown)} for {cls.__name__}")
    for name, default in blocks(cls).items():
        values[name] = build(type(default), {**dataclasses.asdict(default), **values[name]}, source)
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{option_name(name)} must be a finite number, got {value}")
    return cls(**values)


def flat(config: Any) -> dict[str, Any]:
    """A config's settings under their flat names (block fields without their block)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out.update(flat(value) if dataclasses.is_dataclass(value) else {f.name: value})
    return out


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


def validate_blocks(config: Any) -> None:
    """Validate each embedded block of `config` that can validate itself (data, hardware)."""
    for name in blocks(type(config)):
        block = getattr(config, name)
        if hasattr(block, "validate"):
            block.validate()


def saved_settings(config: dict | None) -> dict[str, Any]:
    """A config as a run saved it (config.yaml, a weights sidecar's `config`), flat whatever its version:
    the fields of its blocks (`data`, `hardware`) beside the others."""
    out: dict[str, Any] = {}
    for key, value in (config or {}).items():
        if key in ("data", "hardware") and isinstance(value, dict):
            out.update(value)
        else:
            out[key] = value
    return out
