"""VisCoIN metric formulas on tensors, each small enough to check by hand (see tests/test_viscoin.py)."""

from __future__ import annotations

import torch

from models.viscoin import concept_activations


def prediction_counts(
    logits_f: torch.Tensor, logits_theta: torch.Tensor, labels: torch.Tensor
) -> dict[str, int]:
    """Correct predictions of f and of Theta, and fidelity = argmax agreement of Theta with f (counts)."""
    pred_f, pred_theta = logits_f.argmax(1), logits_theta.argmax(1)
    return {
        "correct_f": int((pred_f == labels).sum()),
        "correct_theta": int((pred_theta == labels).sum()),
        "agree": int((pred_f == pred_theta).sum()),
        "n": int(labels.numel()),
    }


def active_concepts(concepts: torch.Tensor, relative_threshold: float = 0.1) -> torch.Tensor:
    """Per image, how many concepts fire above `relative_threshold` x that image's strongest concept."""
    acts = concept_activations(concepts)
    peak = acts.amax(dim=1, keepdim=True)
    return ((acts > relative_threshold * peak) & (acts > 0)).sum(dim=1)


def relevance(concepts: torch.Tensor, weight: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """r_k = max-pooled activation_k x Theta's weight for the explained class, (B, K)."""
    return concept_activations(concepts) * weight[classes]


def top_relevant(concepts: torch.Tensor, weight: torch.Tensor, classes: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, k) of the k most relevant concepts for each image's class."""
    return relevance(concepts, weight, classes).topk(k, dim=1).indices


def top_k_mask(concepts: torch.Tensor, weight: torch.Tensor, classes: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (B, K) of the k most relevant concepts for each image's class."""
    mask = torch.zeros(concepts.shape[:2], dtype=torch.bool, device=concepts.device)
    return mask.scatter_(1, top_relevant(concepts, weight, classes, k), True)


def random_baseline(
    selected: torch.Tensor, scores: torch.Tensor, active: torch.Tensor | None = None
) -> torch.Tensor:
    """As many concepts per image as `selected` holds, drawn by `scores` (B, K in [0, 1)) among the others.

    Concepts that fire (`active`) are drawn first: removing or scaling a concept that is zero on the image
    changes nothing, and drawing such concepts would flatter the explanation it is compared with. When more
    than half the concepts are selected, all the unselected ones are taken (fewer than selected).
    """
    key = scores.float()
    if active is not None:
        key = key + (~active).float()
    ranks = key.masked_fill(selected, 3.0).argsort(dim=1).argsort(dim=1)
    return (ranks < selected.sum(dim=1, keepdim=True)) & ~selected


def scale_selected(concepts: torch.Tensor, mask: torch.Tensor, factor: float) -> torch.Tensor:
    """Concept maps (B, K, g, g) with the masked concepts multiplied by `factor` (the others untouched)."""
    factors = torch.tensor([1.0, factor], dtype=concepts.dtype, device=concepts.device)
    return concepts * factors[mask.long()][:, :, None, None]


def faithfulness(
    p_reconstruction: torch.Tensor, p_top_removed: torch.Tensor, p_random_removed: torch.Tensor
) -> dict[str, float]:
    """Mean probability drops of the explained class: removing the top concepts vs as many random ones.

    A faithful explanation gives drop_top >> drop_random; `faithfulness` is their difference.
    """
    drop_top = float((p_reconstruction - p_top_removed).mean())
    drop_random = float((p_reconstruction - p_random_removed).mean())
    return {"drop_top": drop_top, "drop_random": drop_random, "faithfulness": drop_top - drop_random}


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Column-wise 1-based ranks with ties given their average rank; values (N, K) -> (N, K) float64."""
    columns = values.T.contiguous().double()
    ordered = columns.sort(dim=1).values
    below = torch.searchsorted(ordered, columns, right=False)
    up_to = torch.searchsorted(ordered, columns, right=True)
    return ((below + up_to + 1).double() / 2).T


def attribute_auc(activations: torch.Tensor, attributes: torch.Tensor) -> torch.Tensor:
    """ROC AUC of each concept's activation as a detector of each binary attribute: (N,K), (N,A) -> (K,A).

    Mann-Whitney form: AUC = (sum of positive ranks - P(P+1)/2) / (P * Nn); ties count one half.
    Attributes that are all 0 or all 1 get NaN.
    """
    ranks = average_ranks(activations)  # (N, K)
    labels = attributes.double()
    positives = labels.sum(0)  # (A,)
    negatives = labels.shape[0] - positives
    rank_sums = ranks.T @ labels  # (K, A)
    auc = (rank_sums - positives * (positives + 1) / 2) / (positives * negatives)
    auc[:, (positives == 0) | (negatives == 0)] = float("nan")
    return auc
