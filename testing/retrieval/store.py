"""Embedding indexes: the unit vectors of one split per modality, in float16 `.npy` files read as memory maps,
with `meta.csv` (id and the four ranks per key) and `manifest.json` (model hash, preprocessing, data identity).

Indexes are cached under `$BIOVIS_CACHE/retrieval/index/<key>`, the key hashing the model's weights, the data
file's identity and the split, so an index is built once per model and data and never read stale. A folder is
written whole in a temporary sibling and renamed, so an interrupted build leaves nothing that reads as an index.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.atomic import write_text
from core.cachedir import cache_root
from core.errors import UserError
from datasets.bioscan.hdf5 import check_split, read_labels
from datasets.bioscan.taxonomy import RANKS
from testing.cache import cache_key

FORMAT = "biovis-retrieval-index"
VERSION = 1


def data_identity(path: str | os.PathLike, split: str) -> dict:
    """What names the data of an index: the file (resolved path, size, modification time) and the split."""
    path = Path(path).resolve()
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "split": split}


def index_folder(model_hash: str, identity: dict, modalities) -> Path:
    key = cache_key({"format": FORMAT, "version": VERSION, "model": model_hash, "data": identity,
                     "modalities": sorted(modalities)})[:24]  # fmt: skip
    return cache_root() / "retrieval" / "index" / key


@dataclass
class EmbeddingIndex:
    folder: Path
    manifest: dict
    labels: dict[str, np.ndarray]  # id and the four ranks, one str per key

    @classmethod
    def load(cls, folder: str | os.PathLike) -> EmbeddingIndex:
        import pandas as pd

        folder = Path(folder)
        path = folder / "manifest.json"
        if not path.is_file():
            raise UserError(
                f"{folder} is not a retrieval index (no manifest.json); build one with `retrieve index`"
            )
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"cannot read {path}: {err}") from None
        if manifest.get("format") != FORMAT:
            raise UserError(f"{path} is not a retrieval index manifest (format {manifest.get('format')!r})")
        table = pd.read_csv(folder / "meta.csv", dtype=str, keep_default_na=False)
        return cls(folder, manifest, {c: table[c].to_numpy(dtype=object) for c in table.columns})

    @property
    def modalities(self) -> list[str]:
        return list(self.manifest["modalities"])

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def keys(self, modality: str) -> np.ndarray:
        """The float16 [N, D] unit vectors of one modality, memory-mapped."""
        if modality not in self.modalities:
            raise UserError(
                f"the index {self.folder} holds {', '.join(self.modalities)} keys, not {modality}"
            )
        return np.load(self.folder / f"{modality}.npy", mmap_mode="r")

    def check_model(self, model_hash: str, model_path: str | os.PathLike) -> None:
        if self.manifest["model_hash"] != model_hash:
            raise UserError(
                f"the index {self.folder} was built with model {self.manifest['model_hash']} but {model_path} is "
                f"model {model_hash}; rebuild it with `retrieve index` for this model"
            )

    def novelty(self) -> dict:
        path = self.folder / "novelty.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def save_novelty(self, thresholds: dict) -> None:
        write_text(self.folder / "novelty.json", json.dumps({**self.novelty(), **thresholds}, indent=2))


def build_index(model, model_hash: str, model_path: str | os.PathLike, data: str | os.PathLike, split: str,
                modalities, device, batch_size: int = 256, num_workers: int | None = None, amp: bool = True,
                force: bool = False, quiet: bool = False) -> tuple[EmbeddingIndex, bool]:  # fmt: skip
    """The cached index of `split` (built now when missing or `force`): (index, whether it was built)."""
    import pandas as pd

    from testing.retrieval.embed import embed_split

    modalities = [m for m in model.spec.modalities if m in modalities]
    count = check_split(data, split, tuple(modalities))
    identity = data_identity(data, split)
    folder = index_folder(model_hash, identity, modalities)
    if (folder / "manifest.json").is_file() and not force:
        return EmbeddingIndex.load(folder), False
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        dim = model.spec.embed_dim
        arrays = {
            m: np.lib.format.open_memmap(tmp / f"{m}.npy", "w+", np.float16, (count, dim)) for m in modalities
        }
        start = time.time()
        embed_split(
            model, data, split, modalities, device, batch_size, num_workers, amp, out=arrays, quiet=quiet
        )
        seconds = time.time() - start
        for array in arrays.values():
            array.flush()
        del arrays
        labels = read_labels(data, split)
        pd.DataFrame({"id": labels["id"], **{r: labels[r] for r in RANKS}}).to_csv(
            tmp / "meta.csv", index=False
        )
        manifest = {
            "format": FORMAT, "version": VERSION, "model_hash": model_hash, "model_path": str(model_path),
            "preprocessing": model.spec.preprocessing(), "data": identity, "modalities": modalities,
            "count": count, "dim": dim, "dtype": "float16", "normalised": True, "seconds": round(seconds, 2),
            "records_per_s": round(count / max(seconds, 1e-9), 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }  # fmt: skip
        write_text(tmp / "manifest.json", json.dumps(manifest, indent=2))
        _swap_in(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return EmbeddingIndex.load(folder), True


def _swap_in(tmp: Path, folder: Path) -> None:
    """Put the complete folder `tmp` in place of `folder` (renames only; the old one is removed last)."""
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def export_index(index: EmbeddingIndex, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Copy an index folder to `out` (e.g. to carry it to a laptop); `out` changes only once the copy is whole."""
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise UserError(f"{out} already exists; pass --overwrite or another --out")
        if not (out / "manifest.json").is_file():
            raise UserError(f"--overwrite refused: {out} is not a retrieval index folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for item in index.folder.iterdir():
            shutil.copy2(item, tmp / item.name)
        _swap_in(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
