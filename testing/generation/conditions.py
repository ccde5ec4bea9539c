"""Turning what a user types into conditions: class and species names, attribute values, seeds."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from core.errors import UserError
from datasets.phylogeny import name_key, suggest

MISSING = {"", "?", "-", "_"}
CLASS_ID = re.compile(r"^(\d+)\.")  # an attribute left out in a full --attrs vector


def resolve_class(text: str, class_names: list[str], what: str = "class") -> int:
    """Index of a class given by its name (with or without CUB's 'NNN.' prefix, '_' or blanks), by its CUB id
    (the NNN of 'NNN.Name') or, for names without ids, by its 0-based index."""
    if text in class_names:
        return class_names.index(text)
    keys = [name_key(n) for n in class_names]
    if name_key(text) in keys:
        return keys.index(name_key(text))
    if text.isdigit():
        ids = [int(m.group(1)) if (m := CLASS_ID.match(n)) else None for n in class_names]
        if all(i is not None for i in ids):  # CUB-style names "001.Name": the number is the class id
            if int(text) in ids:
                return ids.index(int(text))
        elif int(text) < len(class_names):
            return int(text)
    raise UserError(f"unknown {what} {text!r}; {suggest(text, class_names)}")


MAX_VALUE = 1e6  # |attribute value|: far beyond any data's scale, and a float32 after every layer


def parse_value(text: str, option: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{option}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise UserError(f"{option}: {text!r} is not a finite number")
    if abs(value) > MAX_VALUE:
        raise UserError(f"{option}: {text} is out of range; give a value within +-{MAX_VALUE:g} (attributes are "
                        "presence values, 0 or 1, or the data's own scale)")  # fmt: skip
    return value


def parse_attribute_pairs(pairs: list[str], names: list[str]) -> dict[int, float]:
    """`NAME=VALUE` items -> {attribute index: value}; unknown names get the closest suggested."""
    if pairs and not names:
        raise UserError("--attr: this checkpoint was trained without attribute conditions")
    given: dict[int, float] = {}
    for pair in pairs:
        name, sep, value = pair.rpartition("=")
        if not sep or not name:
            raise UserError(f"--attr takes NAME=VALUE (e.g. {names[0]}=1), got {pair!r}")
        if name not in names:
            raise UserError(f"--attr: unknown attribute {name!r}; {suggest(name, names)}")
        given[names.index(name)] = parse_value(value, f"--attr {name}")
    return given


def parse_attribute_vector(text: str, names: list[str]) -> dict[int, float]:
    """A full comma-separated vector, one entry per attribute, '?' (or empty) for the ones not given."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != len(names):
        raise UserError(
            f"--attrs has {len(parts)} values but the checkpoint has {len(names)} attributes "
            f"({names[0]} ... {names[-1]}); use '?' for the ones not given"
            if names
            else "--attrs: this checkpoint was trained without attribute conditions"
        )
    return {i: parse_value(p, f"--attrs entry {i + 1}") for i, p in enumerate(parts) if p not in MISSING}


def check_seed(seed: int, count: int) -> None:
    if seed < 0 or seed + count > 2**32:
        raise UserError(f"--seed must be in [0, {2**32 - count}] for {count} images, got {seed}")


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if value is None or value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")


def uniforms(seeds: list[int], length: int) -> np.ndarray:
    """[len(seeds), length] uniforms in [0, 1), one RandomState(seed) draw per row."""
    return np.stack([np.random.RandomState(int(s)).random_sample(length) for s in seeds])


def load_image(path: str | Path, size: int, option: str = "the image"):
    """One image as a [1, 3, size, size] tensor in [-1, 1] (resized and centre-cropped to a square); a file that
    does not decode is a one-line error naming `option` (these commands read one image, nothing to skip)."""
    from datasets.images import BadImageError, open_rgb
    from datasets.transforms import square_transform

    try:
        return square_transform(size)(open_rgb(path))[None]
    except BadImageError as err:  # decompression bombs included
        reason = err.message.split("; fix or remove it")[0]
        raise UserError(f"{option}: {reason}; give a readable image file") from None
