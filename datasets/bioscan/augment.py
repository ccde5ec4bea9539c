"""CLIBD's training augmentation on the device, for whole batches: RandomResizedCrop of the Resize(256) image
(torchvision's rule, drawn by `datasets.gpu_transforms.sample_crops` in the image's own geometry), horizontal
and vertical flips, and RandomRotation of up to +-`rotation` degrees about the crop's centre with the corners
filled black (torchvision's fill 0), all in one bilinear resample of the uint8 batch the loader shipped.

The loader ships each image squashed to a square with its `source_size` (the Resize(256) image's height and
width), or a centre square (`source_size` absent): crops are drawn in that geometry either way. One resample
replaces the reference's three (resize, crop-resize, nearest-neighbour rotation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from datasets.gpu_transforms import sample_crops, to_pm1


def crop_flip_rotate(x: torch.Tensor, source_size: torch.Tensor, crops: torch.Tensor, size: int,
                     hflips: torch.Tensor | None = None, vflips: torch.Tensor | None = None,
                     angles: torch.Tensor | None = None, fill: float = -1.0) -> torch.Tensor:  # fmt: skip
    """Crops (top, left, height, width) in source pixels of images `x` [N, C, L, L] that show their source of
    (height, width) squashed, each resized to `size` x `size`, mirrored where `hflips`, turned upside down
    where `vflips`, then rotated by `angles` degrees with what falls outside the crop set to `fill`."""
    n = len(x)
    hw = source_size.to(x.dtype)
    top, left, h, w = crops.to(x.dtype).unbind(1)
    sx, sy = w / hw[:, 1], h / hw[:, 0]
    cx, cy = (2 * left + w) / hw[:, 1] - 1, (2 * top + h) / hw[:, 0] - 1
    fx = torch.ones(n, dtype=x.dtype, device=x.device) if hflips is None else 1 - 2 * hflips.to(x.dtype)
    fy = torch.ones(n, dtype=x.dtype, device=x.device) if vflips is None else 1 - 2 * vflips.to(x.dtype)
    radians = (
        torch.zeros(n, dtype=x.dtype, device=x.device)
        if angles is None
        else angles.to(x.dtype) * (math.pi / 180)
    )
    cos, sin = radians.cos(), radians.sin()
    # output point p -> rotated q = R p -> flipped -> source c + s (f * q)
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = sx * fx * cos, -sx * fx * sin, cx
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = sy * fy * sin, sy * fy * cos, cy
    shape = [n, x.shape[1], size, size]
    out = F.grid_sample(x, F.affine_grid(theta, shape, align_corners=False), mode="bilinear",
                        padding_mode="border", align_corners=False)  # fmt: skip
    if angles is None:
        return out
    rotation = torch.zeros_like(theta)
    rotation[:, 0, 0], rotation[:, 0, 1], rotation[:, 1, 0], rotation[:, 1, 1] = cos, -sin, sin, cos
    inside = (F.affine_grid(rotation, shape, align_corners=False).abs() <= 1).all(-1)  # [N, size, size]
    return torch.where(inside[:, None], out, torch.full_like(out, fill))


def train_images(images: torch.Tensor, device, size: int, source_size: torch.Tensor | None = None,
                 scale: tuple[float, float] = (0.08, 1.0), vflip: bool = False, rotation: float = 0.0) -> torch.Tensor:  # fmt: skip
    """A uint8 batch [N, C, L, L] as augmented model input in [-1, 1] on `device` (module docstring)."""
    x = to_pm1(images.to(device, non_blocking=True))
    n = len(x)
    if source_size is None:
        hw = torch.tensor([[x.shape[-2], x.shape[-1]]], device=x.device).expand(n, 2)
    else:
        hw = source_size.to(x.device, non_blocking=True)
    crops = sample_crops(hw, scale)
    coin = torch.rand(n, 2, device=x.device) < 0.5
    angles = (torch.rand(n, device=x.device) * 2 - 1) * rotation if rotation else None
    return crop_flip_rotate(x, hw, crops, size, coin[:, 0], coin[:, 1] if vflip else None, angles)
