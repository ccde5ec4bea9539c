"""VisCoIN metric formulas on tensors, each small enough to check by hand (see tests/test_viscoin.py)."""

from __future__ import annotations

import torch

from models.viscoin import concept_activations

DEFAULT_THRESHOLD = 0.2  # tau on the normalised relevance: `test viscoin`, `amplify` and the training probe


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


def normalised_relevance(relevance: torch.Tensor) -> torch.Tensor:
    """r_k / max_k |r_k| per image, in [-1, 1]; an all-zero row stays zero."""
    scale = relevance.abs().amax(dim=1, keepdim=True)
    return torch.where(scale > 0, relevance / scale.clamp_min(1e-30), torch.zeros_like(relevance))


def relevant_mask(relevance: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """The paper's important concepts: normalised relevance r_k / max|r| > tau, (B, K) bool."""
    return normalised_relevance(relevance) > threshold


def top_relevant(concepts: torch.Tensor, weight: torch.Tensor, classes: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, k) of the k most relevant concepts for each image's class."""
    return relevance(concepts, weight, classes).topk(k, dim=1).indices


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


def scale_concepts(concepts: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Concept maps (B, K, g, g) with concept k of image b multiplied by `factors[b, k]` ((B, K) or (1, K))."""
    return concepts * factors.to(concepts.dtype)[:, :, None, None]


def scale_selected(concepts: torch.Tensor, mask: torch.Tensor, factor: float) -> torch.Tensor:
    """Concept maps (B, K, g, g) with the masked concepts multiplied by `factor` (the others untouched)."""
    factors = torch.tensor([1.0, factor], dtype=concepts.dtype, device=concepts.device)
    return scale_concepts(concepts, factors[mask.long()])


def faithfulness(
    p_reconstruction: torch.Tensor, p_removed: torch.Tensor, p_random_removed: torch.Tensor
) -> dict[str, float]:
    """The paper's faithfulness and its random baseline, means over images of probability drops.

    VisCoIN (Parekh et al., ICLR 2025, arXiv 2407.01331, Sec. 4, following FLINT): for an image x whose
    explained class c is the interpretable network's prediction, the *important* concepts are those whose
    normalised relevance r_k / max_j |r_j| exceeds a threshold tau; they are removed (their activations set
    to 0) and the concepts are decoded again. Faithfulness is the drop in f's probability of c,
    FF_x = p_f(c | Omega(Phi(x), Phi'(x))) - p_f(c | Omega(Phi_removed(x), Phi'(x))), averaged over images
    (an image with no important concept removes nothing and counts with a drop of 0).
    `faithfulness_random` removes as many randomly drawn concepts (active ones first) instead: an
    explanation is faithful when its drop clearly exceeds this baseline.
    """
    return {
        "faithfulness": float((p_reconstruction - p_removed).mean()),
        "faithfulness_random": float((p_reconstruction - p_random_removed).mean()),
    }


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, l2: float = 1.0, steps: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-regularised logistic regression (weight, bias) on standardised features, float64, full-batch LBFGS.

    Minimises mean log-loss + l2 / (2 n) |w|^2 (scikit-learn's C = 1 / l2). Deterministic.
    """
    x, y = x.double(), y.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        opt.zero_grad()
        loss = (
            torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y)
            + l2 / (2 * len(x)) * w.square().sum()
        )
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def separability(original: torch.Tensor, modified: torch.Tensor, l2: float = 1.0) -> float:
    """Held-out accuracy of a linear classifier telling `modified` features (N, D) from `original` ones.

    Images with an even index train it, odd ones test it (an image's two versions stay on one side, so the
    classifier cannot recognise the image itself); features are standardised with the training half's mean
    and standard deviation. 0.5 is chance, 1 a change every image shows the same way.
    """
    train, test = slice(0, None, 2), slice(1, None, 2)
    x_train = torch.cat([original[train], modified[train]]).double()
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-12)
    labels = torch.cat([torch.zeros(len(original[train])), torch.ones(len(modified[train]))])
    w, b = fit_logistic((x_train - mean) / std, labels, l2)
    x_test = (torch.cat([original[test], modified[test]]).double() - mean) / std
    truth = torch.cat([torch.zeros(len(original[test])), torch.ones(len(modified[test]))]).bool()
    return float(((x_test @ w + b > 0) == truth).double().mean())


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


def mean_best_auc(auc: torch.Tensor) -> float:
    """Mean over concepts of the best max(AUC, 1 - AUC) over attributes (NaN attributes ignored)."""
    return float(torch.maximum(auc, 1 - auc).nan_to_num(0.0).amax(dim=1).mean())


def alignment_null(
    activations: torch.Tensor, attributes: torch.Tensor, permutations: int = 20, seed: int = 0
) -> torch.Tensor:
    """`mean_best_auc` for attribute labels shuffled across images, once per permutation, (permutations,).

    The max over many attributes and both polarities of a noisy AUC is biased upward; shuffling the rows of
    the attribute matrix keeps every attribute's frequency and their co-occurrence but breaks any link to
    the images, so these values are what the statistic gives for concepts unrelated to the attributes.
    """
    g = torch.Generator().manual_seed(seed)
    n = attributes.shape[0]
    return torch.tensor(
        [
            mean_best_auc(attribute_auc(activations, attributes[torch.randperm(n, generator=g)]))
            for _ in range(permutations)
        ]  # fmt: skip
    )
