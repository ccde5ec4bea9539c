"""Sampling from a StyleGAN2 generator: seeded latents, PNG folders with a manifest, image grids.

Latent `z` of seed `s` is `numpy.random.RandomState(s).randn(z_dim)`, the convention of NVlabs `generate.py`,
so an imported NVlabs snapshot gives here the images its own code gives for the same seeds. Image `i` of a
run uses seed `base + i`, so any image can be regenerated alone (`--seed base+i --n 1`); with
`noise_mode='random'` the per-layer noise is drawn per batch and such a re-run matches only in the same
batch layout, which is why `const` is the default.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from core.atomic import atomic_dir, write_bytes, write_text
from core.errors import UserError
from core.progress import Progress
from core.seeding import derive_seed
from datasets.transforms import to_uint8_images

NOISE_MODES = ("const", "random")
MAX_SEED = 2**32 - 1
GRID_MAX = 64


def check_sampling_args(n: int, seed: int, truncation: float, batch_size: int, noise_mode: str) -> None:
    """UserError for values no run can use; called before anything is written."""
    if n <= 0:
        raise UserError(f"--n must be positive, got {n}")
    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    if not 0.0 <= truncation <= 1.0:
        raise UserError(f"--truncation must be in [0, 1] (1 = no truncation), got {truncation}")
    if seed < 0 or seed + n - 1 > MAX_SEED:
        raise UserError(f"--seed must be in [0, {MAX_SEED - n + 1}] for --n {n}, got {seed}")
    if noise_mode not in NOISE_MODES:
        raise UserError(f"--noise-mode must be one of {', '.join(NOISE_MODES)}, got {noise_mode!r}")


def z_from_seeds(seeds: list[int], z_dim: int) -> torch.Tensor:
    """[len(seeds), z_dim] float32 latents, one RandomState(seed) draw per row (NVlabs' convention)."""
    rows = [np.random.RandomState(int(s)).randn(z_dim) for s in seeds]
    return torch.from_numpy(np.stack(rows)).float()


@torch.no_grad()
def render(G, z: torch.Tensor, truncation: float = 1.0, noise_mode: str = "const") -> torch.Tensor:
    """Images in [-1, 1] for latents `z` (moved to G's device)."""
    device = next(G.parameters()).device
    return G(z.to(device), truncation_psi=truncation, noise_mode=noise_mode)


def png_bytes(image: np.ndarray) -> bytes:
    """One HWC uint8 image as PNG bytes (deterministic: no timestamps or text chunks)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """[N, H, W, C] uint8 -> one [rows*H, columns*W, C] tile image (empty cells black)."""
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    padded = np.zeros((rows * columns, h, w, c), dtype=images.dtype)
    padded[:n] = images
    return padded.reshape(rows, columns, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, columns * w, c)


def save_grid(images: torch.Tensor | np.ndarray, path: str | os.PathLike, columns: int | None = None) -> Path:
    """Save [-1, 1] NCHW tensors (or uint8 NHWC arrays) as one PNG grid, atomically."""
    array = to_uint8_images(images) if isinstance(images, torch.Tensor) else images
    write_bytes(path, png_bytes(image_grid(array, columns)))
    return Path(path)


def seed_grid(images: np.ndarray, seed: int, columns: int = 8) -> np.ndarray:
    """The first images of a run as a labelled grid: row r holds seeds seed + r*columns + 0..columns-1."""
    from testing.generation.grid import labelled_grid

    rows = [images[i : i + columns] for i in range(0, len(images), columns)]
    labels = [
        f"seeds {seed + i}-{seed + i + len(r) - 1}"
        for i, r in zip(range(0, len(images), columns), rows, strict=True)
    ]
    offsets = [[f"+{j}" for j in range(len(r))] for r in rows]
    title = "generate gan: rows = seeds, columns = offset from the row's first seed"
    return labelled_grid(rows, labels, offsets, title)[0]


def generate_folder(
    G,
    out_dir: str | os.PathLike,
    n: int,
    seed: int = 0,
    truncation: float = 1.0,
    batch_size: int = 16,
    noise_mode: str = "const",
    checkpoint_hash: str | None = None,
    quiet: bool = False,
) -> dict:
    """Write `out_dir/images/NNNNNN.png` (image i from seed `seed + i`), `grid.png` and `manifest.jsonl`.

    The images folder appears complete or not at all (built beside it, then renamed). Returns a summary.
    """
    check_sampling_args(n, seed, truncation, batch_size, noise_mode)
    out_dir = Path(out_dir)
    seeds = list(range(seed, seed + n))
    manifest, grid = [], []
    with atomic_dir(out_dir / "images") as tmp, Progress(n, "generate", enabled=not quiet) as bar:
        for start in range(0, n, batch_size):
            chunk = seeds[start : start + batch_size]
            if noise_mode == "random":
                torch.manual_seed(derive_seed(seed, "noise", start // batch_size))
            images = to_uint8_images(render(G, z_from_seeds(chunk, G.z_dim), truncation, noise_mode))
            for offset, image in enumerate(images):
                index = start + offset
                name = f"{index:06d}.png"
                (tmp / name).write_bytes(png_bytes(image))
                manifest.append(
                    {"file": f"images/{name}", "mode": "gan", "condition": None, "seed": chunk[offset],
                     "truncation": truncation, "noise_mode": noise_mode, "checkpoint": checkpoint_hash}
                )  # fmt: skip
            if len(grid) < GRID_MAX:
                grid.extend(images[: GRID_MAX - len(grid)])
            bar.update(len(chunk))
    write_bytes(out_dir / "grid.png", png_bytes(seed_grid(np.stack(grid), seed)))
    write_text(out_dir / "manifest.jsonl", "".join(json.dumps(row) + "\n" for row in manifest))
    return {"n": n, "images": str(out_dir / "images"), "grid": str(out_dir / "grid.png")}
