"""The BIOSCAN-CLIP evaluation protocol: queries of the seen and unseen validation (or test) splits are searched
among all keys (open set); at every rank the prediction is the label of the nearest key, and top-k counts a hit
when the true label is among the labels of the k nearest keys (not a vote).

Micro = share of queries correct; macro = mean over the true classes present of the per-class recall;
H.M. = 2su/(s+u), 0 when either is 0. Queries whose true label at a rank is `not_classified` do not count at
that rank. `chance` is the top-1 accuracy of predicting the label of a uniformly random key.
"""

from __future__ import annotations

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
    """`val_seen` -> seen, `test_unseen` -> unseen."""
    return "unseen" if split.endswith("unseen") else "seen"


def score_queries(query_labels: dict[str, np.ndarray], key_labels: dict[str, np.ndarray], top: np.ndarray,
                  ks=KS) -> list[dict]:  # fmt: skip
    """Rows (rank, metric, k, value) for one query split given its top key indices [Q, max k]."""
    rows = []
    for rank in RANKS:
        true = query_labels[rank]
        keep = np.array([is_classified(t) for t in true], dtype=bool)
        predicted = key_labels[rank][top[keep]]
        hit = hits(true[keep], predicted, ks)
        for k in ks:
            rows.append({"rank": rank, "metric": "micro", "k": k, "value": micro(hit[k])})
            rows.append({"rank": rank, "metric": "macro", "k": k, "value": macro(hit[k], true[keep])})
        rows.append({"rank": rank, "metric": "chance", "k": 1, "value": chance(true[keep], key_labels[rank])})
    return rows


def evaluate_pairs(queries: dict[str, dict[str, np.ndarray]], query_labels: dict[str, dict[str, np.ndarray]],
                   keys: dict[str, np.ndarray], key_labels: dict[str, np.ndarray], pairs: list[tuple[str, str]],
                   ks=KS, backend: str = "torch", device: str = "cpu") -> tuple[list[dict], dict]:  # fmt: skip
    """Long-format rows (query, key, split, kind, rank, metric, k, value) and the best score of every query
    per (pair, split), from query and key embeddings (unit vectors)."""
    rows, best = [], {}
    for q_mod, k_mod in pairs:
        for split, embeddings in queries.items():
            scores, top = search(embeddings[q_mod], keys[k_mod], max(ks), backend=backend, device=device)
            best[(q_mod, k_mod, split)] = scores[:, 0]
            for row in score_queries(query_labels[split], key_labels, top, ks):
                rows.append({"query": q_mod, "key": k_mod, "split": split, "kind": split_kind(split), **row})
    return rows, best


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


def selection_score(rows: list[dict]) -> float:
    """Model selection: the mean micro top-1 over pairs, ranks and the seen and unseen splits."""
    values = [r["value"] for r in rows if r["metric"] == "micro" and r["k"] == 1 and not np.isnan(r["value"])]
    return float(np.mean(values)) if values else 0.0
