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


def random_concepts(
    batch: int, n_concepts: int, k: int, exclude: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """(B, k) random concept indices per image, drawn without replacement among those not in `exclude`."""
    scores = torch.rand(batch, n_concepts, generator=generator).to(exclude.device)
    scores.scatter_(1, exclude, -1.0)  # never pick an excluded concept
    return scores.topk(k, dim=1).indices


def scale_concepts(concepts: torch.Tensor, indices: torch.Tensor, factor: float) -> torch.Tensor:
    """Copy of the concept maps with the selected concepts (B, k indices) multiplied by `factor`."""
    scale = torch.ones(concepts.shape[:2], device=concepts.device, dtype=concepts.dtype)
    scale.scatter_(1, indices, factor)
    return concepts * scale[:, :, None, None]


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
