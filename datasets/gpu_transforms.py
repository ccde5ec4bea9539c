"""Loader batches -> model input on the device: where uint8 batches become float [-1, 1] NCHW and where the
train augmentation (torchvision's RandomResizedCrop + RandomHorizontalFlip, as `build_transform` has it) runs,
for the whole batch at once. The device is the GPU in training and the CPU in tests; the results agree.

Workers ship what `datasets.transforms.Uint8Images` makes, with a `geometry` row per item (mode, output size,
shipped size):
- eval/square: the final crop, made by the float path's own PIL operations, so `to_model_batch` only converts
  it (bit for bit the float path's tensor; a test checks it).
- train: the whole image (or box) squashed to load x load with its `source_size`; crops are drawn here in the
  source's pixel geometry by torchvision's rule (ten tries of area share and log-aspect, then the centre
  fallback), so their distribution is torchvision's, and applied with flips in one bilinear `grid_sample`.
- encoded: JPEG bytes, decoded here (nvJPEG on CUDA, batched), cropped to their box and resized per image.

Every random draw happens on the device from its global generator (which trainers seed per step), so no host
sync and no randomness in the workers. Batches without these keys (float images, VDNA's uint8 images) are
converted and moved as they are. `square_images` does the same for loaders that ship fixed uint8 squares
(retrieval's HDF5 reader): the same crops drawn in the square's geometry, or its centre crop for eval.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from datasets.transforms import UINT8_MODES, eval_resize

TRAIN, EVAL, SQUARE = (UINT8_MODES.index(m) for m in ("train", "eval", "square"))
CROP_SCALE = (0.5, 1.0)  # build_transform's default
CROP_RATIO = (3 / 4, 4 / 3)  # torchvision's default
CROP_ATTEMPTS = 10  # torchvision's


def mirror(images: torch.Tensor) -> torch.Tensor:
    """Flip each image left-right with probability 1/2 (the device's global generator)."""
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def to_pm1(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.float().mul_(2 / 255).sub_(1)


def sample_crops(source_size: torch.Tensor, scale: tuple[float, float] = CROP_SCALE,
                 ratio: tuple[float, float] = CROP_RATIO) -> torch.Tensor:  # fmt: skip
    """Per image of (height, width) `source_size` [N, 2]: a crop (top, left, height, width) [N, 4] in whole
    pixels, drawn as torchvision's `RandomResizedCrop.get_params` draws it (all attempts at once)."""
    hw = source_size.to(torch.float32)
    height, width = hw[:, :1], hw[:, 1:]
    n, device = len(hw), hw.device
    area = height * width * torch.empty(n, CROP_ATTEMPTS, device=device).uniform_(*scale)
    log_ratio = torch.empty(n, CROP_ATTEMPTS, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = log_ratio.exp()
    w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # the first attempt that fits
    found = fits.any(1)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    height, width = height[:, 0], width[:, 0]
    # torchvision's fallback: the centred crop of the whole image, its aspect clamped to `ratio`
    in_ratio = width / height
    fw = torch.where(in_ratio > ratio[1], (height * ratio[1]).round(), width)
    fh = torch.where(in_ratio < ratio[0], (width / ratio[0]).round(), height)
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    u = torch.rand(n, 2, device=device)
    top = torch.where(found, (u[:, 0] * (height - h + 1)).floor(), ((height - h) / 2).floor())
    left = torch.where(found, (u[:, 1] * (width - w + 1)).floor(), ((width - w) / 2).floor())
    return torch.stack([top, left, h, w], dim=1)


def crop_resize(x: torch.Tensor, source_size: torch.Tensor, crops: torch.Tensor, size: int,
                flips: torch.Tensor | None = None, vflips: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Crops (top, left, height, width) in source pixels of images `x` [N, C, L, L] that show their source of
    (height, width) squashed, each resized to `size` x `size` (bilinear), mirrored where `flips` and turned
    upside down where `vflips`."""
    hw = source_size.to(x.dtype)
    top, left, h, w = crops.to(x.dtype).unbind(1)
    sx, sy = w / hw[:, 1], h / hw[:, 0]
    cx, cy = (2 * left + w) / hw[:, 1] - 1, (2 * top + h) / hw[:, 0] - 1
    if flips is not None:
        sx = torch.where(flips, -sx, sx)
    if vflips is not None:
        sy = torch.where(vflips, -sy, sy)
    theta = torch.zeros(len(x), 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, sy, cy
    grid = F.affine_grid(theta, [len(x), x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def centre_crops(source_size: torch.Tensor, size: int) -> torch.Tensor:
    """The eval transform's geometry (short side to size * 8/7, centre crop `size`) as crops in source pixels."""
    hw = source_size.to(torch.float32)
    side = hw.min(1).values * (size / eval_resize(size))
    top, left = (hw[:, 0] - side) / 2, (hw[:, 1] - side) / 2
    return torch.stack([top, left, side, side], dim=1)


def decode_on_device(encoded: list[torch.Tensor], boxes: torch.Tensor, geometry: torch.Tensor,
                     device: torch.device) -> torch.Tensor:  # fmt: skip
    """Encoded batch -> the uint8 batch the workers would have shipped: JPEG bytes decoded on `device`
    (nvJPEG on CUDA, one batched call), other images (decoded by the workers) moved; each cropped to its box
    and resized as its geometry says (torch's antialiased resize: within one level of PIL's)."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2.functional import center_crop, resize

    jpegs = [i for i, data in enumerate(encoded) if data.ndim == 1]
    images = [data.to(device, non_blocking=True) if data.ndim == 3 else None for data in encoded]
    if jpegs:
        decoded = decode_jpeg([encoded[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
        for i, image in zip(jpegs, decoded, strict=True):
            images[i] = image
    out = []
    for image, box, (mode, size, load) in zip(images, boxes.tolist(), geometry.tolist(), strict=True):
        image = image[:, box[1] : box[3], box[0] : box[2]]
        if mode == TRAIN:
            out.append(resize(image, [load, load], antialias=True))
        else:
            out.append(
                center_crop(resize(image, eval_resize(size) if mode == EVAL else size, antialias=True), size)
            )
    return torch.stack(out)


def to_model_images(images: torch.Tensor, device, train: bool, geometry: torch.Tensor | None = None,
                    source_size: torch.Tensor | None = None, scale: tuple[float, float] = CROP_SCALE,
                    hflip: bool = True) -> torch.Tensor:  # fmt: skip
    """A loader's image batch as model input on `device`: float [-1, 1] NCHW, augmented when `train` and the
    batch was shipped for it (see the module docstring); float batches are only moved."""
    x = images.to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        x = to_pm1(x)
    if geometry is None or int(geometry[0, 0]) != TRAIN:
        return x
    size = int(geometry[0, 1])
    hw = source_size.to(device, non_blocking=True)
    if train:
        flips = torch.rand(len(x), device=x.device) < 0.5 if hflip else None
        return crop_resize(x, hw, sample_crops(hw, scale), size, flips)
    return crop_resize(x, hw, centre_crops(hw, size), size)


def square_images(images: torch.Tensor, device, size: int, train: bool, vflip: bool = False,
                  scale: tuple[float, float] = CROP_SCALE) -> torch.Tensor:  # fmt: skip
    """A batch of uint8 squares [N, C, L, L] as model input on `device`: for training, torchvision-rule crops of
    the square with horizontal (and, with `vflip`, vertical) flips, resized to `size`; for eval the centre
    `size` x `size` pixels."""
    x = to_pm1(images.to(device, non_blocking=True))
    side = x.shape[-1]
    if not train:
        offset = (side - size) // 2
        return x[..., offset : offset + size, offset : offset + size]
    hw = torch.tensor([[x.shape[-2], side]], device=x.device).expand(len(x), 2)
    coin = torch.rand(len(x), 2, device=x.device) < 0.5
    return crop_resize(x, hw, sample_crops(hw, scale), size, coin[:, 0], coin[:, 1] if vflip else None)


def to_model_batch(batch: dict, device, train: bool, scale: tuple[float, float] = CROP_SCALE,
                   hflip: bool = True, channels_last: bool = False) -> dict:  # fmt: skip
    """A collated loader batch on `device` with `image` as model input (float [-1, 1] NCHW; augmented when
    `train`, by random resized crops of area share `scale` and horizontal flips); other tensors moved with
    `non_blocking`, other values kept. The per-batch call every trainer and evaluator makes."""
    device = torch.device(device)
    geometry, source_size = batch.get("geometry"), batch.get("source_size")
    out = {key: value for key, value in batch.items()
           if key not in ("image", "encoded", "box", "geometry", "source_size")}  # fmt: skip
    for key, value in out.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.to(device, non_blocking=True)
    images = batch.get("image")
    if "encoded" in batch:
        images = decode_on_device(batch["encoded"], batch["box"], geometry, device)
    if images is not None:
        x = to_model_images(images, device, train, geometry, source_size, scale, hflip)
        out["image"] = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    return out
