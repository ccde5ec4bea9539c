"""CUB-200-2011 in its official file layout (also the layout of the synthetic world).

Float bounding boxes, every image mode to RGB, attributes optional, optional crop to the box, and a
validation split carved from train so that model selection never looks at test.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import UserError
from datasets.images import BadImageError, open_rgb
from datasets.transforms import Uint8Images, box_pixels

REQUIRED_FILES = ("images.txt", "classes.txt", "image_class_labels.txt", "train_test_split.txt")
SPLITS = ("train", "val", "test", "trainval")


def _read_table(root: Path, name: str, required: bool = True) -> list[list[str]] | None:
    path = root / name
    if not path.is_file():
        if required:
            raise UserError(f"dataset folder {root} lacks {name}: is it a complete CUB-200-2011 copy?")
        return None
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise UserError(f"{path}:{number} is malformed: {line.strip()!r}")
            rows.append(parts)
    return rows


def find_cub_root(path: str | os.PathLike) -> Path:
    """Accept the CUB folder itself or any parent holding `CUB_200_2011/` (the Kaggle/tarball layouts)."""
    path = Path(path)
    for candidate in (path, path / "CUB_200_2011", path / "CUB_200_2011" / "CUB_200_2011"):
        if (candidate / "images.txt").is_file():
            return candidate
    if not path.exists():
        raise UserError(f"dataset folder {path} does not exist")
    raise UserError(f"{path} holds no CUB-200-2011 copy (no images.txt in it or in CUB_200_2011/)")


@dataclass
class CUBMeta:
    """Everything parsed from the text files, shared by all splits."""

    root: Path
    paths: list[str]  # relative to images/, indexed by image_id - 1
    labels: np.ndarray  # 0-based class per image
    is_train: np.ndarray  # bool per image
    boxes: np.ndarray | None  # float (x, y, w, h) per image
    class_names: list[str]
    image_dir: Path | None = None  # defaults to root / "images"

    def __post_init__(self):
        if self.image_dir is None:
            self.image_dir = self.root / "images"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def read_cub_meta(root: str | os.PathLike) -> CUBMeta:
    root = find_cub_root(root)
    images = _read_table(root, "images.txt")
    ids = [int(r[0]) for r in images]
    if ids != list(range(1, len(ids) + 1)):
        raise UserError(f"{root / 'images.txt'}: image ids are not 1..N in order")
    n = len(ids)

    def per_image(name: str, column: int, cast, required: bool = True):
        rows = _read_table(root, name, required)
        if rows is None:
            return None
        values = {int(r[0]): r[column:] if column < 0 else cast(r[column]) for r in rows}
        if len(values) != n or set(values) != set(ids):
            raise UserError(f"{root / name} does not cover the {n} images of images.txt")
        return [values[i] for i in ids]

    labels = np.asarray(per_image("image_class_labels.txt", 1, int), dtype=np.int64) - 1
    is_train = np.asarray(per_image("train_test_split.txt", 1, int), dtype=np.int64) == 1
    box_rows = per_image("bounding_boxes.txt", -4, float, required=False)
    boxes = np.asarray(box_rows, dtype=np.float64) if box_rows is not None else None
    classes = _read_table(root, "classes.txt")
    class_names = [" ".join(r[1:]) for r in sorted(classes, key=lambda r: int(r[0]))]
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise UserError(f"{root / 'image_class_labels.txt'} names a class missing from classes.txt")
    return CUBMeta(root, [r[1] for r in images], labels, is_train, boxes, class_names)


def read_attributes(root: str | os.PathLike, n_images: int) -> tuple[list[str], np.ndarray] | None:
    """(attribute names, uint8 matrix [images, attributes]) or None when the files are absent.

    Reads the official `image_attribute_labels.txt` (or the Kaggle mirror's `_clean` variant); only the
    first three columns are used, so the official file's few lines with an extra field are harmless.
    """
    import pandas as pd

    folder = Path(root) / "attributes"
    names_file = folder / "attributes.txt"
    labels_file = next(
        (
            p
            for p in (folder / "image_attribute_labels.txt", folder / "image_attribute_labels_clean.txt")
            if p.is_file()
        ),
        None,
    )
    if not names_file.is_file() or labels_file is None:
        return None
    names = [" ".join(r[1:]) for r in _read_table(folder, "attributes.txt")]
    # Only the first three fields are used. The official file has a few lines with an extra field, which
    # the C parser accepts only when told the widest line's width: widen until it parses.
    with open(labels_file, encoding="utf-8") as f:
        width = len(f.readline().split())
    for extra in range(4):
        try:
            table = pd.read_csv(
                labels_file,
                sep=r"\s+",
                header=None,
                names=list(range(width + extra)),
                usecols=[0, 1, 2],
                dtype=np.int64,
            )
            break
        except pd.errors.ParserError:
            continue
    else:
        raise UserError(f"{labels_file} has lines of very uneven width; is it a CUB attribute file?")
    matrix = np.zeros((n_images, len(names)), dtype=np.uint8)
    img = table[0].to_numpy(dtype=np.int64) - 1
    att = table[1].to_numpy(dtype=np.int64) - 1
    matrix[img, att] = table[2].to_numpy(dtype=np.uint8)
    return names, matrix


def split_indices(meta: CUBMeta, split: str, val_fraction: float, seed: int) -> np.ndarray:
    """Image indices of a split. `val` is a per-class random share of the official train set."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choices: {', '.join(SPLITS)}")
    train = np.flatnonzero(meta.is_train)
    if split == "test":
        return np.flatnonzero(~meta.is_train)
    if split == "trainval" or val_fraction <= 0:
        if split == "val":
            raise UserError("the val split is empty: --val-fraction is 0")
        return train
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(meta.labels[train]):
        members = train[meta.labels[train] == c]
        take = int(round(val_fraction * len(members)))
        take = min(max(take, 1), len(members) - 1) if len(members) >= 2 else 0
        val.extend(rng.permutation(members)[:take].tolist())
    val_mask = np.zeros(len(meta.labels), dtype=bool)
    val_mask[val] = True
    chosen = val_mask if split == "val" else (meta.is_train & ~val_mask)
    return np.flatnonzero(chosen)


class CUBDataset:
    """A split of a CUB-layout folder as a map-style dataset of dicts (image, label, index[, attributes])."""

    def __init__(
        self,
        root: str | os.PathLike | CUBMeta,
        split: str,
        transform=None,
        val_fraction: float = 0.1,
        seed: int = 0,
        bbox_crop: bool = False,
        attributes: bool | None = None,
        skip_bad_images: bool = False,
    ):
        self.meta = root if isinstance(root, CUBMeta) else read_cub_meta(root)
        self.root = self.meta.root
        self.split = split
        self.indices = split_indices(self.meta, split, val_fraction, seed)
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        if bbox_crop and self.meta.boxes is None:
            raise UserError(f"--bbox-crop needs {self.root / 'bounding_boxes.txt'}, which is missing")
        self.bbox_crop = bbox_crop
        self.attribute_names: list[str] | None = None
        self.attributes: np.ndarray | None = None
        if attributes is not False:
            found = read_attributes(self.root, len(self.meta.paths))
            if found is None and attributes:
                raise UserError(
                    f"{self.root / 'attributes'} lacks attributes.txt or image_attribute_labels.txt"
                )
            if found is not None:
                self.attribute_names, self.attributes = found

    @property
    def num_classes(self) -> int:
        return self.meta.num_classes

    @property
    def class_names(self) -> list[str]:
        return self.meta.class_names

    @property
    def labels(self) -> np.ndarray:
        return self.meta.labels[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def image_path(self, i: int) -> Path:
        return self.meta.image_dir / self.meta.paths[self.indices[i]]

    def box(self, i: int):
        """The float (x, y, w, h) box image `i` is cropped to, or None without --bbox-crop."""
        return self.meta.boxes[self.indices[i]] if self.bbox_crop else None

    def load_image(self, i: int):
        img = open_rgb(self.image_path(i))
        crop = box_pixels(self.box(i), img.width, img.height)
        return img.crop(crop) if crop is not None else img

    def _pixels(self, i: int) -> dict:
        """The item's image entries: a transformed PIL image, or with a `Uint8Images` transform the uint8
        pixels (or encoded bytes) that `datasets.gpu_transforms.to_model_batch` turns into model input."""
        import torch

        transform = self.transform
        if not isinstance(transform, Uint8Images):
            img = self.load_image(i)
            return {"image": transform(img) if transform else img}
        out = {"geometry": torch.tensor(transform.geometry)}
        if transform.encoded:
            out["encoded"], out["box"], size = transform.encode(self.image_path(i), self.box(i))
        else:
            out["image"], size = transform(self.image_path(i), self.box(i))
        out["source_size"] = torch.tensor(size)
        return out

    def __getitem__(self, i: int):
        try:
            pixels = self._pixels(i)
        except BadImageError:
            if self.skip_bad_images:
                return None
            raise
        item = {**pixels, "label": int(self.labels[i]), "index": i}
        if self.attributes is not None:
            item["attributes"] = self.attributes[self.indices[i]].astype(np.float32)
        return item
