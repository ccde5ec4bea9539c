"""The "possibly novel species" flag: a query is flagged when its best cosine score is below a threshold.
The threshold is calibrated on validation queries (seen vs unseen species) by Youden's J (true-positive rate
minus false-positive rate, flagging unseen as positive); AUROC measures how well the best score separates them
whatever the threshold."""

from __future__ import annotations

import numpy as np


def auroc(scores_seen: np.ndarray, scores_unseen: np.ndarray) -> float:
    """P(best score of a random unseen query < that of a random seen one), ties counted half (Mann-Whitney)."""
    n_s, n_u = len(scores_seen), len(scores_unseen)
    if not n_s or not n_u:
        return float("nan")
    values = np.concatenate([-scores_unseen, -scores_seen]).astype(np.float64)  # higher = more novel
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    for a, b in zip(starts, ends, strict=True):  # average ranks of ties
        ranks[order[a:b]] = (a + 1 + b) / 2
    return float((ranks[:n_u].sum() - n_u * (n_u + 1) / 2) / (n_u * n_s))


def calibrate(scores_seen: np.ndarray, scores_unseen: np.ndarray) -> dict:
    """Threshold maximising Youden's J (flag when score < threshold), with its rates and the AUROC."""
    candidates = np.unique(np.concatenate([scores_seen, scores_unseen]).astype(np.float64))
    cuts = np.r_[candidates[0] - 1e-6, (candidates[1:] + candidates[:-1]) / 2, candidates[-1] + 1e-6]
    tpr = np.searchsorted(np.sort(scores_unseen), cuts, side="left") / len(scores_unseen)
    fpr = np.searchsorted(np.sort(scores_seen), cuts, side="left") / len(scores_seen)
    best = int(np.argmax(tpr - fpr))
    return {"threshold": float(cuts[best]), "tpr": float(tpr[best]), "fpr": float(fpr[best]),
            "auroc": auroc(scores_seen, scores_unseen), "n_seen": len(scores_seen), "n_unseen": len(scores_unseen)}  # fmt: skip


def flag_rates(scores_seen: np.ndarray, scores_unseen: np.ndarray, threshold: float) -> dict:
    """Share of unseen queries flagged (true-positive rate) and of seen queries flagged (false-positive rate)."""
    return {"tpr": float((scores_unseen < threshold).mean()), "fpr": float((scores_seen < threshold).mean())}
