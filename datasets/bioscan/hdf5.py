"""BIOSCAN-1M / BIOSCAN-5M HDF5 files (the BIOSCAN-CLIP layout), read lazily per record.

One group per split (`no_split_and_seen_train`, `val_seen`, `val_unseen`, `all_keys`, ...), each holding
parallel datasets: `image` (JPEG bytes zero-padded to a fixed width, or variable-length rows), `image_mask`
(the true byte length), `barcode`, `order`/`family`/`genus`/`species` (`not_classified` where missing) and
ids (`processid`, `sampleid`, `image_file`). A `BioscanSplit` opens its file lazily, once per process, so
every DataLoader worker holds its own h5py handle; each item decodes one image and tokenises one barcode, so
nothing is read or tokenised for a whole split up front.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch

from core.errors import UserError
from datasets.bioscan.dna import KmerTokenizer, clean_dna
from datasets.bioscan.taxonomy import RANKS, TaxonomyTokenizer, lineage_ids

LABELS = ("barcode", *RANKS)
IMAGE = ("image", "image_mask")
TEXT_TOKENS = ("language_tokens_input_ids", "language_tokens_attention_mask")  # BERT-small WordPiece (CLIBD)
ID_FIELDS = ("processid", "sampleid", "image_file")
MODALITIES = ("image", "dna", "text")


def text(value) -> str:
    """An HDF5 string cell (bytes or str) as str."""
    if isinstance(value, bytes | np.bytes_):
        return value.decode("utf-8", errors="replace")
    return str(value)


def open_hdf5(path: str | os.PathLike):
    """h5py.File for reading, with one-line errors for a missing, empty, truncated or foreign file."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise UserError(f"HDF5 file {path} does not exist")
    if path.stat().st_size == 0:
        raise UserError(f"HDF5 file {path} is empty")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else "unreadable"
        raise UserError(f"{path} is not a readable HDF5 file ({reason[:120]}); is it truncated?") from None


def check_split(path: str | os.PathLike, split: str, modalities: tuple[str, ...] = ("image", "dna"),
                text_tokens: bool = False) -> int:  # fmt: skip
    """The record count of `split`, after checking that the group and the datasets it needs are there
    (`text_tokens`: the pre-tokenised taxonomy CLIBD's text tower reads)."""
    with open_hdf5(path) as f:
        groups = sorted(k for k in f if hasattr(f[k], "keys"))
        if split not in f or not hasattr(f[split], "keys"):
            raise UserError(
                f"{path} has no split {split!r}; its groups are: {', '.join(groups) or 'none'} "
                "(is it a BIOSCAN HDF5 file?)"
            )
        group = f[split]
        needed = LABELS + (IMAGE if "image" in modalities else ())
        needed += TEXT_TOKENS if text_tokens and "text" in modalities else ()
        missing = [name for name in needed if name not in group]
        if missing:
            raise UserError(
                f"{path}: group {split!r} lacks dataset(s) {', '.join(missing)}; a BIOSCAN HDF5 group has "
                f"{', '.join(needed)}"
            )
        lengths = {name: group[name].shape[0] for name in needed}
        if len(set(lengths.values())) > 1:
            listed = ", ".join(f"{k}={v}" for k, v in lengths.items())
            raise UserError(
                f"{path}: datasets of group {split!r} differ in length ({listed}); is it truncated?"
            )
        return int(lengths["barcode"])


def read_labels(path: str | os.PathLike, split: str) -> dict[str, np.ndarray]:
    """Ids and the four ranks of every record of a split, as arrays of str (for evaluation and indexes)."""
    check_split(path, split, modalities=())
    with open_hdf5(path) as f:
        group = f[split]
        out = {rank: np.array([text(v) for v in group[rank][:]], dtype=object) for rank in RANKS}
        id_field = next((name for name in ID_FIELDS if name in group), None)
        n = len(out["species"])
        ids = [text(v) for v in group[id_field][:]] if id_field else [f"{split}:{i}" for i in range(n)]
        out["id"] = np.array(ids, dtype=object)
    return out


def decode_image(data: bytes, size: int, where: str, whole: bool = False):
    """JPEG/PNG bytes -> uint8 [3, size, size]: short side to `size`, centre crop (deterministic). With
    `whole`: (the whole image squashed to size x size, (height, width) of it with its short side at `size`),
    for crops drawn in that geometry (datasets/bioscan/augment.py)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            img = img.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot decode image {where} ({reason[:100]})") from None
    if whole:
        return squashed_uint8(img, size)
    return square_uint8(img, size)


def squashed_uint8(img, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """A PIL RGB image -> (uint8 [3, size, size] of the whole image, (height, width) at short side `size`)."""
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    if (w, h) != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    pixels = np.asarray(img, dtype=np.uint8)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)), (
        max(size, round(h * scale)),
        max(size, round(w * scale)),
    )


def square_uint8(img, size: int) -> np.ndarray:
    """A PIL RGB image -> uint8 [3, size, size]: short side resized to `size`, then centre crop."""
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    if new != (w, h):
        img = img.resize(new, Image.Resampling.BILINEAR, reducing_gap=3.0)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    pixels = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


class BioscanSplit(torch.utils.data.Dataset):
    """One split of a BIOSCAN HDF5 file as dicts of tensors: `image` (uint8 [3, S, S]), `dna_ids`/`dna_mask`,
    `text_ids`/`text_mask`, `lineage` (one id per rank, equal for equal taxonomy prefixes, unique where a rank
    is not classified) and `index`. Only the requested modalities are read."""

    def __init__(
        self,
        path: str | os.PathLike,
        split: str,
        modalities: tuple[str, ...] = ("image", "dna"),
        image_size: int = 224,
        dna: KmerTokenizer | None = None,
        taxonomy: TaxonomyTokenizer | None = None,
        dna_unknown: str = "n",
        text_tokens: bool = False,
        whole_image: bool = False,
    ):
        unknown = sorted(set(modalities) - set(MODALITIES))
        if unknown:
            raise UserError(f"unknown modality {', '.join(unknown)}; choices: {', '.join(MODALITIES)}")
        self.path, self.split = Path(path), split
        self.modalities = tuple(modalities)
        self.text_tokens, self.whole_image = text_tokens, whole_image
        self.length = check_split(self.path, split, self.modalities, text_tokens)
        self.image_size = image_size
        self.dna = dna or KmerTokenizer()
        self.taxonomy = taxonomy or TaxonomyTokenizer()
        self.dna_unknown = dna_unknown
        self._file, self._pid = None, None

    def __len__(self) -> int:
        return self.length

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_pid": None}  # workers open their own handle

    def _group(self):
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = open_hdf5(self.path), os.getpid()
        return self._file[self.split]

    def _check_lengths(self, rows: list[int], lengths: np.ndarray, data: np.ndarray) -> None:
        """`image_mask` holds each JPEG's byte count: it must lie within the row (a negative one would cut
        bytes off the end silently)."""
        width = data.shape[1] if data.ndim == 2 else None
        for i, n, row in zip(rows, np.asarray(lengths).reshape(-1).tolist(), data, strict=True):
            limit = width if width is not None else len(row)
            if not 0 < n <= limit:
                raise UserError(
                    f"{self.path}:{self.split} record {i}: image_mask is {n}, not a byte count within its "
                    f"{limit}-byte image row; the file is damaged: rebuild or re-download it"
                )

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """A batch of records with one read per dataset (h5py wants increasing, unique indices)."""
        group = self._group()
        unique, inverse = np.unique(np.asarray(indices, dtype=np.int64), return_inverse=True)
        rows = unique.tolist()
        names = list(zip(*([text(v) for v in group[rank][rows]] for rank in RANKS), strict=True))
        columns: dict[str, list] = {
            "index": rows,
            "lineage": list(torch.from_numpy(lineage_ids(names, rows))),
        }
        if "image" in self.modalities:
            lengths, data = group["image_mask"][rows], group["image"][rows]
            self._check_lengths(rows, lengths, data)
            decoded = [decode_image(np.asarray(row, dtype=np.uint8)[:n].tobytes(), self.image_size,
                                    f"{i} of {self.path}:{self.split}", self.whole_image)
                       for i, row, n in zip(rows, data, lengths, strict=True)]  # fmt: skip
            if self.whole_image:
                columns["source_size"] = [torch.tensor(size) for _, size in decoded]
                decoded = [pixels for pixels, _ in decoded]
            columns["image"] = [torch.from_numpy(pixels) for pixels in decoded]
        if "dna" in self.modalities:
            sequences = [clean_dna(text(v) or "N", self.dna_unknown, source=f"{self.path}:{self.split} record {i}")
                         for i, v in zip(rows, group["barcode"][rows], strict=True)]  # fmt: skip
            ids, mask = self.dna.encode(sequences)
            columns["dna_ids"], columns["dna_mask"] = (
                list(torch.from_numpy(ids)),
                list(torch.from_numpy(mask)),
            )
        if "text" in self.modalities and self.text_tokens:
            ids = np.asarray(group[TEXT_TOKENS[0]][rows], dtype=np.int64)
            mask = np.asarray(group[TEXT_TOKENS[1]][rows]) != 0
            columns["text_ids"], columns["text_mask"] = (
                list(torch.from_numpy(ids)),
                list(torch.from_numpy(mask)),
            )
        elif "text" in self.modalities:
            ids, mask = self.taxonomy.encode(names)
            columns["text_ids"], columns["text_mask"] = (
                list(torch.from_numpy(ids)),
                list(torch.from_numpy(mask)),
            )
        return [{name: values[j] for name, values in columns.items()} for j in inverse.tolist()]
