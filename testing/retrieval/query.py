"""`retrieve query`: identify specimens from image files and DNA barcodes against an embedding index.

Each image and each barcode is one query. The answer lists the k nearest keys with cosine score and taxonomy,
the prediction at every rank (the nearest key's label, as in the paper) with its support (the similarity-
weighted share of the k keys that agree), and a "possibly novel species" flag when the best score is below the
threshold calibrated on validation (`retrieve evaluate --on val`) or given with `--min-sim`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from core.errors import UserError
from core.search import search
from datasets.bioscan.hdf5 import square_uint8
from datasets.bioscan.taxonomy import RANKS
from datasets.gpu_transforms import square_images


def embed_images(model, paths: list[Path], device) -> np.ndarray:
    from datasets.images import open_rgb

    spec = model.spec
    pixels = np.stack([square_uint8(open_rgb(p), spec.load_size) for p in paths])
    with torch.inference_mode():
        x = square_images(torch.from_numpy(pixels), device, spec.image_size, train=False)
        return model.encode("image", {"image": x}).cpu().numpy()


def embed_dna(model, sequences: list[str], device) -> np.ndarray:
    ids, mask = model.spec.dna_tokenizer.encode(sequences)
    inputs = {"dna_ids": torch.from_numpy(ids).to(device), "dna_mask": torch.from_numpy(mask).to(device)}
    with torch.inference_mode():
        return model.encode("dna", inputs).cpu().numpy()


def answer(index, vectors: np.ndarray, key_modality: str, k: int, threshold: float | None,
           backend: str = "torch", device: str = "cpu") -> list[dict]:  # fmt: skip
    """Per query: neighbours, per-rank prediction and support, best score and novelty flag."""
    scores, top = search(vectors, index.keys(key_modality), k, backend=backend, device=device)
    results = []
    for row_scores, row in zip(scores, top, strict=True):
        neighbours = [{"score": float(s), "id": str(index.labels["id"][i]),
                       **{r: str(index.labels[r][i]) for r in RANKS}} for s, i in zip(row_scores, row, strict=True)]  # fmt: skip
        weights = np.clip(row_scores, 0, None) + 1e-12
        prediction = {}
        for r in RANKS:
            labels = index.labels[r][row]
            prediction[r] = {
                "label": str(labels[0]),
                "support": float(weights[labels == labels[0]].sum() / weights.sum()),
            }
        best = float(row_scores[0])
        results.append({"neighbours": neighbours, "prediction": prediction, "best_score": best,
                        "novel": None if threshold is None else best < threshold, "threshold": threshold})  # fmt: skip
    return results


def run_query(model, index, images: list[Path], dna: list[tuple[str, str]], key_modality: str, k: int,
              min_sim: float | None, device, backend: str = "torch") -> list[dict]:  # fmt: skip
    """Embed every query, search the index and attach the query's name and modality."""
    queries: list[tuple[str, str, np.ndarray]] = []
    if images:
        for path, vector in zip(images, embed_images(model, images, device), strict=True):
            queries.append((str(path), "image", vector))
    if dna:
        for (name, _), vector in zip(dna, embed_dna(model, [s for _, s in dna], device), strict=True):
            queries.append((name, "dna", vector))
    stored = index.novelty()
    out = []
    for name, modality, vector in queries:
        pair = f"{modality}:{key_modality}"
        threshold = min_sim if min_sim is not None else stored.get(pair, {}).get("threshold")
        result = answer(index, vector[None], key_modality, k, threshold, backend, str(device))[0]
        out.append({"query": name, "modality": modality, "keys": key_modality, **result})
    return out


def check_image_files(paths: list[os.PathLike]) -> list[Path]:
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.is_file():
            raise UserError(f"--image {path} does not exist")
    return paths
