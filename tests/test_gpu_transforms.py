"""The uint8 loader path and the device transform (datasets.gpu_transforms): eval tensors equal the float path's,
train crops follow torchvision's distribution and geometry, device decoding equals worker decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_cub import make_mini_cub
from PIL import Image

from datasets.cub import CUBDataset
from datasets.gpu_transforms import crop_resize, decode_on_device, sample_crops, to_model_batch, to_pm1
from datasets.registry import collate_skipping
from datasets.transforms import Uint8Images, build_transform, square_transform


def textured(path, width: int = 500, height: int = 375, seed: int = 0):
    """A photo-like JPEG: smooth colour waves, mid-frequency blotches and grain (no flat areas to hide shifts)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([90 + 30 * np.sin(2 * np.pi * (rng.uniform(0.005, 0.05) * xx + rng.uniform(0.005, 0.05) * yy))
                    for _ in range(3)], axis=2)  # fmt: skip
    blotches = rng.normal(0, 40, (height // 8, width // 8, 3)).clip(-127, 127).astype(np.int16) + 128
    img += (
        np.asarray(Image.fromarray(blotches.astype(np.uint8)).resize((width, height), Image.BICUBIC)) - 128.0
    )
    img += rng.normal(0, 5, img.shape)
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def batch_of(data, n: int | None = None) -> dict:
    return collate_skipping([data[i] for i in range(n or len(data))])


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    """The mini CUB (RGB/grayscale/CMYK JPEGs, palette PNGs, float boxes) plus CUB-sized photo-like JPEGs."""
    root = make_mini_cub(tmp_path_factory.mktemp("cub") / "CUB_200_2011")
    for k, rel in enumerate((root / "images.txt").read_text().split()[1::2][:2]):
        textured(root / "images" / rel, seed=k)  # two of them become 500 x 375 (still .jpg named)
    return root


@pytest.mark.parametrize("bbox", [False, True])
def test_eval_and_square_uint8_path_equals_float_path(cub, bbox):
    """Bit for bit: the same PIL operations in the workers, and the same [-1, 1] arithmetic on the device."""
    for size, float_tf, mode in (
        (32, build_transform(32, train=False), "eval"),
        (24, square_transform(24), "square"),
    ):
        floats = batch_of(CUBDataset(cub, "trainval", float_tf, bbox_crop=bbox))
        shipped = batch_of(CUBDataset(cub, "trainval", Uint8Images(size, mode), bbox_crop=bbox))
        assert shipped["image"].dtype == torch.uint8
        model_input = to_model_batch(shipped, "cpu", train=False)
        assert torch.equal(model_input["image"], floats["image"])
        assert torch.equal(model_input["label"], floats["label"]) and "geometry" not in model_input


def test_device_decoding_is_within_one_level(cub):
    """Encoded batches (JPEG bytes decoded by the device; CMYK and PNG decoded by the workers) give the eval
    tensors within one level of 255 (torch's resize against PIL's) and the train pixels exactly."""
    eval_floats = batch_of(CUBDataset(cub, "trainval", build_transform(32, train=False), bbox_crop=True))
    encoded = batch_of(CUBDataset(cub, "trainval", Uint8Images(32, "eval", encoded=True), bbox_crop=True))
    assert any(e.ndim == 1 for e in encoded["encoded"]) and any(e.ndim == 3 for e in encoded["encoded"])
    diff = (to_model_batch(encoded, "cpu", train=False)["image"] - eval_floats["image"]).abs().max()
    assert diff <= 2 / 255 + 1e-6
    # train: the squashed pixels are the workers' (except for the two 500 x 375 JPEGs, which the workers decode
    # at 1/4 scale instead: their geometry is checked in test_flip_rate_and_crop_geometry_match_torchvision)
    shipped = batch_of(CUBDataset(cub, "train", Uint8Images(32, "train")))
    encoded = batch_of(CUBDataset(cub, "train", Uint8Images(32, "train", encoded=True)))
    decoded = decode_on_device(encoded["encoded"], encoded["box"], encoded["geometry"], torch.device("cpu"))
    small = encoded["source_size"].min(1).values < 2 * 46  # no draft decoding in the workers
    assert decoded.shape == shipped["image"].shape == (len(decoded), 3, 46, 46) and small.sum() >= 3
    assert torch.equal(decoded[small], shipped["image"][small])
    torch.manual_seed(3)
    a = to_model_batch(shipped, "cpu", train=True)["image"]
    torch.manual_seed(3)
    b = to_model_batch(encoded, "cpu", train=True)["image"]
    assert torch.equal(a[small], b[small]) and a.shape == (len(a), 3, 32, 32)


def test_float_batches_pass_through_and_train_draws_are_seeded(cub):
    floats = batch_of(CUBDataset(cub, "train", build_transform(16, train=True)))
    moved = to_model_batch(floats, "cpu", train=True)
    assert torch.equal(moved["image"], floats["image"]) and moved["skipped"] == 0
    shipped = batch_of(CUBDataset(cub, "train", Uint8Images(16, "train")))
    torch.manual_seed(0)
    first = to_model_batch(shipped, "cpu", train=True)["image"]
    second = to_model_batch(shipped, "cpu", train=True)["image"]
    torch.manual_seed(0)
    again = to_model_batch(shipped, "cpu", train=True, channels_last=True)["image"]
    assert not torch.equal(first, second) and torch.equal(first, again)
    assert again.is_contiguous(memory_format=torch.channels_last)
    assert float(first.min()) >= -1 and float(first.max()) <= 1


@pytest.mark.parametrize("height, width", [(375, 500), (500, 333), (40, 50), (100, 1000)])
def test_train_crops_follow_torchvision(height, width):
    """Crop height, width, top and left have torchvision's distributions (two-sample Kolmogorov-Smirnov over
    4,000 draws each; (100, 1000) always takes torchvision's fallback, the centred crop, exactly)."""
    from torchvision.transforms import RandomResizedCrop

    n = 4000
    torch.manual_seed(0)
    ours = sample_crops(torch.tensor([[height, width]]).repeat(n, 1), (0.5, 1.0)).numpy()
    image = torch.empty(1, height, width)
    theirs = np.array([RandomResizedCrop.get_params(image, [0.5, 1.0], [3 / 4, 4 / 3]) for _ in range(n)])
    assert ((ours[:, 0] + ours[:, 2] <= height) & (ours[:, 1] + ours[:, 3] <= width)).all()
    assert (ours >= 0).all() and (ours == np.round(ours)).all()
    for column in range(4):
        a, b = np.sort(ours[:, column]), np.sort(theirs[:, column])
        grid = np.union1d(a, b)
        ks = np.abs(np.searchsorted(a, grid, "right") / n - np.searchsorted(b, grid, "right") / n).max()
        assert ks < 1.95 * np.sqrt(2 / n), (column, ks)  # alpha = 0.001


def test_flip_rate_and_crop_geometry_match_torchvision(tmp_path):
    """Half the images mirrored; and a crop drawn here, applied to the shipped (squashed, draft-decoded)
    image, shows what torchvision's resized_crop of the full image shows: mean error 0.024 (3 levels of 255;
    0.006 at 256 px), where a crop shifted by 4 pixels errs by 0.17."""
    from torchvision.transforms.v2 import functional as TF

    n, load = 4000, 12
    # dark on the left, bright on the right: a mirrored crop is brighter on its left
    ramp = torch.linspace(0, 255, load).round().to(torch.uint8).expand(n, 3, load, load)
    batch = {"image": ramp, "source_size": torch.tensor([[load, load]] * n),
             "geometry": torch.tensor([[0, 8, load]] * n)}  # fmt: skip
    torch.manual_seed(1)
    x = to_model_batch(batch, "cpu", train=True)["image"]
    flipped = float((x[..., :4].mean((1, 2, 3)) > x[..., 4:].mean((1, 2, 3))).float().mean())
    assert abs(flipped - 0.5) < 4 * 0.5 / np.sqrt(n)
    img = Image.open(textured(tmp_path / "a.jpg")).convert("RGB")
    shipped, (h, w) = Uint8Images(128, "train")(tmp_path / "a.jpg")
    hw = torch.tensor([[h, w]] * 16)
    crops = sample_crops(hw)
    reference = torch.stack([to_pm1(TF.pil_to_tensor(TF.resized_crop(img, *c, [128, 128], antialias=True)))
                             for c in crops.long().tolist()])  # fmt: skip
    x = to_pm1(shipped[None].repeat(16, 1, 1, 1))
    error = (crop_resize(x, hw, crops, 128) - reference).abs().mean()
    shifted = crops + torch.tensor([0, 4, 0, 0])
    assert error < 0.03 and (crop_resize(x, hw, shifted, 128) - reference).abs().mean() > 5 * error
    mirrored = crop_resize(x, hw, crops, 128, flips=torch.ones(16, dtype=torch.bool))
    assert (mirrored.flip(3) - reference).abs().mean() < 0.03


def test_classifier_evaluation_is_the_same_on_uint8_batches(cub):
    """`test classifier` evaluates uint8 batches now: the same loss, accuracies and confusion as float ones."""
    from torch.utils.data import DataLoader

    from models.classifiers import Classifier
    from testing.metrics import evaluate_classifier

    torch.manual_seed(0)
    model = Classifier("tiny", 2)
    results = []
    for transform in (build_transform(32, train=False), Uint8Images(32, "eval")):
        loader = DataLoader(CUBDataset(cub, "trainval", transform), batch_size=5, collate_fn=collate_skipping)
        results.append(evaluate_classifier(model, loader, torch.device("cpu"), 2, amp=False, progress=False))
    assert torch.equal(results[0].pop("confusion"), results[1].pop("confusion"))
    assert results[0] == results[1] and results[0]["n"] == 8
