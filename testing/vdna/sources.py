"""Image sources for Visual DNA: what a SOURCE argument names, listed as files, and how images are loaded.

Kinds: an image folder (recursive; non-image files skipped and counted), a ``.txt`` list of paths
(relative to the list's folder), the output folder of ``generate`` (``manifest.jsonl`` beside the images),
a single image, or a dataset split of this toolkit as ``NAME[:ARG]:SPLIT`` (``world:test``,
``world:small:test``, ``cub:train``, ``cub:/data/CUB:test``, ``folder:/data/root:all``). A new kind is one
function ``(spec, rest) -> ImageSource`` added to `SOURCE_KINDS` (used for ``KIND:REST`` specs); an
`ImageSource` subclass may override `dataset` for images that are not files (e.g. reconstructions).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from core.errors import UserError
from datasets.gpu_transforms import to_pm1
from datasets.images import BadImageError, is_image_file, open_rgb

RESIZE_MODES = ("center-crop", "clean", "clean-center")
SPLITS = ("train", "val", "test", "trainval", "all")


@dataclass
class ImageSource:
    """A set of images to describe: files (sorted), how it was named, and what was skipped while listing it."""

    spec: str
    kind: str
    paths: list[Path]
    non_images: int = 0
    selection: str = ""

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def identity(self) -> str:
        """Hash of the file list with sizes and modification times (cache key; cheap, no decoding)."""
        digest = hashlib.sha256(f"{self.kind}|{self.selection}".encode())
        for path in self.paths:
            try:
                stat = path.stat()
                digest.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{path}|missing\n".encode())
        return digest.hexdigest()[:16]

    def dataset(self, preprocess: Preprocess) -> Dataset:
        """Items ``(image [3, S, S] or None when unreadable, index)``: uint8, or float in [-1, 1]."""
        return ImageFiles(self.paths, preprocess)

    def subset(self, num_images: int | None, seed: int) -> ImageSource:
        """A seeded random subset of `num_images` images (kept in order), or self when it covers all."""
        if not num_images or num_images < 0 or num_images >= len(self.paths):
            return self
        keep = np.sort(np.random.default_rng(seed).choice(len(self.paths), num_images, replace=False))
        return replace(self, paths=[self.paths[i] for i in keep], selection=f"{num_images}@seed{seed}")


def _image_files(root: Path, files: list[Path], spec: str, kind: str) -> ImageSource:
    images = [p for p in files if is_image_file(p)]
    if not images:
        raise UserError(
            f"no image files in {root} ({len(files)} other files); expected "
            f"{', '.join(sorted({'.png', '.jpg', '.jpeg', '.webp'}))} or similar"
        )
    return ImageSource(spec, kind, images, non_images=len(files) - len(images))


def _folder_source(spec: str, root: Path) -> ImageSource:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return _image_files(root, files, spec, "folder")


def _generated_source(spec: str, root: Path) -> ImageSource:
    """`generate`'s output: images under images/ if present, else every image except the grid figures."""
    if (root / "images").is_dir():
        return _image_files(root / "images", sorted(p for p in (root / "images").rglob("*") if p.is_file()),
                            spec, "generated")  # fmt: skip
    files = sorted(p for p in root.rglob("*") if is_image_file(p) and not p.name.startswith("grid"))
    return _image_files(root, files, spec, "generated")


def _list_source(spec: str, txt: Path) -> ImageSource:
    try:
        lines = [line.strip() for line in txt.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the image list {txt}: {e}") from None
    entries = [line for line in lines if line and not line.startswith("#")]
    files = sorted(Path(e) if os.path.isabs(e) else txt.parent / e for e in entries)
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise UserError(f"{txt} lists {len(missing)} missing files, e.g. {missing[0]}")
    return _image_files(txt, files, spec, "list")


def _dataset_source(spec: str, rest: str) -> ImageSource:
    """``NAME[:ARG]:SPLIT``: ARG is the world preset or the data folder; SPLIT defaults to all."""
    from datasets.cub import split_indices
    from datasets.registry import DataSpec, canonical_name, resolve_meta

    name = canonical_name(spec.split(":", 1)[0])
    arg, _, split = rest.rpartition(":") if rest.rsplit(":", 1)[-1] in SPLITS else (rest, "", "all")
    data = DataSpec(dataset=name, world=arg or "default") if name == "world" else DataSpec(name, arg or None)
    meta = resolve_meta(data, quiet=True)
    indices = range(len(meta.paths)) if split == "all" else split_indices(meta, split, data.val_fraction, 0)
    paths = [meta.image_dir / meta.paths[i] for i in indices]
    if not paths:
        raise UserError(f"split {split} of {spec} holds no images")
    return ImageSource(spec, f"dataset-{name}", paths, selection=split)


SOURCE_KINDS = {
    "world": _dataset_source,
    "toy": _dataset_source,
    "cub": _dataset_source,
    "folder": _dataset_source,
}


def resolve_source(spec: str | os.PathLike) -> ImageSource:
    """An `ImageSource` from a folder, a .txt list, a generate output, one image, or ``KIND:...``."""
    spec = str(spec)
    kind, _, rest = spec.partition(":")
    if kind in SOURCE_KINDS and rest:
        return SOURCE_KINDS[kind](spec, rest)
    path = Path(spec).expanduser()
    if path.is_dir():
        generated = (path / "manifest.jsonl").is_file()
        return _generated_source(spec, path) if generated else _folder_source(spec, path)
    if path.is_file() and path.suffix.lower() == ".txt":
        return _list_source(spec, path)
    if path.is_file() and is_image_file(path):
        return ImageSource(spec, "image", [path])
    if path.exists():
        raise UserError(f"source {spec} is neither a folder, a .txt list of images nor an image")
    kinds = ", ".join(f"{k}:..." for k in SOURCE_KINDS)
    raise UserError(f"source {spec} does not exist (give a folder, a .txt list, an image, or one of {kinds})")


# ----- preprocessing and loading -----


class Preprocess:
    """PIL RGB -> float [3, S, S] in [-1, 1] (`__call__`), or what the loader workers ship (`pixels`).

    ``center-crop``: bicubic resize of the shorter side to S (antialiased), then a centre crop; shipped as
    uint8 and converted on the device by `datasets.gpu_transforms.to_pm1` (the same tensor as `__call__`).
    ``clean``: vdna's default, a squash to S x S by bicubic resizing of each channel as a float image (no
    uint8 rounding), clipped to [0, 255]; shipped as float. ``clean-center``: vdna's
    ``crop_to_square_pre_resize="center"`` (central square first), then ``clean``.
    """

    def __init__(self, size: int, mode: str = "center-crop"):
        if mode not in RESIZE_MODES:
            raise UserError(f"--resize must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
        if size < 8:
            raise UserError(f"--image-size must be at least 8, got {size}")
        self.size, self.mode = size, mode

    def __call__(self, img) -> torch.Tensor:
        x = self.pixels(img)
        return to_pm1(x) if x.dtype == torch.uint8 else x

    def pixels(self, img) -> torch.Tensor:
        """uint8 [3, S, S] (center-crop) or float [3, S, S] in [-1, 1] (the clean modes)."""
        from PIL import Image

        s = self.size
        if self.mode == "center-crop":
            w, h = img.size
            scale = s / min(w, h)
            nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
            img = img.resize((nw, nh), Image.BICUBIC)
            left, top = (nw - s) // 2, (nh - s) // 2
            x = np.array(img.crop((left, top, left + s, top + s)), dtype=np.uint8)
            return torch.from_numpy(x.transpose(2, 0, 1).copy())
        x = np.asarray(img)
        if self.mode == "clean-center":
            h, w = x.shape[:2]
            m = min(h, w)
            x = x[(h - m) // 2 : (h + m) // 2, (w - m) // 2 : (w + m) // 2]
        channels = [
            np.asarray(Image.fromarray(x[:, :, c].astype(np.float32), mode="F").resize((s, s), Image.BICUBIC))
            for c in range(3)
        ]
        x = np.stack(channels, axis=2).clip(0, 255)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))).div_(127.5).sub_(1.0)


class ImageFiles(Dataset):
    """Image files decoded to RGB and preprocessed (`Preprocess.pixels`: uint8 or float); an unreadable file
    yields None (skipped and counted)."""

    def __init__(self, paths: list[Path], preprocess: Preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int]:
        try:
            return self.preprocess.pixels(open_rgb(self.paths[i])), i
        except BadImageError:
            return None, i


def collate_images(batch: list) -> tuple[torch.Tensor | None, list[int]]:
    """Stack the readable images; return the indices of the unreadable ones beside them."""
    kept = [x for x, _ in batch if x is not None]
    return (torch.stack(kept) if kept else None), [i for x, i in batch if x is None]
