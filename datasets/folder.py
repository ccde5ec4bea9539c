"""A plain image folder with one sub-folder per class, split deterministically into train and test."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from core.errors import UserError
from datasets.cub import CUBMeta
from datasets.images import is_image_file


def _in_test(relative: str, test_fraction: float) -> bool:
    """Stable split by a hash of the relative path: adding files never moves existing ones."""
    digest = hashlib.sha256(relative.encode()).digest()
    return int.from_bytes(digest[:4], "little") / 2**32 < test_fraction


def read_folder_meta(root: str | os.PathLike, test_fraction: float = 0.2) -> CUBMeta:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{root} has no class sub-folders (expected ROOT/<class>/<image>)")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.is_file() and is_image_file(p))
        paths.extend(str(p.relative_to(root)) for p in files)
        labels.extend([label] * len(files))
    if not paths:
        raise UserError(f"{root} holds no image files in its class sub-folders")
    is_train = np.asarray([not _in_test(p, test_fraction) for p in paths])
    return CUBMeta(root, paths, np.asarray(labels, dtype=np.int64), is_train, None, classes, image_dir=root)
