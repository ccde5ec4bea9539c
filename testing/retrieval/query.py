"""`retrieve query`: identify specimens from image files, DNA barcodes and taxon names against an embedding
index.

Each image, barcode and taxon name is one query. The answer lists the k nearest keys with cosine score and
taxonomy, the prediction at every rank (the nearest key's label, as in the paper) with its support (the
similarity-weighted share of the k keys that agree), and a "possibly novel species" flag when the best score is
below the threshold calibrated on validation (`retrieve evaluate --on val`) or given with `--min-sim`.
Queries are embedded and searched in batches and answered one by one (`run_query` is a generator), so memory
stays bounded however many records a FASTA file holds.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from core.errors import UserError
from core.search import search
from datasets.bioscan.hdf5 import square_uint8
from datasets.bioscan.taxonomy import NOT_CLASSIFIED, RANKS
from datasets.gpu_transforms import square_images

BATCH = 256  # queries embedded and searched at once


def embed_pixels(model, pixels: np.ndarray, device) -> np.ndarray:
    """uint8 squares [N, 3, L, L] (L = the spec's load size) -> unit vectors, centre-cropped as in evaluation."""
    spec = model.spec
    with torch.inference_mode():
        x = square_images(torch.from_numpy(pixels), device, spec.image_size, train=False)
        return model.encode("image", {"image": x}).cpu().numpy()


def embed_dna(model, sequences: list[str], device) -> np.ndarray:
    ids, mask = model.spec.dna_tokenizer.encode(sequences)
    inputs = {"dna_ids": torch.from_numpy(ids).to(device), "dna_mask": torch.from_numpy(mask).to(device)}
    with torch.inference_mode():
        return model.encode("dna", inputs).cpu().numpy()


def parse_taxon(text: str) -> tuple[str, str, str, str]:
    """A taxon name as (order, family, genus, species): ranks separated by `;` or `|` (empty: not classified),
    or by spaces as in CLIBD's text ("Diptera Sciaridae Bradysia Bradysia nomica": the rest is the species)."""
    text = text.strip()
    if not text:
        raise UserError("--text is empty; give e.g. 'Diptera Sciaridae Bradysia' or 'Diptera;Sciaridae;;'")
    separator = next((s for s in ";|" if s in text), None)
    parts = [p.strip() for p in text.split(separator)] if separator else text.split(None, 3)
    if len(parts) > 4:
        raise UserError(
            f"--text {text!r} names {len(parts)} ranks; order, family, genus and species are four"
        )
    parts += [NOT_CLASSIFIED] * (4 - len(parts))
    return tuple(p or NOT_CLASSIFIED for p in parts)  # type: ignore[return-value]


def embed_text(model, texts: list[str], device, vocab: os.PathLike | None = None) -> np.ndarray:
    """Taxon names as unit vectors: ranks hashed by this project's text tower, or CLIBD's string "order family
    genus species" (missing ranks not_classified, as it trained) in WordPiece tokens of `vocab`."""
    rows = [parse_taxon(t) for t in texts]
    if model.spec.text_arch == "bert":
        from datasets.bioscan.wordpiece import WordPieceTokenizer

        if vocab is None:
            raise UserError("--text with a CLIBD model needs --text-vocab: BERT-small's vocab.txt "
                            "(prajjwal1/bert-small, the bert-base-uncased vocabulary)")  # fmt: skip
        ids, mask = WordPieceTokenizer(vocab).encode([" ".join(r) for r in rows])
    else:
        ids, mask = model.spec.text_tokenizer.encode(rows)
    inputs = {"text_ids": torch.from_numpy(ids).to(device), "text_mask": torch.from_numpy(mask).to(device)}
    with torch.inference_mode():
        return model.encode("text", inputs).cpu().numpy()


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


def check_min_sim(min_sim: float | None) -> None:
    if min_sim is not None and not (math.isfinite(min_sim) and -1 <= min_sim <= 1):
        raise UserError(f"--min-sim must be a cosine between -1 and 1, got {min_sim}")


def _batches(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def run_query(model, index, images: list[Path], dna: Iterable[tuple[str, str]], key_modality: str, k: int,
              min_sim: float | None, device, backend: str = "torch", texts: Iterable[str] = (),
              skip_bad_images: bool = False, on_skip=None, text_vocab: os.PathLike | None = None) -> Iterator[dict]:  # fmt: skip
    """Answer every query, batch by batch: images, then barcodes (any iterable of (name, sequence), read
    lazily), then taxon names. With `skip_bad_images`, an unreadable image is passed to `on_skip(path,
    message)` and left out."""
    from datasets.images import BadImageError, open_rgb

    check_min_sim(min_sim)
    stored = index.novelty()

    def answered(names: list[str], modality: str, vectors: np.ndarray) -> list[dict]:
        pair = f"{modality}:{key_modality}"
        threshold = min_sim if min_sim is not None else stored.get(pair, {}).get("threshold")
        results = answer(index, vectors, key_modality, k, threshold, backend, str(device))
        return [{"query": n, "modality": modality, "keys": key_modality, **r} for n, r in zip(names, results, strict=True)]  # fmt: skip

    for batch in _batches(images, 32):
        names, pixels = [], []
        for path in batch:
            try:
                pixels.append(square_uint8(open_rgb(path), model.spec.load_size))
                names.append(str(path))
            except BadImageError as err:
                if not skip_bad_images:
                    raise
                if on_skip is not None:
                    on_skip(path, str(err))
        if pixels:
            yield from answered(names, "image", embed_pixels(model, np.stack(pixels), device))
    for batch in _batches(dna, BATCH):
        yield from answered([n for n, _ in batch], "dna", embed_dna(model, [s for _, s in batch], device))
    for batch in _batches(texts, BATCH):
        yield from answered(list(batch), "text", embed_text(model, batch, device, text_vocab))


def check_image_files(paths: list[os.PathLike]) -> list[Path]:
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.is_file():
            raise UserError(f"--image {path} does not exist")
    return paths
