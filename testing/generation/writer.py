"""The output of a generate run: per-image PNGs in group folders, a grid with one row per group, a manifest."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from core.atomic import atomic_dir, write_text
from datasets.transforms import to_uint8_images
from testing.sampling import png_bytes, save_grid

GRID_MIN_CELL = 32  # pixels: smaller images (8x8 digits) are enlarged in the grid, never in images/


def slug(text: str) -> str:
    """A folder name from a condition: letters, digits, '.', '-', '_' and '=' kept, the rest '_'."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_") or "all"


def to_rgb(x: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Model outputs as [-1, 1] RGB NCHW: one-channel images become grey RGB, other ranges are rescaled."""
    low, high = value_range
    x = (x.float() - low) / (high - low) * 2 - 1
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class SampleWriter:
    """`with SampleWriter(out, mode, checkpoint_hash) as w: w.add(images, rows, group)`.

    `images/` is built beside its final place and renamed when the run completes, so it appears whole or not
    at all; rows of the manifest get `file`, `mode` and `checkpoint` added. `grid.png` shows each group as one
    row (at most `grid_columns` images of it)."""

    def __init__(self, out_dir: str | os.PathLike, mode: str, checkpoint_hash: str, grid_columns: int = 16):
        self.out_dir, self.mode, self.checkpoint = Path(out_dir), mode, checkpoint_hash
        self.grid_columns = grid_columns
        self.rows: list[dict] = []
        self.grid_rows: list[np.ndarray] = []
        self.counts: dict[str, int] = {}

    def __enter__(self) -> SampleWriter:
        self._atomic = atomic_dir(self.out_dir / "images")
        self.tmp = self._atomic.__enter__()
        return self

    def add(self, images: torch.Tensor, rows: list[dict], group: str) -> None:
        """[-1, 1] RGB images of one group (appended to it) with one manifest row each."""
        pixels = to_uint8_images(images)
        folder = self.tmp / group
        folder.mkdir(parents=True, exist_ok=True)
        start = self.counts.get(group, 0)
        for k, (image, row) in enumerate(zip(pixels, rows, strict=True)):
            name = f"{start + k:06d}.png"
            (folder / name).write_bytes(png_bytes(image))
            self.rows.append(
                {"file": f"images/{group}/{name}", "mode": self.mode, **row, "checkpoint": self.checkpoint}
            )
        if start == 0:
            self.grid_rows.append(pixels[: self.grid_columns])
        else:
            index = list(self.counts).index(group)
            missing = self.grid_columns - len(self.grid_rows[index])
            if missing > 0:
                self.grid_rows[index] = np.concatenate([self.grid_rows[index], pixels[:missing]])
        self.counts[group] = start + len(pixels)

    def __exit__(self, *exc) -> None:
        self._atomic.__exit__(*exc)
        if exc[0] is not None:
            return
        columns = max(len(r) for r in self.grid_rows)
        h, w, c = self.grid_rows[0].shape[1:]
        grid = np.zeros((len(self.grid_rows), columns, h, w, c), dtype=np.uint8)
        for i, row in enumerate(self.grid_rows):
            grid[i, : len(row)] = row
        scale = max(1, GRID_MIN_CELL // max(h, w))
        cells = grid.reshape(-1, h, w, c).repeat(scale, axis=1).repeat(scale, axis=2)
        save_grid(cells, self.out_dir / "grid.png", columns=columns)
        write_text(self.out_dir / "manifest.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))

    def summary(self) -> dict:
        return {"n": len(self.rows), "groups": dict(self.counts), "images": str(self.out_dir / "images"),
                "grid": str(self.out_dir / "grid.png"), "manifest": str(self.out_dir / "manifest.jsonl")}  # fmt: skip
