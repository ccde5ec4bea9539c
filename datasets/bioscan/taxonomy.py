"""Taxonomy labels as text tokens: one token per rank (order, family, genus, species), hashed into buckets.

`not_classified` (BIOSCAN's placeholder for a missing rank) and empty names are padding: masked in the text
encoder's attention and pooling, so the frequent pretraining string "Order Family not_classified
not_classified" is read as the two ranks it knows. Hashing whole names (sha1, stable across runs and
machines) gives unseen names a token too, without a vocabulary file. `token_groups` gives equal ids to equal
token rows (which embed identically), so that the contrastive loss can leave them out of each other's
negatives.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np

RANKS = ("order", "family", "genus", "species")
NOT_CLASSIFIED = "not_classified"
PAD_ID = 0


def is_classified(name: str) -> bool:
    return bool(name) and name != NOT_CLASSIFIED


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "little")


@dataclass(frozen=True)
class TaxonomyTokenizer:
    """`encode(rows) -> (ids, mask)` of shape [n, 4]; rows are (order, family, genus, species) names."""

    buckets: int = 4096

    @property
    def config(self) -> dict:
        return asdict(self)

    @property
    def vocab_size(self) -> int:
        return self.buckets + 1

    def encode(self, rows: list[tuple[str, str, str, str]]) -> tuple[np.ndarray, np.ndarray]:
        ids = np.zeros((len(rows), len(RANKS)), dtype=np.int64)
        for i, row in enumerate(rows):
            for j, (rank, name) in enumerate(zip(RANKS, row, strict=True)):
                if is_classified(name):
                    ids[i, j] = 1 + _hash(f"{rank}:{name}") % self.buckets
        return ids, ids != PAD_ID


def lineage_ids(rows: list[tuple[str, str, str, str]], indices: list[int]) -> np.ndarray:
    """int64 [n, 4]: per rank, a 63-bit hash of the names from the order down to that rank; where that rank
    (or one above it) is not classified, a negative id unique to the record (`indices`) and rank."""
    out = np.empty((len(rows), len(RANKS)), dtype=np.int64)
    for i, (row, index) in enumerate(zip(rows, indices, strict=True)):
        known = True
        for j in range(len(RANKS)):
            known = known and is_classified(row[j])
            out[i, j] = _hash("|".join(row[: j + 1])) >> 1 if known else -1 - index * len(RANKS) - j
    return out


def token_groups(ids, mask):
    """int64 per row, equal for equal visible token rows (a wrapping polynomial hash of the ids)."""
    import torch

    weights = torch.tensor([1, 1_000_003, 999_999_000_001, 3_141_592_653_589_793], device=ids.device)
    return (ids.masked_fill(~mask, PAD_ID) * weights[: ids.shape[1]]).sum(1)
