"""Embedding indexes: the unit vectors of one split per modality, in float32 (or float16: half the memory)
`.npy` files read as memory maps, with `meta.csv` (id and the four ranks per key) and `manifest.json` (model
hash, preprocessing, data identity, count, dimension, dtype).

Indexes are cached under `$BIOVIS_CACHE/retrieval/index/<key>`, the key hashing the model's weights, the data
file's identity, the split and the dtype, so an index is built once per model and data and never read stale. A
folder is written whole in a temporary sibling and renamed, so an interrupted build leaves nothing that reads as
an index. Loading checks every file against the manifest (a copied folder may be damaged): a damaged folder is
a one-line error, and a damaged cache entry is rebuilt.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
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
VERSION = 2
DTYPES = ("float32", "float16")
MODALITIES = ("image", "dna", "text")


def data_identity(path: str | os.PathLike, split: str) -> dict:
    """What names the data of an index: the file (resolved path, size, modification time) and the split."""
    path = Path(path).resolve()
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "split": split}


def index_folder(model_hash: str, identity: dict, modalities, dtype: str = "float32") -> Path:
    key = cache_key({"format": FORMAT, "version": VERSION, "model": model_hash, "data": identity,
                     "modalities": sorted(modalities), "dtype": dtype})[:24]  # fmt: skip
    return cache_root() / "retrieval" / "index" / key


def _damaged(folder: Path, what: str) -> UserError:
    return UserError(f"the retrieval index {folder} is damaged: {what}; rebuild it with `retrieve index --force` "
                     "(or copy the folder again)")  # fmt: skip


def _read_manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    if not path.is_file():
        raise UserError(
            f"{folder} is not a retrieval index (no manifest.json); build one with `retrieve index`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _damaged(
            folder, f"manifest.json is not readable JSON ({str(err).splitlines()[0][:80]})"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise UserError(f"{path} is not a retrieval index manifest (format {found!r})")
    checks = {
        "model_hash": lambda v: isinstance(v, str) and v,
        "modalities": lambda v: isinstance(v, list) and v and all(m in MODALITIES for m in v) and len(set(v)) == len(v),
        "count": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "dim": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
        "dtype": lambda v: v in DTYPES,
    }  # fmt: skip
    for field, ok in checks.items():
        if field not in manifest:
            raise _damaged(folder, f"manifest.json lacks {field}")
        if not ok(manifest[field]):
            raise _damaged(folder, f"manifest.json has an invalid {field} ({str(manifest[field])[:60]})")
    return manifest


def _check_array(folder: Path, modality: str, manifest: dict) -> None:
    """The `.npy` of a modality is a regular file whose header and size match the manifest."""
    path = folder / f"{modality}.npy"
    if not path.exists():
        raise _damaged(folder, f"{path.name} is missing")
    if not path.is_file():
        raise _damaged(folder, f"{path.name} is not a regular file")
    expected = (manifest["count"], manifest["dim"])
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            readers = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }
            if version not in readers:
                raise ValueError(f"unsupported .npy version {version}")
            shape, fortran, dtype = readers[version](f)
            offset = f.tell()
    except (OSError, ValueError, SyntaxError) as err:
        raise _damaged(folder, f"{path.name} is not a .npy array ({str(err).splitlines()[0][:80]})") from None
    if dtype.hasobject or dtype != np.dtype(manifest["dtype"]) or fortran:
        raise _damaged(folder, f"{path.name} holds {dtype} values, not {manifest['dtype']}")
    if tuple(shape) != expected:
        raise _damaged(folder, f"{path.name} has shape {tuple(shape)}, the manifest says {expected}")
    size = offset + math.prod(expected) * dtype.itemsize
    if path.stat().st_size != size:
        raise _damaged(folder, f"{path.name} has {path.stat().st_size} bytes, not {size} (truncated?)")


def _read_labels(folder: Path, count: int) -> dict[str, np.ndarray]:
    import pandas as pd

    path = folder / "meta.csv"
    if not path.is_file():
        raise _damaged(folder, "meta.csv is missing")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise _damaged(folder, f"meta.csv is not readable ({str(err).splitlines()[0][:80]})") from None
    missing = [c for c in ("id", *RANKS) if c not in table.columns]
    if missing:
        raise _damaged(folder, f"meta.csv lacks the column(s) {', '.join(missing)}")
    if len(table) != count:
        raise _damaged(folder, f"meta.csv has {len(table)} rows, the manifest says {count} keys")
    return {c: table[c].to_numpy(dtype=object) for c in ("id", *RANKS)}


def _read_novelty(folder: Path) -> dict:
    path = folder / "novelty.json"
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        data, reason = None, str(err).splitlines()[0][:80]
    else:
        reason = "not a mapping of QUERY:KEY to a finite threshold"
    valid = isinstance(data, dict) and all(
        isinstance(v, dict) and isinstance(v.get("threshold"), int | float) and math.isfinite(v["threshold"])
        for v in data.values()
    )
    if not valid:
        raise _damaged(folder, f"novelty.json is invalid ({reason}); delete it and calibrate again with "
                               "`retrieve evaluate --on val`")  # fmt: skip
    return data


@dataclass
class EmbeddingIndex:
    folder: Path
    manifest: dict
    labels: dict[str, np.ndarray]  # id and the four ranks, one str per key

    @classmethod
    def load(cls, folder: str | os.PathLike) -> EmbeddingIndex:
        """An index folder, every file checked against its manifest (one-line errors when damaged)."""
        folder = Path(folder)
        manifest = _read_manifest(folder)
        for modality in manifest["modalities"]:
            _check_array(folder, modality, manifest)
        index = cls(folder, manifest, _read_labels(folder, manifest["count"]))
        index.novelty()
        return index

    @property
    def modalities(self) -> list[str]:
        return list(self.manifest["modalities"])

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def keys(self, modality: str) -> np.ndarray:
        """The [N, D] unit vectors of one modality (float32 or float16), memory-mapped."""
        if modality not in self.modalities:
            raise UserError(
                f"the index {self.folder} holds {', '.join(self.modalities)} keys, not {modality}"
            )
        return np.load(self.folder / f"{modality}.npy", mmap_mode="r", allow_pickle=False)

    def check_model(self, model_hash: str, model_path: str | os.PathLike) -> None:
        if self.manifest["model_hash"] != model_hash:
            raise UserError(
                f"the index {self.folder} was built with model {self.manifest['model_hash']} but {model_path} is "
                f"model {model_hash}; rebuild it with `retrieve index` for this model"
            )

    def novelty(self) -> dict:
        return _read_novelty(self.folder)

    def save_novelty(self, thresholds: dict) -> None:
        write_text(self.folder / "novelty.json", json.dumps({**self.novelty(), **thresholds}, indent=2))


def build_index(model, model_hash: str, model_path: str | os.PathLike, data: str | os.PathLike, split: str,
                modalities, device, batch_size: int = 256, num_workers: int | None = None, amp: bool = True,
                force: bool = False, quiet: bool = False, dtype: str = "float32") -> tuple[EmbeddingIndex, bool]:  # fmt: skip
    """The cached index of `split` (built now when missing, damaged or `force`): (index, whether it was built)."""
    import pandas as pd

    from testing.retrieval.embed import embed_split

    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    modalities = [m for m in model.spec.modalities if m in modalities]
    count = check_split(data, split, tuple(modalities), model.spec.text_arch == "bert")
    identity = data_identity(data, split)
    folder = index_folder(model_hash, identity, modalities, dtype)
    if (folder / "manifest.json").is_file() and not force:
        try:
            return EmbeddingIndex.load(folder), False
        except UserError as err:  # a damaged cache entry (a killed copy, a full disk): build it again
            print(f"rebuilding the cached index: {err}", file=sys.stderr)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        dim = model.spec.embed_dim
        arrays = {
            m: np.lib.format.open_memmap(tmp / f"{m}.npy", "w+", np.dtype(dtype), (count, dim))
            for m in modalities
        }
        start = time.time()
        embed_split(
            model, data, split, modalities, device, batch_size, num_workers, amp, out=arrays, quiet=quiet
        )
        seconds = time.time() - start
        for modality, array in arrays.items():
            array.flush()
            _check_finite(array, modality, data, split)
        del arrays
        labels = read_labels(data, split)
        pd.DataFrame({"id": labels["id"], **{r: labels[r] for r in RANKS}}).to_csv(
            tmp / "meta.csv", index=False
        )
        manifest = {
            "format": FORMAT, "version": VERSION, "model_hash": model_hash, "model_path": str(model_path),
            "preprocessing": model.spec.preprocessing(), "data": identity, "modalities": modalities,
            "count": count, "dim": dim, "dtype": dtype, "normalised": True, "seconds": round(seconds, 2),
            "records_per_s": round(count / max(seconds, 1e-9), 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }  # fmt: skip
        write_text(tmp / "manifest.json", json.dumps(manifest, indent=2))
        _swap_in(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return EmbeddingIndex.load(folder), True


def _check_finite(array: np.ndarray, modality: str, data, split: str) -> None:
    """Refuse an index with a NaN or infinite embedding (the search would skip that key silently)."""
    for start in range(0, len(array), 1 << 16):
        finite = np.isfinite(array[start : start + (1 << 16)]).all(1)
        if not finite.all():
            record = start + int(np.flatnonzero(~finite)[0])
            raise UserError(f"the model embeds record {record} of {data}:{split} ({modality}) as NaN or infinite; "
                            "its weights are broken (a diverged training?): no index was written")  # fmt: skip


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
