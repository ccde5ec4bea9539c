"""Checkpoint I/O. Weights: `.safetensors` + a YAML sidecar (architecture config and provenance).
Resume state: `torch.save` of tensors and plain values only, loaded with `weights_only=True`.
Every write is atomic, so a killed job never leaves a half-written checkpoint as the newest one.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from core.atomic import atomic_file, atomic_path, write_text
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
    """Write `state_dict` as safetensors and `meta` (architecture, provenance, metrics) as YAML beside it.
    A failed write (a full disk) raises an OSError naming `path`; the previous weights stay as they were."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    # safetensors refuses shared or non-contiguous storage: give every tensor its own contiguous copy.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    meta = dict(meta)
    meta.setdefault("git_commit", git_commit())
    with atomic_path(path, suffix=".safetensors") as tmp:
        try:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        except SafetensorError as err:  # an I/O failure in safetensors' Rust writer: the OSError it was
            code = re.search(r"os error (\d+)", str(err))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(tmp)) from None
    write_text(sidecar_path(path), yaml.safe_dump(meta, sort_keys=False))
    return path


def read_meta(path: str | os.PathLike) -> dict:
    from core.config import read_yaml

    side = sidecar_path(path)
    if not side.is_file():
        raise UserError(f"{path} has no sidecar {side.name}: it was not written by this toolkit")
    meta = read_yaml(side, {})
    if not isinstance(meta, dict):
        raise UserError(f"{side} is not a mapping of settings: it was not written by this toolkit")
    return meta


def sniff_format(path: str | os.PathLike) -> str:
    """What a weights file is, from its first bytes: safetensors, torch (zip), pickle or unknown."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "torch"
    if len(head) > 8 and head[8:9] == b"{":  # before the pickle test: a header length may end in byte 0x80
        size = int.from_bytes(head[:8], "little")
        if 0 < size <= os.path.getsize(path) - 8:
            return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def load_error_reason(err: Exception) -> str:
    """torch.load's error in one short line. A refused pickle says so, without torch's advice to re-run
    with `weights_only=False` (which would execute the file's code)."""
    text = str(err).strip()
    if text.startswith("Weights only load failed"):
        found = re.search(r"unsupported global:? (?:GLOBAL )?([\w.]+)", text, re.IGNORECASE)
        if found:
            return (
                f"it holds Python objects besides tensors ({found.group(1)}); refused, nothing was executed"
            )
        return "it is not a tensors-only torch file (refused, nothing was executed)"
    first = text.splitlines()[0] if text else type(err).__name__
    return first[:200]


def load_weights(path: str | os.PathLike, device: str = "cpu") -> tuple[dict, dict]:
    """Read `(state_dict, meta)` of a `.safetensors` checkpoint written by `save_weights`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder; pass the .safetensors file or a run folder")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    kind = sniff_format(path)
    if kind in ("torch", "pickle"):
        raise UserError(
            f"{path} is a torch.save file (a VisCoIN bundle or a resume state?), not .safetensors weights"
        )
    try:
        state = load_file(str(path), device=device)
    except (SafetensorError, OSError) as err:
        raise UserError(f"cannot read checkpoint {path}: {err}") from None
    return state, read_meta(path)


def load_foreign_state_dict(path: str | os.PathLike) -> dict:
    """A bare state dict from `.safetensors` or a `.pt/.pth` file, the latter with `weights_only=True`."""
    import torch

    path = Path(path)
    if path.is_dir():
        raise UserError(f"weights file {path} is a folder; pass a .safetensors, .pt or .pth file")
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors" or sniff_format(path) == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise UserError(f"cannot read {path} as safetensors weights: {err}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for foreign or corrupt files
        raise UserError(f"cannot read {path} as plain weights: {load_error_reason(err)}") from None
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
    """Resume state (model, optimiser, schedule, counters): tensors and plain values only. A failed write
    raises an OSError naming `path` (not torch's RuntimeError); the previous state stays as it was."""
    import torch

    path = Path(path)
    with atomic_file(path, suffix=".pt") as f:
        torch.save(state, f)
    return path


def load_state(path: str | os.PathLike, device: str = "cpu") -> dict:
    import torch

    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise UserError(f"cannot read resume state {path}: {load_error_reason(err)}") from None


def file_hash(path: str | os.PathLike, length: int = 16) -> str:
    """Content hash of a file (sha256 prefix): the identity used in cache keys and manifests."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]
