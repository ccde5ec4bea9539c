"""The BIOSCAN-CLIP evaluation protocol: queries of the seen and unseen validation (or test) splits are searched
among all keys (open set); at every rank the prediction is the label of the nearest key, and top-k counts a hit
when the true label is among the labels of the k nearest keys (not a vote).

Micro = share of queries correct; macro = mean over the true classes present of the per-class recall;
H.M. = 2su/(s+u), 0 when either is 0. As in CLIBD, `not_classified` is a label like any other: a query whose
true label at a rank is `not_classified` counts there, and is correct when its key's label is `not_classified`
too (`unclassified=False` leaves such queries out instead). `chance` is the top-1 accuracy of predicting the
label of a uniformly random key. Per-class rows give every true class's query count and hits (macro's terms).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from core.search import search
from datasets.bioscan.taxonomy import RANKS, is_classified

KS = (1, 3, 5)


def hits(true: np.ndarray, predicted: np.ndarray, ks=KS) -> dict[int, np.ndarray]:
    """{k: bool [Q]}: is true[q] among predicted[q, :k]? (`predicted` holds the labels of the top keys)."""
    match = predicted == true[:, None]
    return {k: match[:, :k].any(1) for k in ks}


def micro(hit: np.ndarray) -> float:
    return float(hit.mean()) if len(hit) else float("nan")


def macro(hit: np.ndarray, true: np.ndarray) -> float:
    """Mean over the classes present in `true` of the share of their queries that hit."""
    if not len(hit):
        return float("nan")
    classes, inverse = np.unique(true, return_inverse=True)
    per_class = np.bincount(inverse, weights=hit.astype(float)) / np.bincount(inverse)
    return float(per_class.mean()) if len(classes) else float("nan")


def harmonic_mean(seen: float, unseen: float) -> float:
    if not seen or not unseen or np.isnan(seen) or np.isnan(unseen):
        return 0.0
    return 2 * seen * unseen / (seen + unseen)


def chance(true: np.ndarray, key_labels: np.ndarray) -> float:
    """Expected top-1 accuracy when the prediction is the label of a random key."""
    labels, counts = np.unique(key_labels, return_counts=True)
    share = dict(zip(labels.tolist(), (counts / len(key_labels)).tolist(), strict=True))
    return float(np.mean([share.get(t, 0.0) for t in true])) if len(true) else float("nan")


def split_kind(split: str) -> str:
    """`val_seen` -> seen, `test_unseen` -> unseen, BIOSCAN-5M's `other_heldout` -> heldout."""
    if "heldout" in split:
        return "heldout"
    return "unseen" if split.endswith("unseen") else "seen"


def score_queries(query_labels: dict[str, np.ndarray], key_labels: dict[str, np.ndarray], top: np.ndarray,
                  ks=KS, unclassified: bool = True, per_class: list | None = None) -> list[dict]:  # fmt: skip
    """Rows (rank, metric, k, value) for one query split given its top key indices [Q, max k]; per-class rows
    (rank, class, k, queries, correct, accuracy) are appended to `per_class` when given."""
    rows = []
    for rank in RANKS:
        true = np.asarray(query_labels[rank], dtype=object)
        keep = np.ones(len(true), dtype=bool)
        if not unclassified:
            keep = np.array([is_classified(t) for t in true], dtype=bool)
        predicted = np.asarray(key_labels[rank], dtype=object)[top[keep]]
        hit = hits(true[keep], predicted, ks)
        for k in ks:
            rows.append({"rank": rank, "metric": "micro", "k": k, "value": micro(hit[k])})
            rows.append({"rank": rank, "metric": "macro", "k": k, "value": macro(hit[k], true[keep])})
        rows.append({"rank": rank, "metric": "chance", "k": 1, "value": chance(true[keep], key_labels[rank])})
        if per_class is not None and keep.any():
            classes, inverse = np.unique(true[keep].astype(str), return_inverse=True)
            counts = np.bincount(inverse, minlength=len(classes))
            for k in ks:
                correct = np.bincount(inverse, weights=hit[k].astype(float), minlength=len(classes))
                per_class.extend({"rank": rank, "class": c, "k": k, "queries": int(n), "correct": int(h),
                                  "accuracy": float(h / n)} for c, n, h in zip(classes, counts, correct, strict=True))  # fmt: skip
    return rows


class ProtocolResult(NamedTuple):
    rows: list[dict]  # (query, key, split, kind, rank, metric, k, value)
    best: dict  # (query modality, key modality, split) -> best score of every query
    per_class: list[dict]  # (query, key, split, kind, rank, class, k, queries, correct, accuracy)


def evaluate_pairs(queries: dict[str, dict[str, np.ndarray]], query_labels: dict[str, dict[str, np.ndarray]],
                   keys: dict[str, np.ndarray], key_labels: dict[str, np.ndarray], pairs: list[tuple[str, str]],
                   ks=KS, backend: str = "torch", device: str = "cpu", unclassified: bool = True) -> ProtocolResult:  # fmt: skip
    """Long-format rows, the best score of every query per (pair, split) and per-class rows, from query and
    key embeddings (unit vectors)."""
    rows, best, per_class = [], {}, []
    for q_mod, k_mod in pairs:
        for split, embeddings in queries.items():
            scores, top = search(embeddings[q_mod], keys[k_mod], max(ks), backend=backend, device=device)
            best[(q_mod, k_mod, split)] = scores[:, 0]
            where = {"query": q_mod, "key": k_mod, "split": split, "kind": split_kind(split)}
            classes: list[dict] = []
            for row in score_queries(query_labels[split], key_labels, top, ks, unclassified, classes):
                rows.append({**where, **row})
            per_class.extend({**where, **row} for row in classes)
    return ProtocolResult(rows, best, per_class)


def paper_table(rows: list[dict]):
    """The paper's layout: one row per (query, key, metric, k), columns <rank>_seen / _unseen / _hm."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    wide = frame.pivot_table(index=["query", "key", "metric", "k"], columns=["rank", "kind"], values="value",
                             aggfunc="first")  # fmt: skip
    out = pd.DataFrame(index=wide.index)
    for rank in RANKS:
        seen = wide.get((rank, "seen"))
        unseen = wide.get((rank, "unseen"))
        out[f"{rank}_seen"] = seen if seen is not None else np.nan
        out[f"{rank}_unseen"] = unseen if unseen is not None else np.nan
        if seen is not None and unseen is not None:
            out[f"{rank}_hm"] = [harmonic_mean(s, u) for s, u in zip(seen, unseen, strict=True)]
    return out.reset_index()


def selection_score(rows: list[dict], selection: str = "micro_macro") -> float:
    """Model selection: the mean top-1 over pairs, ranks and the seen and unseen splits, of micro and macro
    accuracy (CLIBD's, "micro_macro") or of micro accuracy only ("micro")."""
    metrics = ("micro", "macro") if selection == "micro_macro" else ("micro",)
    values = [r["value"] for r in rows if r["metric"] in metrics and r["k"] == 1 and not np.isnan(r["value"])]
    return float(np.mean(values)) if values else 0.0
