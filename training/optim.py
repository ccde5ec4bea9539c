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


def optimiser_step(
    opt: torch.optim.Optimizer, module: torch.nn.Module, loss: torch.Tensor, world: int
) -> None:
    """Backward, average gradients over ranks by hand (one flat all-reduce: no DDP wrapper, which keeps a
    double backward such as R1's simple), replace non-finite values, step."""
    import torch.distributed as dist

    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in module.parameters() if p.grad is not None]
    if params:
        flat = torch.cat([p.grad.flatten() for p in params])
        if world > 1:
            dist.all_reduce(flat)
            flat /= world
        torch.nan_to_num(flat, nan=0.0, posinf=1e5, neginf=-1e5, out=flat)
        for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
            p.grad.copy_(g.view_as(p))
    opt.step()
