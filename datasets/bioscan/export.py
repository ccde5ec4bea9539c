"""The synthetic world written as a BIOSCAN HDF5 file, with BIOSCAN-1M's seen/unseen partition.

A seeded share of species is *unseen*: none of their records is trained on. Each seen species' records are
split 70/10/10/10 into `train_seen`, `val_seen`, `test_seen` and `seen_keys`. Unseen species are split by
species into a validation and a test half, and each unseen species' records 50/50 into queries
(`val_unseen`, `test_unseen`) and keys (`val_unseen_keys`, `test_unseen_keys`). `all_keys` pools the seen and
unseen keys (the open-set protocol: every query is searched among all of them), `unseen_keys` pools the
unseen keys (BIOSCAN-5M's name) and `no_split_and_seen_train` is the training set (the world has no records
without a species). Images are the world's PNG files, byte for byte (not re-encoded).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from core.atomic import atomic_path
from core.errors import UserError
from datasets.world import load_barcodes, load_taxonomy

SEEN_SHARES = {"train_seen": 0.7, "val_seen": 0.1, "test_seen": 0.1, "seen_keys": 0.1}
POOLS = {
    "all_keys": ("seen_keys", "val_unseen_keys", "test_unseen_keys"),
    "unseen_keys": ("val_unseen_keys", "test_unseen_keys"),
    "no_split_and_seen_train": ("train_seen",),
}
QUERY_SPLITS = ("val_seen", "val_unseen", "test_seen", "test_unseen")


def _seen_split(records: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """70/10/10/10 of one seen species' records, at least one record in each of val, test and keys."""
    order = rng.permutation(records)
    n = len(order)
    sizes = {name: max(1, round(share * n)) for name, share in SEEN_SHARES.items() if name != "train_seen"}
    out, start = {}, 0
    for name, size in sizes.items():
        out[name], start = order[start : start + size], start + size
    out["train_seen"] = order[start:]
    return out


def partition(class_ids: np.ndarray, unseen_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Record indices per group, from the species (class id) of every record."""
    species = np.unique(class_ids)
    if not 0 < unseen_fraction < 1:
        raise UserError(f"--unseen-fraction must be strictly between 0 and 1, got {unseen_fraction}")
    n_unseen = max(2, round(unseen_fraction * len(species)))
    if len(species) - n_unseen < 1:
        raise UserError(f"the world has {len(species)} species: too few for a seen/unseen partition")
    rng = np.random.default_rng([seed, 11])
    unseen = rng.permutation(species)[:n_unseen]
    val_unseen_species = set(unseen[: (n_unseen + 1) // 2].tolist())
    groups: dict[str, list[np.ndarray]] = {}
    for sp in species:
        records = np.flatnonzero(class_ids == sp)
        if len(records) < 5 and sp not in unseen:
            raise UserError(f"species {sp} has {len(records)} images; the partition needs at least 5")
        if sp in unseen:
            order = rng.permutation(records)
            half = max(1, len(order) // 2)
            prefix = "val" if sp in val_unseen_species else "test"
            parts = {f"{prefix}_unseen": order[:half], f"{prefix}_unseen_keys": order[half:]}
        else:
            parts = _seen_split(records, rng)
        for name, part in parts.items():
            groups.setdefault(name, []).append(part)
    out = {name: np.sort(np.concatenate(parts)) for name, parts in groups.items()}
    for pool, members in POOLS.items():
        out[pool] = np.sort(np.concatenate([out.get(m, np.empty(0, np.int64)) for m in members]))
    return out


def _write_group(
    h5, name: str, rows: np.ndarray, columns: dict[str, np.ndarray], images: list[bytes]
) -> None:
    group = h5.create_group(name)
    width = max([len(images[i]) for i in rows], default=1)
    pixels = np.zeros((len(rows), width), dtype=np.uint8)
    for j, i in enumerate(rows):
        pixels[j, : len(images[i])] = np.frombuffer(images[i], dtype=np.uint8)
    group.create_dataset(
        "image", data=pixels, chunks=(min(64, max(1, len(rows))), width) if len(rows) else None
    )
    group.create_dataset("image_mask", data=np.array([len(images[i]) for i in rows], dtype=np.int64))
    for column, values in columns.items():
        group.create_dataset(column, data=values[rows])


SOURCE = "biovis synthetic world"


def is_world_export(path: str | os.PathLike) -> bool:
    """Whether `path` is an HDF5 file that `export_world` wrote (what `--overwrite` may replace)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("source") == SOURCE
    except (OSError, ValueError):
        return False


def export_world(world_root: str | os.PathLike, out: str | os.PathLike, unseen_fraction: float = 0.25,
                 seed: int = 0, progress=None) -> Path:  # fmt: skip
    """Write the world at `world_root` (its CUB-layout folder) to the HDF5 file `out`, atomically."""
    import h5py

    from datasets.cub import read_cub_meta

    root, out = Path(world_root), Path(out)
    meta = read_cub_meta(root)
    taxonomy = {row["class_id"]: row for row in load_taxonomy(root)}
    barcodes = load_barcodes(root)
    n = len(meta.paths)
    class_ids = meta.labels + 1
    species = [taxonomy[int(c)] for c in class_ids]
    columns = {
        "barcode": np.array([barcodes[i + 1].encode() for i in range(n)], dtype="S"),
        **{rank: np.array([s[rank].encode() for s in species], dtype="S") for rank in ("order", "family", "genus", "species")},
        "processid": np.array([f"WORLD{i + 1:06d}".encode() for i in range(n)], dtype="S"),
        "sampleid": np.array([f"world-{i + 1}".encode() for i in range(n)], dtype="S"),
        "image_file": np.array([p.encode() for p in meta.paths], dtype="S"),
    }  # fmt: skip
    images = []
    for i, relative in enumerate(meta.paths):
        images.append((meta.image_dir / relative).read_bytes())
        if progress is not None:
            progress(i + 1, n)
    groups = partition(class_ids, unseen_fraction, seed)
    unseen = sorted({species[i]["species"] for name in POOLS["unseen_keys"] for i in groups.get(name, [])})
    with atomic_path(out, suffix=".h5") as tmp, h5py.File(tmp, "w") as h5:
        h5.attrs["source"] = SOURCE
        h5.attrs["world"] = str(root)
        h5.attrs["partition"] = json.dumps(
            {"unseen_fraction": unseen_fraction, "seed": seed, "unseen": unseen}
        )
        for name, rows in groups.items():
            _write_group(h5, name, rows, columns, images)
    return out


def ensure_world_hdf5(preset: str = "default", data_dir: str | os.PathLike | None = None,
                      quiet: bool = False) -> Path:  # fmt: skip
    """The world of `preset` in BIOSCAN layout (default partition), written once beside the world's folder."""
    from datasets.registry import ensure_world_root

    root = ensure_world_root(preset, data_dir, quiet=quiet)
    path = root.parent / "bioscan.h5"
    if not path.is_file():
        try:
            export_world(root, path)
        except OSError:
            if not path.is_file():  # another process may have written it first
                raise
    return path
