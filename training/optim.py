"""Optimisers and learning-rate schedules shared by the trainers (schedules count optimiser steps or epochs)."""

from __future__ import annotations

import torch

from core.errors import UserError

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("none", "step", "cosine")


def build_optimizer(params, name: str, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                    fused: bool = False):  # fmt: skip
    """`fused`: one kernel for the whole update (CUDA; the CPU keeps torch's default implementation)."""
    fused = fused or None
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused)
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0, fused=fused
        )
    raise UserError(f"unknown optimizer {name!r}; choices: {', '.join(OPTIMIZERS)}")


def build_schedule(optimizer, name: str, total: int, step_size: int = 30, gamma: float = 0.1):
    """A scheduler stepped once per unit (epoch or optimiser step) over `total` units."""
    if name == "none":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total))
    raise UserError(f"unknown schedule {name!r}; choices: {', '.join(SCHEDULES)}")
