"""scikit-learn's bundled handwritten digits: 1797 images of 8x8 pixels, 10 classes, real data in a package.

Each image is a vector of 64 values in [0, 1] (the 0..16 intensities divided by 16). As in the CVAE testbed,
the conditions a vector CVAE can be given are the data's own features: any subset of the 64 pixels, named
`pixel_<row>_<col>`, plus the class. The test split is a seeded per-class share; `val` is carved from train
exactly as for CUB (`datasets.cub.split_indices`).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from core.errors import UserError
from datasets.cub import split_indices

SIDE = 8
CLASS_NAMES = [str(d) for d in range(10)]
TEST_FRACTION = 0.2


def pixel_names() -> list[str]:
    return [f"pixel_{r}_{c}" for r in range(SIDE) for c in range(SIDE)]


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(x float32 [1797, 64] in [0, 1], labels int64 [1797]) from scikit-learn's bundled copy."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("--dataset digits needs scikit-learn: pip install scikit-learn") from None
    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int64)


class DigitsDataset:
    """A split of the digits as items {x, label, attributes, index}; the attributes are the pixels themselves."""

    def __init__(self, split: str, val_fraction: float = 0.1, seed: int = 0):
        x, labels = load_digits_arrays()
        rng = np.random.default_rng(seed)
        is_train = np.ones(len(labels), dtype=bool)
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            is_train[rng.permutation(members)[: round(TEST_FRACTION * len(members))]] = False
        self.indices = split_indices(
            SimpleNamespace(is_train=is_train, labels=labels), split, val_fraction, seed
        )
        self.x, self.labels = x[self.indices], labels[self.indices]
        self.class_names = CLASS_NAMES
        self.attribute_names = pixel_names()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "label": int(self.labels[i]), "attributes": self.x[i], "index": i}
