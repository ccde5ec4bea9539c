"""One pass over a split: every record's image is decoded once and every requested modality embedded from the
same batch (the reference decoded each image once per modality). Embeddings are unit vectors, float32 by
default (as the reference evaluates; float16 halves an index), written into the given arrays (NumPy memory
maps for an index), so memory stays bounded on large splits."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import DataLoader

from core.device import autocast, loader_settings
from core.progress import Progress
from datasets.bioscan.augment import train_images
from datasets.bioscan.hdf5 import BioscanSplit
from datasets.gpu_transforms import square_images


def split_dataset(model, path: str | os.PathLike, split: str, modalities) -> BioscanSplit:
    spec = model.spec
    return BioscanSplit(path, split, tuple(modalities), spec.load_size, spec.dna_tokenizer, spec.text_tokenizer,
                        text_tokens=spec.text_arch == "bert")  # fmt: skip


def model_inputs(batch: dict, device, image_size: int, train: bool = False, vflip: bool = False,
                 crop_scale: tuple[float, float] = (0.08, 1.0), rotation: float = 0.0) -> dict:  # fmt: skip
    """A loader batch on `device`: images augmented (datasets/bioscan/augment.py) or centre-cropped in
    [-1, 1], token tensors moved."""
    out = {}
    for name, value in batch.items():
        if name == "image":
            if train:
                out[name] = train_images(value, device, image_size, batch.get("source_size"), crop_scale, vflip,
                                         rotation)  # fmt: skip
            else:
                out[name] = square_images(value, device, image_size, False)
        elif isinstance(value, torch.Tensor) and name != "source_size":
            out[name] = value.to(device, non_blocking=True)
    return out


def embed_split(model, path: str | os.PathLike, split: str, modalities, device, batch_size: int = 256,
                num_workers: int | None = None, amp: bool = True, out: dict | None = None,
                quiet: bool = False, dtype=np.float32) -> dict[str, np.ndarray]:  # fmt: skip
    """{modality: [N, D] unit vectors of `dtype`} for every record of `split` (into `out`'s arrays when given)."""
    dataset = split_dataset(model, path, split, modalities)
    n, dim = len(dataset), model.spec.embed_dim
    out = out if out is not None else {m: np.empty((n, dim), dtype=dtype) for m in modalities}
    settings = {**loader_settings(device, num_workers), "persistent_workers": False}
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, **settings)
    was_training = model.training
    model.eval()
    start = 0
    with torch.inference_mode(), Progress(len(loader), f"embed {split}", enabled=not quiet) as bar:
        for batch in loader:
            inputs = model_inputs(batch, device, model.spec.image_size)
            with autocast(device, amp):
                for m in modalities:
                    vectors = model.encode(m, inputs)
                    out[m][start : start + len(vectors)] = vectors.cpu().numpy()
            start += len(batch["index"])
            bar.update(1)
    model.train(was_training)
    return out
