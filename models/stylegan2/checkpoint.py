"""StyleGAN2 generator checkpoints: `.safetensors` weights + YAML sidecar (architecture and provenance).

The sidecar holds `kind: stylegan2-generator`, `generator:` (the plain `G.config` dict, enough to rebuild the
architecture), the headline dimensions (`img_resolution`, `z_dim`, `w_dim`, `num_ws`) and provenance
(`dataset`, `source` such as `train gan` or `import-gan <sha256>`, `kimg`, `metrics`). Loading rebuilds the
architecture from the sidecar and checks every tensor name and shape before any weight is used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from core.checkpoint import load_state_dict_checked, load_weights, save_weights
from core.errors import UserError
from models.stylegan2.networks import Generator

KIND = "stylegan2-generator"
RUN_DIR_WEIGHTS = "G_ema.safetensors"  # what a `train gan` run directory holds (the final EMA generator)


def generator_meta(G: Generator) -> dict[str, Any]:
    """The architecture part of the sidecar: kind, full config and the dimensions users check against."""
    return {
        "kind": KIND,
        "generator": G.config,
        "img_resolution": int(G.img_resolution),
        "z_dim": int(G.z_dim),
        "w_dim": int(G.w_dim),
        "num_ws": int(G.num_ws),
    }


def save_generator(path: str | os.PathLike, G: Generator, meta: dict[str, Any] | None = None) -> Path:
    """Write G's weights (atomically) with a sidecar of `meta` (provenance) plus the architecture fields."""
    return save_weights(path, G.state_dict(), {**(meta or {}), **generator_meta(G)})


def resolve_generator_path(path: str | os.PathLike) -> Path:
    """A `.safetensors` file, or a `train gan` run directory (its final `G_ema.safetensors`)."""
    path = Path(path)
    if path.is_dir():
        weights = path / RUN_DIR_WEIGHTS
        if not weights.is_file():
            raise UserError(f"{path} is a folder without {RUN_DIR_WEIGHTS}: pass a generator .safetensors")
        return weights
    return path


def load_generator(
    path: str | os.PathLike, device: str | torch.device = "cpu", expect: dict[str, int] | None = None
) -> tuple[Generator, dict[str, Any]]:
    """`(G, meta)` from a generator checkpoint or run directory; G in eval mode with requires_grad False.

    `expect` (e.g. `{"img_resolution": 256, "w_dim": 512}`) names dimensions the caller needs; any that
    differ raise a `UserError` naming both values. A sidecar of another kind, an unbuildable config or
    tensors that do not fit the config also raise `UserError`.
    """
    path = resolve_generator_path(path)
    state, meta = load_weights(path, device="cpu")
    if meta.get("kind") != KIND:
        raise UserError(
            f"{path} is not a StyleGAN2 generator checkpoint (kind: {meta.get('kind')!r}, expected {KIND!r})"
        )
    config = meta.get("generator")
    if not isinstance(config, dict):
        raise UserError(f"{path}: the sidecar has no generator config")
    try:
        G = Generator(**config)
    except (TypeError, ValueError) as err:
        raise UserError(f"{path}: the sidecar's generator config cannot be built: {err}") from None
    actual = generator_meta(G)
    stale = [k for k in ("img_resolution", "z_dim", "w_dim", "num_ws") if k in meta and meta[k] != actual[k]]
    if stale:
        diffs = ", ".join(f"{k} {meta[k]} in the sidecar vs {actual[k]} in its config" for k in stale)
        raise UserError(f"{path}: inconsistent sidecar: {diffs}")
    differ = [(k, actual[k], v) for k, v in (expect or {}).items() if actual.get(k) != v]
    if differ:
        diffs = ", ".join(f"{k} is {got}, expected {want}" for k, got, want in differ)
        raise UserError(f"generator {path} does not match: {diffs}")
    load_state_dict_checked(G, state, str(path))
    G = G.eval().requires_grad_(False).to(device)
    return G, meta
