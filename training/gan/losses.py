"""StyleGAN2 losses and the small formulas around them, each one function that maps onto the paper's lines.

- Non-saturating logistic loss (Goodfellow et al. 2014): G minimises softplus(-D(G(z))); D minimises
  softplus(D(G(z))) + softplus(-D(x)).
- R1 (Mescheder et al. 2018): per-sample squared norm of dD(x)/dx on reals, weighted gamma/2.
- Path-length regulariser (Karras et al. 2020): deviation of |J_w^T y| from its running mean.
- Lazy regularisation: a regulariser applied every k steps with its loss multiplied by k, and Adam's lr and
  betas corrected by k/(k+1) so the main + regularisation steps together behave like one step per batch.
- Generator EMA with a half-life of `ema_kimg` thousand images (optionally ramped up early in training).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def g_nonsaturating(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator loss: mean softplus(-D(G(z)))."""
    return F.softplus(-fake_logits.float()).mean()


def d_logistic(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator loss: mean softplus(D(G(z))) + mean softplus(-D(x))."""
    return F.softplus(fake_logits.float()).mean() + F.softplus(-real_logits.float()).mean()


def r1_penalty(real_images: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample sum of squared gradients of D's logits w.r.t. the real images (kept in the graph).

    `real_images` must require grad and `real_logits` must have been computed from them.
    """
    (grad,) = torch.autograd.grad(real_logits.float().sum(), real_images, create_graph=True)
    return grad.float().square().sum(dim=[1, 2, 3])


def path_lengths(images: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """Per-sample |J_w^T y| for y ~ N(0, I) / sqrt(H*W): the length the path-length regulariser steers."""
    noise = torch.randn_like(images) / math.sqrt(images.shape[2] * images.shape[3])
    (grad,) = torch.autograd.grad((images * noise).sum(), ws, create_graph=True)
    return grad.square().sum(dim=2).mean(dim=1).sqrt()


def path_length_penalty(
    lengths: torch.Tensor, pl_mean: torch.Tensor, decay: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(per-sample penalty, new running mean)`: (|J^T y| - a)^2 where a is the decayed mean of the lengths."""
    new_mean = pl_mean.lerp(lengths.detach().mean(), decay)
    return (lengths - new_mean).square(), new_mean


def lazy_regularization(lr: float, betas: tuple[float, float], interval: int) -> tuple[float, tuple]:
    """Adam settings for a network regularised every `interval` steps: lr * r, betas ** r, r = k/(k+1)."""
    ratio = interval / (interval + 1)
    return lr * ratio, (betas[0] ** ratio, betas[1] ** ratio)


def ema_beta(batch_size: int, nimg: int, ema_kimg: float, rampup: float | None = None) -> float:
    """Per-step EMA decay for a half-life of `ema_kimg` kimg, shortened to `rampup * nimg` early on."""
    ema_nimg = ema_kimg * 1000
    if rampup is not None:
        ema_nimg = min(ema_nimg, nimg * rampup)
    return 0.5 ** (batch_size / max(ema_nimg, 1e-8))


@torch.no_grad()
def update_ema(G_ema: torch.nn.Module, G: torch.nn.Module, beta: float) -> None:
    """p_ema <- p + beta * (p_ema - p) for parameters; buffers (w_avg, noise maps) copied as they are."""
    ema_params = list(G_ema.parameters())
    params = [p.detach() for p in G.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - beta)
    for b_ema, b in zip(G_ema.buffers(), G.buffers(), strict=True):
        b_ema.copy_(b)
