"""Phylo-NN's losses and schedule, each a small function that maps onto the papers' lines.

Stage 1, the VQGAN (Esser et al. 2021, taming-transformers' `VQLPIPSWithDiscriminator`, hinge variant):
- reconstruction: per pixel |x - x'| + w_p * LPIPS(x, x') (the LPIPS term per image, broadcast), averaged;
- VQ: codebook ||sg(z) - e||^2 + beta * commitment ||z - sg(e)||^2 (models.phylo.quantizer);
- adversarial: the generator minimises -D(x'); D minimises the hinge 0.5 (relu(1 - D(x)) + relu(1 + D(x'))),
  both switched on at `disc_start`; the generator's term is scaled by the adaptive weight
  ||grad_L rec|| / (||grad_L adv|| + 1e-4) at the decoder's last layer L, clamped to [0, 1e4], times
  `disc_weight` (0.8 in the paper's config).
Stage 2, the disentangler (Elhamod et al. 2023):
- L1 between the frozen stage-1 features and their reconstruction, plus the disentangler's VQ loss;
- kernel orthogonality of `conv_in`: ||W * W - I||_F (the kernel convolved with itself against the identity at
  the centre; for 1x1 kernels ||W W^T - I||_F);
- the level heads' cross-entropies, beta * (sum over ancestor levels + species) + (1 - beta) * species, as the
  public PhyloLoss sums them (the species once inside the beta-weighted sum and once beside it);
- the free part's adversary: a species classifier on the free codes trained with its own optimiser on detached
  codes (`adversary_loss`), while the disentangler minimises log C - H(adversary(free)) through the frozen
  adversary (`confusion`), so the gradient reaches the encoder, which the public code's no_grad branch never did.
The schedule: cosine annealing with warm restarts (cycle 150, floor 0.01 x lr in the paper).
Every function returns device tensors; none reads a value back to the host.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.phylo.quantizer import codebook_commitment

__all__ = [
    "adaptive_weight",
    "adversary_loss",
    "codebook_commitment",
    "confusion_loss",
    "cosine_warm_restarts",
    "disc_factor",
    "disentangler_losses",
    "entropy",
    "hinge_d_loss",
    "hinge_g_loss",
    "kernel_orthogonality",
    "phylo_loss",
    "reconstruction_loss",
    "vqgan_discriminator_losses",
    "vqgan_generator_losses",
]

# ----------------------------------------------------------------------------------------- stage 1


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x')))."""
    return 0.5 * (F.relu(1.0 - real_logits.float()).mean() + F.relu(1.0 + fake_logits.float()).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator loss against a hinge discriminator: -mean D(x')."""
    return -fake_logits.float().mean()


def disc_factor(step: int, start: int, factor: float = 1.0) -> float:
    """The adversarial terms' factor: 0 before step `start`, `factor` from then on (taming's adopt_weight)."""
    return factor if step >= start else 0.0


def adaptive_weight(
    rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """||d rec / d L|| / (||d adv / d L|| + 1e-4), clamped to [0, 1e4], detached, times `scale`: the weight
    that gives the adversarial gradient at the decoder's last layer L the size of the reconstruction's."""
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    weight = rec_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, 1e4).detach() * scale


def reconstruction_loss(
    x: torch.Tensor, recon: torch.Tensor, lpips=None, perceptual_weight: float = 1.0
) -> dict[str, torch.Tensor]:
    """`l1` (mean |x - x'|), `perceptual` (mean LPIPS; 0 without an LPIPS module) and `nll`, the mean of
    |x - x'| + w_p * LPIPS per pixel: the term the adaptive weight balances."""
    l1 = (x.float() - recon.float()).abs()
    if lpips is not None and perceptual_weight > 0:
        perceptual = lpips(x.float(), recon.float()).view(-1)
    else:
        perceptual = torch.zeros(x.shape[0], device=x.device)
    nll = (l1 + perceptual_weight * perceptual.view(-1, 1, 1, 1)).mean()
    return {"l1": l1.mean(), "perceptual": perceptual.mean(), "nll": nll}


def vqgan_generator_losses(
    model,
    discriminator,
    x: torch.Tensor,
    step: int,
    lpips=None,
    perceptual_weight: float = 1.0,
    codebook_weight: float = 1.0,
    disc_weight: float = 0.8,
    disc_start: int = 0,
    disc_factor_value: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The VQGAN's side of one step: `loss` = nll + d_weight * factor * adv + codebook_weight * vq, with its
    parts, `recon` for the discriminator's step, and the codes `indices` and pre-quantisation vectors `z` (for
    codebook restarts). The discriminator is frozen here (no gradient is kept)."""
    out = model(x)
    rec = reconstruction_loss(x, out["recon"], lpips, perceptual_weight)
    factor = disc_factor(step, disc_start, disc_factor_value)
    zero = torch.zeros((), device=x.device)
    g_loss, weight = zero, zero
    if factor > 0:
        discriminator.requires_grad_(False)
        g_loss = hinge_g_loss(discriminator(out["recon"]))
        weight = adaptive_weight(rec["nll"], g_loss, model.last_layer, disc_weight)
    loss = rec["nll"] + weight * factor * g_loss + codebook_weight * out["vq_loss"]
    return {"loss": loss, **rec, "vq": out["vq_loss"], "codebook": out["codebook"], "commitment": out["commitment"],
            "g_loss": g_loss, "d_weight": weight, "recon": out["recon"], "indices": out["indices"], "z": out["z"]}  # fmt: skip


def vqgan_discriminator_losses(
    discriminator, x: torch.Tensor, recon: torch.Tensor, step: int, disc_start: int = 0,
    disc_factor_value: float = 1.0,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """The discriminator's side of one step on real images and (detached) reconstructions: `loss` = factor x
    hinge, and the mean logits; zeros without a forward pass before `disc_start`."""
    factor = disc_factor(step, disc_start, disc_factor_value)
    if factor == 0:
        zero = torch.zeros((), device=x.device)
        return {"loss": zero, "logits_real": zero, "logits_fake": zero}
    discriminator.requires_grad_(True)
    real, fake = discriminator(x.detach()), discriminator(recon.detach())
    return {"loss": factor * hinge_d_loss(real, fake), "logits_real": real.float().mean(),
            "logits_fake": fake.float().mean()}  # fmt: skip


# ----------------------------------------------------------------------------------------- stage 2


def kernel_orthogonality(weight: torch.Tensor, stride: int = 1, padding: int = 0) -> torch.Tensor:
    """||W * W - I||_F: the kernel [out, in, k, k] convolved with itself, against the identity at the centre
    (Wang et al. 2020's orthogonal convolutions, as Phylo-NN's OrthogonalLoss)."""
    out = F.conv2d(weight.float(), weight.float(), stride=stride, padding=padding)
    target = torch.zeros_like(out)
    centre = out.shape[-1] // 2
    target[:, :, centre, centre] = torch.eye(out.shape[0], device=out.device)
    return (out - target).norm()


def phylo_loss(level_logits: list[torch.Tensor], groups: torch.Tensor, beta: float) -> torch.Tensor:
    """beta * (sum of every level's cross-entropy, the species' included) + (1 - beta) * the species';
    `groups` [L, N] holds each sample's group index per level, the species last."""
    ce = [F.cross_entropy(logits.float(), groups[level]) for level, logits in enumerate(level_logits)]
    return beta * torch.stack(ce).sum() + (1 - beta) * ce[-1]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-row entropy (nats) of softmax(logits)."""
    log_p = logits.float().log_softmax(1)
    return -(log_p.exp() * log_p).sum(1)


def confusion_loss(adversary_logits: torch.Tensor) -> torch.Tensor:
    """log C - H(p), averaged: 0 when the adversary is uniform over the C species, log C when it is certain."""
    return (math.log(adversary_logits.shape[1]) - entropy(adversary_logits)).mean()


def adversary_loss(adversary, free: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
    """The adversary's own cross-entropy on detached free codes (its optimiser steps only its weights)."""
    adversary.requires_grad_(True)
    return F.cross_entropy(adversary(free.detach()).float(), species)


def disentangler_losses(
    disentangler,
    features: torch.Tensor,
    groups: torch.Tensor,
    level_beta: float = 0.5,
    phylo_weight: float = 0.1,
    adv_weight: float = 0.1,
    ortho_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The disentangler's side of one step on frozen stage-1 `features` [N, C, S, S] with group targets
    `groups` [L, N]: `loss` = rec + vq + ortho_weight * ortho + phylo_weight * phylo + adv_weight * confusion,
    its parts, `free` (the free codes, for `adversary_loss`), and the `codes` and pre-quantisation vectors `z`
    (for codebook restarts). The adversary is frozen here."""
    disentangler.adversary.requires_grad_(False)
    out = disentangler(features)
    rec = (out["features"].float() - features.float()).abs().mean()
    ortho = kernel_orthogonality(disentangler.conv_in.weight)
    phylo = phylo_loss(out["level_logits"], groups, level_beta)
    confusion = confusion_loss(disentangler.adversary(out["free"]))
    loss = rec + out["vq_loss"] + ortho_weight * ortho + phylo_weight * phylo + adv_weight * confusion
    return {"loss": loss, "rec": rec, "vq": out["vq_loss"], "ortho": ortho, "phylo": phylo,
            "confusion": confusion, "free": out["free"], "level_logits": out["level_logits"], "codes": out["codes"],
            "z": out["z"]}  # fmt: skip


# ---------------------------------------------------------------------------------------- schedule


def cosine_warm_restarts(optimizer: torch.optim.Optimizer, cycle: int, floor: float = 0.01):
    """Cosine annealing from each group's lr down to `floor` x that lr over `cycle` scheduler steps, then a
    restart (SGDR, Loshchilov & Hutter 2017; Phylo-NN: cycle 150, floor 0.01). Resumable by its state_dict."""

    def factor(t: int) -> float:
        return floor + (1 - floor) * (1 + math.cos(math.pi * (t % cycle) / cycle)) / 2

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
