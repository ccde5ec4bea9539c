"""VisCoIN's training losses, each a small function mapping one line of the paper/reference to code.

All cross-entropies between distributions use log_softmax (numerically safe), and the classifier's outputs
are targets (detached): f is frozen and only explained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.viscoin import concept_activations


def soft_cross_entropy(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """-sum_c softmax(target)_c * log_softmax(logits)_c, averaged over the batch; the target is detached."""
    return (
        -(F.softmax(target_logits.detach().float(), dim=1) * F.log_softmax(logits.float(), dim=1))
        .sum(1)
        .mean()
    )


def output_fidelity(logits_f: torch.Tensor, logits_theta: torch.Tensor) -> torch.Tensor:
    """Theta must reproduce f's output distribution."""
    return soft_cross_entropy(logits_f, logits_theta)


def sparsity(concepts: torch.Tensor) -> torch.Tensor:
    """mean |L2-normalised max-pooled activations| + mean |concept maps| (few concepts per image)."""
    pooled = F.normalize(concept_activations(concepts).float(), dim=1)
    return pooled.abs().mean() + concepts.float().abs().mean()


def orthogonality(weight: torch.Tensor) -> torch.Tensor:
    """(sum |W_hat| |W_hat|^T - K) / K^2 with W_hat the row-normalised concept filters (conv5, K x C).

    Taking |.| before the Gram product penalises overlapping filter magnitudes (as the reference does).
    """
    rows = weight.flatten(1).float()
    k = rows.shape[0]
    normalised = F.normalize(rows, dim=1).abs()
    return ((normalised @ normalised.T).sum() - k) / k**2


def reconstruction(
    x_hat: torch.Tensor,
    x: torch.Tensor,
    logits_f: torch.Tensor,
    logits_hat: torch.Tensor,
    lpips_distance: torch.Tensor | None,
    beta: float,
    gamma: float,
) -> dict[str, torch.Tensor]:
    """L1 + L2 + gamma * CE(f(x) -> f(x_hat)) + beta * LPIPS(x_hat, x); parts returned for logging."""
    parts = {
        "l1": (x_hat.float() - x.float()).abs().mean(),
        "l2": (x_hat.float() - x.float()).pow(2).mean(),
        "ce_rec": soft_cross_entropy(logits_f, logits_hat),
    }
    total = parts["l1"] + parts["l2"] + gamma * parts["ce_rec"]
    if lpips_distance is not None:
        parts["lpips"] = lpips_distance.float().mean()
        total = total + beta * parts["lpips"]
    parts["rec"] = total
    return parts


def w_regulariser(ws: torch.Tensor, w_avg: torch.Tensor) -> torch.Tensor:
    """||w - w_avg||^2 (mean): keeps decoded styles near the pretrained generator's W distribution."""
    return (ws.float() - w_avg.detach().float()).pow(2).mean()
