"""Checkpoint I/O. Weights: `.safetensors` + a YAML sidecar (architecture config and provenance).
Resume state: `torch.save` of tensors and plain values only, loaded with `weights_only=True`.
Every write is atomic, so a killed job never leaves a half-written checkpoint as the newest one.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from core.atomic import atomic_path, write_text
from core.errors import UserError


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".yaml")


def git_commit() -> str | None:
    """The source tree's commit, for provenance (None outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def save_weights(path: str | os.PathLike, state_dict: dict, meta: dict[str, Any]) -> Path:
    """Write `state_dict` as safetensors and `meta` (architecture, provenance, metrics) as YAML beside it."""
    from safetensors.torch import save_file

    path = Path(path)
    # safetensors refuses shared or non-contiguous storage: give every tensor its own contiguous copy.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    meta = dict(meta)
    meta.setdefault("git_commit", git_commit())
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_text(sidecar_path(path), yaml.safe_dump(meta, sort_keys=False))
    return path


def read_meta(path: str | os.PathLike) -> dict:
    side = sidecar_path(path)
    if not side.is_file():
        raise UserError(f"{path} has no sidecar {side.name}: it was not written by this toolkit")
    with open(side, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def load_weights(path: str | os.PathLike, device: str = "cpu") -> tuple[dict, dict]:
    """Read `(state_dict, meta)` of a `.safetensors` checkpoint written by `save_weights`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        state = load_file(str(path), device=device)
    except (SafetensorError, OSError) as err:
        raise UserError(f"cannot read checkpoint {path}: {err}") from None
    return state, read_meta(path)


def load_foreign_state_dict(path: str | os.PathLike) -> dict:
    """A bare state dict from `.safetensors` or a `.pt/.pth` file, the latter with `weights_only=True`."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for foreign or corrupt files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read {path} as plain weights: {first}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path} does not hold a state dict")
    return state


def load_state_dict_checked(module, state_dict: dict, source: str) -> None:
    """`load_state_dict(strict=True)` whose failure names the first mismatched keys in one line."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape mismatch " + ", ".join(shapes[:3]))
        if missing:
            parts.append("missing " + ", ".join(missing[:3]))
        if unexpected:
            parts.append("unexpected " + ", ".join(unexpected[:3]))
        raise UserError(f"{source} does not fit this architecture: " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=True)


def save_state(path: str | os.PathLike, state: dict) -> Path:
    """Resume state (model, optimiser, schedule, counters): tensors and plain values only."""
    import torch

    path = Path(path)
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)
    return path


def load_state(path: str | os.PathLike, device: str = "cpu") -> dict:
    import torch

    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read resume state {path}: {first}") from None


def file_hash(path: str | os.PathLike, length: int = 16) -> str:
    """Content hash of a file (sha256 prefix): the identity used in cache keys and manifests."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]
