"""The one place where loader batches become model input on the device: uint8 NCHW -> float [-1, 1], with
batched augmentation (random resized crop, flips) done as one `grid_sample` on the device.

Workers only decode and resize to a fixed square, so they never draw random numbers: every random choice is
made here from the device's global generator, which the trainers seed per step (exact resume).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def to_pm1(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.float().mul_(2 / 255).sub_(1)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def random_resized_crop(x: torch.Tensor, size: int, scale: tuple[float, float] = (0.5, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True,
                        vflip: bool = False) -> torch.Tensor:  # fmt: skip
    """Per image: a crop of random area share in `scale` and aspect in `ratio`, resized to `size`, and random
    flips, all in one bilinear `grid_sample` (x is float NCHW)."""
    n, device = x.shape[0], x.device
    area = torch.empty(n, device=device).uniform_(*scale)
    log_ratio = torch.empty(n, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    cx = (torch.rand(n, device=device) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, device=device) * 2 - 1) * (1 - h)
    sign_x = (
        torch.where(torch.rand(n, device=device) < 0.5, -1.0, 1.0) if hflip else torch.ones(n, device=device)
    )
    sign_y = (
        torch.where(torch.rand(n, device=device) < 0.5, -1.0, 1.0) if vflip else torch.ones(n, device=device)
    )
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2] = w * sign_x, cx
    theta[:, 1, 1], theta[:, 1, 2] = h * sign_y, cy
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def device_images(images: torch.Tensor, device, size: int, train: bool, vflip: bool = False,
                  scale: tuple[float, float] = (0.5, 1.0)) -> torch.Tensor:  # fmt: skip
    """A loader's uint8 batch as model input on `device`: augmented (train) or centre-cropped (eval)."""
    x = to_pm1(images.to(device, non_blocking=True))
    if train:
        return random_resized_crop(x, size, scale=scale, vflip=vflip)
    return center_crop(x, size) if x.shape[-1] != size else x
