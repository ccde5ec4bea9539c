"""Vector data for the CVAE testbed: the seed's synthetic sets of known intrinsic dimension, and a CSV table.

Synthetic (seed `004_*`, Gaussian_CVAE's datasets, drawn on the CPU from a seed):
- `gaussian`: x ~ N(0, I_d): intrinsic dimension d;
- `projected`: the same d coordinates zero-padded to D and multiplied by P, whose row r holds 1 + N(0, 1)/100
  at column r mod d: D noisy copies of d coordinates (intrinsic dimension d, observed D);
- `swissroll`: phi ~ U(0, 15), z ~ U(0, 15), x, y = (phi + 0.1 xi) (sin, cos)(phi) / 6 with xi ~ U(0, 1):
  a 2-d sheet rolled up in 3-d.
`csv`: every numeric column a feature; an optional `label_column` names the classes.
Each is a split as the digits are (`datasets.digits`): items {x, label, attributes, index}, where the
attributes are the features themselves (the testbed's conditions: any subset of the features, each a value
and a presence bit); the test split a seeded share (per class when there are classes), `val` carved from
train as for CUB. The synthetic sets have no classes (label 0, `class_names` empty).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from core.errors import UserError
from datasets.cub import split_indices

SYNTHETIC = ("gaussian", "projected", "swissroll")
TEST_FRACTION = 0.2
SWISS_LENGTH = 15.0  # of the roll in angle and in height, as the seed's
SWISS_NOISE = 0.1


def gaussian(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((n, dim))


def projection_matrix(dim: int, projection_dim: int, rng: np.random.Generator) -> np.ndarray:
    """[D, D]: row r holds 1 + N(0, 1)/100 at column r mod d, zeros elsewhere (the seed's P)."""
    matrix = np.zeros((projection_dim, projection_dim))
    rows = np.arange(projection_dim)
    matrix[rows, rows % dim] = 1 + rng.standard_normal(projection_dim) / 100
    return matrix


def projected(
    n: int, dim: int, projection_dim: int, rng: np.random.Generator, matrix: np.ndarray
) -> np.ndarray:
    padded = np.zeros((n, projection_dim))
    padded[:, :dim] = rng.standard_normal((n, dim))
    return padded @ matrix.T


def swiss_roll(n: int, rng: np.random.Generator) -> np.ndarray:
    phi, xi, z = SWISS_LENGTH * rng.random(n), rng.random(n), SWISS_LENGTH * rng.random(n)
    radius = (phi + SWISS_NOISE * xi) / 6
    return np.stack([radius * np.sin(phi), radius * np.cos(phi), z], axis=1)


def synthetic_vectors(kind: str, n: int, dim: int = 2, projection_dim: int = 8, seed: int = 0) -> np.ndarray:
    """[n, features] float32 points of a synthetic set; the same seed gives the same points."""
    if kind not in SYNTHETIC:
        raise UserError(f"unknown synthetic set {kind!r}; choices: {', '.join(SYNTHETIC)}")
    if n < 2 or dim < 1:
        raise UserError(f"a synthetic set needs n >= 2 points of dim >= 1, got n {n}, dim {dim}")
    rng = np.random.default_rng([seed, SYNTHETIC.index(kind)])
    if kind == "gaussian":
        x = gaussian(n, dim, rng)
    elif kind == "projected":
        if projection_dim < dim:
            raise UserError(f"--projection-dim {projection_dim} must be at least --dim {dim}")
        x = projected(n, dim, projection_dim, rng, projection_matrix(dim, projection_dim, rng))
    else:
        x = swiss_roll(n, rng)
    return x.astype(np.float32)


def intrinsic_dimension(kind: str, dim: int) -> int:
    """The number of independent coordinates a synthetic set is drawn from (the swiss roll: its sheet's 2)."""
    return 2 if kind == "swissroll" else dim


def read_vector_csv(
    path: str | Path, label_column: str | None = None
) -> tuple[np.ndarray, np.ndarray | None, list[str], list[str]]:
    """(x float32 [N, F], labels int64 [N] or None, feature names, class names) of a CSV with a header row;
    every column but `label_column` must hold finite numbers."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"vector table {path} does not exist")
    try:
        rows = [row for row in csv.reader(path.read_text(encoding="utf-8-sig").splitlines()) if row]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"cannot read vector table {path}: {err}") from None
    if len(rows) < 3:
        raise UserError(f"vector table {path} needs a header row and at least two rows of numbers")
    header = [h.strip() for h in rows[0]]
    if label_column is not None and label_column not in header:
        raise UserError(f"vector table {path} has no column {label_column!r}; columns: {', '.join(header)}")
    features = [i for i, h in enumerate(header) if h != label_column]
    if not features:
        raise UserError(f"vector table {path} has no feature column besides {label_column!r}")
    x = np.empty((len(rows) - 1, len(features)), dtype=np.float64)
    for r, row in enumerate(rows[1:]):
        if len(row) != len(header):
            raise UserError(f"vector table {path}, row {r + 2}: {len(row)} cells for {len(header)} columns")
        for j, i in enumerate(features):
            try:
                x[r, j] = float(row[i])
            except ValueError:
                raise UserError(f"vector table {path}, row {r + 2}, column {header[i]!r}: {row[i]!r} is not "
                                "a number") from None  # fmt: skip
            if not math.isfinite(x[r, j]):
                raise UserError(f"vector table {path}, row {r + 2}, column {header[i]!r}: {row[i]!r} is not "
                                "a finite number")  # fmt: skip
    labels, classes = None, []
    if label_column is not None:
        column = [row[header.index(label_column)].strip() for row in rows[1:]]
        classes = sorted(set(column))
        labels = np.array([classes.index(v) for v in column], dtype=np.int64)
    return x.astype(np.float32), labels, [header[i] for i in features], classes


class VectorDataset:
    """A split of vectors as items {x, label, attributes, index}; the attributes are the features themselves."""

    def __init__(self, x: np.ndarray, labels: np.ndarray | None, feature_names: list[str], class_names: list[str],
                 split: str, val_fraction: float = 0.1, seed: int = 0, test_draw: int | list[int] | None = None):  # fmt: skip
        """`test_draw`: the seed of the test share's draw (default [seed, 7]; the digits draw theirs with seed)."""
        all_labels = labels if labels is not None else np.zeros(len(x), dtype=np.int64)
        rng = np.random.default_rng([seed, 7] if test_draw is None else test_draw)
        is_train = np.ones(len(x), dtype=bool)
        for c in np.unique(all_labels):
            members = np.flatnonzero(all_labels == c)
            is_train[rng.permutation(members)[: round(TEST_FRACTION * len(members))]] = False
        self.indices = split_indices(
            SimpleNamespace(is_train=is_train, labels=all_labels), split, val_fraction, seed
        )
        self.x, self.labels = x[self.indices], all_labels[self.indices]
        self.class_names, self.attribute_names = list(class_names), list(feature_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def dim(self) -> int:
        return self.x.shape[1]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "label": int(self.labels[i]), "attributes": self.x[i], "index": i}


def synthetic_dataset(kind: str, split: str, n: int, dim: int = 2, projection_dim: int = 8, val_fraction: float = 0.1,
                      seed: int = 0) -> VectorDataset:  # fmt: skip
    """A split of a synthetic set of `n` points in all (features named x0, x1, ...)."""
    x = synthetic_vectors(kind, n, dim, projection_dim, seed)
    return VectorDataset(x, None, [f"x{i}" for i in range(x.shape[1])], [], split, val_fraction, seed)


def csv_dataset(path: str | Path, split: str, label_column: str | None = None, val_fraction: float = 0.1,
                seed: int = 0) -> VectorDataset:  # fmt: skip
    """A split of the vectors in a CSV table (features: its numeric columns; classes: `label_column`)."""
    x, labels, features, classes = read_vector_csv(path, label_column)
    return VectorDataset(x, labels, features, classes, split, val_fraction, seed)
