"""Loading a model family's checkpoint by its sidecar `kind`, from a `.safetensors` file or a run directory."""

from __future__ import annotations

import os
from pathlib import Path

from core.checkpoint import load_weights, read_meta
from core.errors import UserError


def resolve_weights(path: str | os.PathLike, run_file: str) -> Path:
    """`path` itself, or `path/run_file` when `path` is a run directory."""
    path = Path(path)
    if path.is_dir():
        weights = path / run_file
        if not weights.is_file():
            raise UserError(
                f"{path} is a folder without {run_file}: pass a checkpoint .safetensors or a run folder"
            )
        return weights
    return path


def checkpoint_kind(path: str | os.PathLike) -> str | None:
    """The `kind` its sidecar declares (None when it declares none)."""
    return read_meta(path).get("kind")


def load_kind(path: str | os.PathLike, kind: str, what: str, device: str = "cpu") -> tuple[dict, dict]:
    """`(state_dict, meta)` of a checkpoint whose sidecar says `kind`; one-line UserError for any other."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    found = checkpoint_kind(path)
    if found != kind:
        raise UserError(f"{path} is not a {what} checkpoint (kind: {found!r}, expected {kind!r})")
    return load_weights(path, device=device)
