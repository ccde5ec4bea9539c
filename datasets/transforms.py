"""Image transforms producing the project's one pixel convention: float32 RGB in [-1, 1], CHW.

Augmentation is applied at every fetch (nothing transformed is cached), so every epoch sees new crops.
"""

from __future__ import annotations


def to_tensor_pm1():
    """PIL -> float tensor in [-1, 1]."""
    import torch
    from torchvision.transforms import v2

    return v2.Compose(
        [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)]
    )


def build_transform(image_size: int, train: bool, crop_scale: tuple[float, float] = (0.5, 1.0)):
    """Train: random resized crop + horizontal flip. Eval: resize (short side x 8/7) + centre crop."""
    from torchvision.transforms import v2

    if train:
        geometry = [
            v2.RandomResizedCrop(image_size, scale=crop_scale, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    else:
        geometry = [v2.Resize(round(image_size * 8 / 7), antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([*geometry, to_tensor_pm1()])


def square_transform(image_size: int):
    """Short side to `image_size`, centre crop: the whole image, as a generator should learn it (no zoom-in)."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size), to_tensor_pm1()])


def to_uint8_images(x):
    """[-1, 1] float NCHW -> uint8 NHWC numpy, for saving figures and PNGs."""
    return (
        ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to("cpu").byte().permute(0, 2, 3, 1).numpy()
    )
