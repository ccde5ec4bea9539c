"""scikit-learn's bundled handwritten digits: 1797 images of 8x8 pixels, 10 classes, real data in a package.

Each image is a vector of 64 values in [0, 1] (the 0..16 intensities divided by 16). As in the CVAE testbed,
the conditions a vector CVAE can be given are the data's own features: any subset of the 64 pixels, named
`pixel_<row>_<col>`, plus the class. A split as the vector sets' (`datasets.vectors.VectorDataset`): the test
split a seeded per-class share; `val` carved from train exactly as for CUB (`datasets.cub.split_indices`).
"""

from __future__ import annotations

import numpy as np

from core.errors import UserError
from datasets.vectors import VectorDataset

SIDE = 8
CLASS_NAMES = [str(d) for d in range(10)]


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


class DigitsDataset(VectorDataset):
    """A split of the digits as items {x, label, attributes, index}; the attributes are the pixels themselves."""

    def __init__(self, split: str, val_fraction: float = 0.1, seed: int = 0):
        x, labels = load_digits_arrays()
        super().__init__(x, labels, pixel_names(), CLASS_NAMES, split, val_fraction, seed, test_draw=seed)
