"""The CUB loader on hand-made folders with the official file quirks, and kagglehub's pinned cache offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_cub import make_mini_cub
from PIL import Image

from core.errors import UserError
from datasets.cub import CUBDataset, find_cub_root, read_cub_meta, split_indices
from datasets.transforms import build_transform


def test_float_boxes_modes_and_attributes(tmp_path):
    root = make_mini_cub(tmp_path / "CUB_200_2011")
    meta = read_cub_meta(tmp_path)  # the parent folder is accepted too
    assert meta.root == root
    assert meta.boxes.dtype == np.float64 and meta.boxes[0].tolist() == [10.0, 5.5, 20.0, 30.0]
    data = CUBDataset(root, "trainval", transform=build_transform(32, train=False), attributes=True)
    items = [data[i] for i in range(len(data))]
    for item in items:  # RGB, grayscale, palette and CMYK files all come out as 3 channels in [-1, 1]
        assert item["image"].shape == (3, 32, 32)
        assert float(item["image"].min()) >= -1.0 and float(item["image"].max()) <= 1.0
    # attribute labels land on the right image, including the line with an extra field
    assert data.attribute_names == ["has_bill_shape::curved", "has_wing_color::blue"]
    by_index = {int(data.indices[i]): items[i]["attributes"].tolist() for i in range(len(data))}
    assert by_index[0] == [1.0, 0.0] and by_index[1] == [0.0, 1.0]


def test_missing_attributes_are_optional(tmp_path):
    root = make_mini_cub(tmp_path, attributes=False)
    data = CUBDataset(root, "test")
    assert data.attributes is None and "attributes" not in data[0]
    with pytest.raises(UserError, match="attributes"):
        CUBDataset(root, "test", attributes=True)


def test_bbox_crop_uses_float_box(tmp_path):
    root = make_mini_cub(tmp_path)
    data = CUBDataset(root, "test", bbox_crop=True)
    img = data.load_image(0)
    assert img.size == (20, 31)  # x 10..30, y 5.5..35.5 -> floor/ceil to 5..36


def test_val_split_is_carved_from_train(tmp_path):
    root = make_mini_cub(tmp_path)
    meta = read_cub_meta(root)
    train = set(split_indices(meta, "train", 0.25, seed=0))
    val = set(split_indices(meta, "val", 0.25, seed=0))
    test = set(split_indices(meta, "test", 0.25, seed=0))
    assert not train & val and not (train | val) & test
    assert train | val == set(np.flatnonzero(meta.is_train))
    assert sorted(meta.labels[list(val)]) == [0, 1]  # one per class (stratified)
    assert set(split_indices(meta, "val", 0.25, seed=0)) == val  # deterministic


def test_missing_file_is_named(tmp_path):
    root = make_mini_cub(tmp_path)
    (root / "train_test_split.txt").unlink()
    with pytest.raises(UserError, match="train_test_split.txt"):
        read_cub_meta(root)
    with pytest.raises(UserError, match="no CUB-200-2011 copy"):
        find_cub_root(tmp_path / "images")


def test_truncated_image_named_or_skipped(tmp_path):
    root = make_mini_cub(tmp_path)
    meta = read_cub_meta(root)
    bad = root / "images" / meta.paths[0]
    bad.write_bytes(bad.read_bytes()[:100])
    data = CUBDataset(root, "trainval", transform=build_transform(16, train=False))
    with pytest.raises(UserError, match=str(bad.name)):
        data[0]
    skipping = CUBDataset(root, "trainval", transform=build_transform(16, train=False), skip_bad_images=True)
    from datasets.registry import collate_skipping

    batch = collate_skipping([skipping[i] for i in range(len(skipping))])
    assert batch["skipped"] == 1 and batch["image"].shape[0] == len(skipping) - 1


def test_augmentation_is_fresh_at_every_fetch(tmp_path):
    root = make_mini_cub(tmp_path)
    data = CUBDataset(root, "train", transform=build_transform(24, train=True))
    torch.manual_seed(0)
    first = data[0]["image"]
    second = data[0]["image"]
    assert not torch.equal(first, second)


KAGGLE_DIR = ("datasets", "wenewone", "cub2002011")


def test_kagglehub_pinned_cache_offline(tmp_path, monkeypatch):
    pytest.importorskip("kagglehub")
    from datasets.kaggle import CUB_VERSION, download_cub

    cache = tmp_path / "kaggle"
    version_dir = cache.joinpath(*KAGGLE_DIR, "versions", str(CUB_VERSION))
    make_mini_cub(version_dir / "CUB_200_2011")
    cache.joinpath(*KAGGLE_DIR, f"{CUB_VERSION}.complete").write_text("")
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(cache))
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # any network attempt fails at once
    path = download_cub()
    assert path == version_dir
    assert read_cub_meta(find_cub_root(path)).num_classes == 2


def test_kagglehub_uncached_offline_says_what_to_do(tmp_path, monkeypatch):
    from datasets.kaggle import download_cub

    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "empty"))
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    with pytest.raises(UserError, match="prefetch cub"):
        download_cub()


def test_kagglehub_absent_is_one_line(monkeypatch):
    """Without the kagglehub package, CUB without --data-dir is a UserError saying what to do."""
    from datasets.kaggle import download_cub

    monkeypatch.setitem(__import__("sys").modules, "kagglehub", None)  # `import kagglehub` now fails
    with pytest.raises(UserError, match=r"pip install kagglehub.*--data-dir") as err:
        download_cub()
    assert "\n" not in str(err.value)


def test_folder_dataset_split_is_stable(tmp_path):
    from datasets.folder import read_folder_meta

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for k in range(10):
            Image.new("RGB", (8, 8), (k * 20, 0, 0)).save(tmp_path / c / f"{k}.png")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    meta = read_folder_meta(tmp_path)
    assert meta.class_names == ["a", "b"] and len(meta.paths) == 20
    Image.new("RGB", (8, 8)).save(tmp_path / "b" / "new.png")
    again = read_folder_meta(tmp_path)
    old = dict(zip(meta.paths, meta.is_train, strict=True))
    assert all(old[p] == t for p, t in zip(again.paths, again.is_train, strict=True) if p in old)


def test_imagenet_weights_offline_says_what_to_do(tmp_path, monkeypatch):
    from models.classifiers import build_classifier

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    with pytest.raises(UserError, match="prefetch weights resnet18"):
        build_classifier("resnet18", 10, "imagenet")


def test_local_torchvision_weights_load_backbone_and_keep_head(tmp_path):
    import torchvision

    from models.classifiers import build_classifier

    reference = torchvision.models.resnet18(weights=None)  # ImageNet layout: 1000-class head
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    model = build_classifier("resnet18", 10, str(tmp_path / "resnet18.pth"))
    assert torch.equal(model.net.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    assert model.net.fc.weight.shape == (10, 512)
