"""A keyed cache of analysis arrays: no stale reads, no pickle.

The key is the sha256 of everything that produced the arrays (the model's content hash, the data identity and
the options), so a changed bundle, dataset, split or option is a miss by construction. An entry is a `.npz`
(read with `allow_pickle=False`) plus a `.json` sidecar naming the key, the identity and each array's shape;
both are written atomically, the sidecar last, so a killed writer leaves no entry that reads as complete.
Entries live under `$BIOVIS_CACHE`, else `~/.cache/biovis/`, in `analysis/<kind>/`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.atomic import atomic_path, write_text
from core.cachedir import cache_root


def cache_key(identity: dict[str, Any]) -> str:
    """sha256 of the identity as canonical JSON (sorted keys; paths and other objects as strings)."""
    text = json.dumps(identity, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class CacheResult:
    arrays: dict[str, np.ndarray]
    hit: bool
    key: str
    path: Path  # the .npz file


def _paths(kind: str, key: str) -> tuple[Path, Path]:
    folder = cache_root() / "analysis" / kind
    return folder / f"{key}.npz", folder / f"{key}.json"


def load_entry(kind: str, key: str) -> dict[str, np.ndarray] | None:
    """The arrays stored under `key`, or None when absent, incomplete or not what the sidecar describes."""
    npz_path, json_path = _paths(kind, key)
    if not (npz_path.is_file() and json_path.is_file()):
        return None
    try:
        info = json.loads(json_path.read_text(encoding="utf-8"))
        with np.load(npz_path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError):
        return None
    shapes = {name: list(a.shape) for name, a in arrays.items()}
    if info.get("key") != key or info.get("shapes") != shapes:
        return None
    return arrays


def save_entry(kind: str, key: str, identity: dict[str, Any], arrays: dict[str, np.ndarray]) -> Path:
    """Write the `.npz`, then the sidecar that makes it a complete entry; both atomically."""
    arrays = {name: np.asarray(a) for name, a in arrays.items()}
    if any(a.dtype.hasobject for a in arrays.values()):
        raise TypeError("cache entries hold plain numeric/bool/str arrays only (object arrays would pickle)")
    npz_path, json_path = _paths(kind, key)
    with atomic_path(npz_path, suffix=".npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    info = {"key": key, "identity": identity, "shapes": {n: list(np.shape(a)) for n, a in arrays.items()}}
    write_text(json_path, json.dumps(info, indent=2, default=str))
    return npz_path


def cached_arrays(
    kind: str,
    identity: dict[str, Any],
    compute: Callable[[], dict[str, np.ndarray]],
    force: bool = False,
) -> CacheResult:
    """The arrays for `identity`: read from the cache, or computed (always when `force`) and stored."""
    key = cache_key({"kind": kind, **identity})
    npz_path, _ = _paths(kind, key)
    if not force:
        arrays = load_entry(kind, key)
        if arrays is not None:
            return CacheResult(arrays, True, key, npz_path)
    arrays = {name: np.asarray(a) for name, a in compute().items()}
    save_entry(kind, key, identity, arrays)
    return CacheResult(arrays, False, key, npz_path)
