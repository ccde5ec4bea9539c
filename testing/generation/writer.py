"""The output of a generate run: per-image PNGs in group folders, a labelled grid with one row per group, a manifest.

Images are written as they come and the manifest is streamed to a temporary file, so a run of any length holds
at most one batch of images and one grid's cells in memory."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from core.atomic import atomic_dir, atomic_path, write_bytes, write_text
from datasets.transforms import to_uint8_images
from testing.generation.grid import labelled_grid
from testing.sampling import png_bytes

GRID_COLUMNS = 16  # cells per grid row; longer groups show an evenly spaced or leading subset


def slug(text: str) -> str:
    """A folder name from a condition: letters, digits, '.', '-', '_' and '=' kept, the rest '_'."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_") or "all"


def to_rgb(x: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Model outputs as [-1, 1] RGB NCHW: one-channel images become grey RGB, other ranges are rescaled."""
    low, high = value_range
    x = (x.float() - low) / (high - low) * 2 - 1
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def evenly_spaced(total: int, count: int = GRID_COLUMNS) -> set[int]:
    """Indices of `count` items spread evenly over `total` (the first and the last included)."""
    return set(np.linspace(0, total - 1, min(total, count)).round().astype(int).tolist())


class SampleWriter:
    """`with SampleWriter(out, mode, checkpoint_hash, rows="species", columns="seed") as w: w.add(images, rows,
    group, labels)`.

    `images/` is built beside its final place and renamed when the run completes, so it appears whole or not
    at all; rows of the manifest get `file`, `mode` and `checkpoint` added. `grid.png` shows each group as one
    labelled row (the `grid_columns` first images of it, or those `add` marks with `grid`); `rows` and `columns`
    name what rows and columns are in the grid's title; `grid.json` gives every cell's file, label and box."""

    def __init__(self, out_dir: str | os.PathLike, mode: str, checkpoint_hash: str, grid_columns: int = GRID_COLUMNS,
                 rows: str = "group", columns: str = "sample"):  # fmt: skip
        self.out_dir, self.mode, self.checkpoint = Path(out_dir), mode, checkpoint_hash
        self.grid_columns, self.rows_are, self.columns_are = grid_columns, rows, columns
        self.grid: dict[str, list] = {}  # group -> [cells, column labels, row label]
        self.counts: dict[str, int] = {}

    def __enter__(self) -> SampleWriter:
        self._atomic = atomic_dir(self.out_dir / "images")
        self.tmp = self._atomic.__enter__()
        self._manifest_ctx = atomic_path(self.out_dir / "manifest.jsonl")
        self._manifest = open(self._manifest_ctx.__enter__(), "w", encoding="utf-8")  # noqa: SIM115
        return self

    def add(self, images: torch.Tensor, rows: list[dict], group: str, labels: list[str] | None = None,
            row_label: str | None = None, grid: list[bool] | None = None) -> None:  # fmt: skip
        """[-1, 1] RGB images of one group (appended to it) with one manifest row each; `labels` name each
        image's column in the grid (default: its seed), `row_label` the group's row (default: the group),
        `grid` marks the images the grid shows (default: the group's first `grid_columns`)."""
        pixels = to_uint8_images(images)
        folder = self.tmp / group
        folder.mkdir(parents=True, exist_ok=True)
        start = self.counts.get(group, 0)
        cells, column_labels, _, files = self.grid.setdefault(group, [[], [], row_label or group, []])
        for k, (image, row) in enumerate(zip(pixels, rows, strict=True)):
            name = f"{start + k:06d}.png"
            (folder / name).write_bytes(png_bytes(image))
            entry = {
                "file": f"images/{group}/{name}",
                "mode": self.mode,
                **row,
                "checkpoint": self.checkpoint,
            }
            self._manifest.write(json.dumps(entry) + "\n")
            shown = grid[k] if grid is not None else start + k < self.grid_columns
            if shown and len(cells) < self.grid_columns:
                cells.append(image)
                column_labels.append(labels[k] if labels is not None else _default_label(row, start + k))
                files.append(entry["file"])
        self.counts[group] = start + len(pixels)

    def __exit__(self, *exc) -> None:
        self._manifest.close()
        self._atomic.__exit__(*exc)
        self._manifest_ctx.__exit__(*exc)
        if exc[0] is not None:
            return
        shown = [part for part in self.grid.values() if part[0]]
        title = f"generate {self.mode}: rows = {self.rows_are}, columns = {self.columns_are}"
        image, boxes = labelled_grid([np.stack(p[0]) for p in shown], [p[2] for p in shown], [p[1] for p in shown],
                                     title)  # fmt: skip
        layout = {"title": title, "rows": [
            {"label": p[2], "cells": [{"file": f, "label": lb, "box": list(b)} for f, lb, b in zip(p[3], p[1], row, strict=True)]}
            for p, row in zip(shown, boxes, strict=True)]}  # fmt: skip
        write_bytes(self.out_dir / "grid.png", png_bytes(image))
        write_text(self.out_dir / "grid.json", json.dumps(layout, indent=1))

    def summary(self) -> dict:
        return {"n": sum(self.counts.values()), "groups": dict(self.counts), "images": str(self.out_dir / "images"),
                "grid": str(self.out_dir / "grid.png"), "manifest": str(self.out_dir / "manifest.jsonl")}  # fmt: skip


def _default_label(row: dict, index: int) -> str:
    seed = row.get("seed")
    return f"seed {seed}" if seed is not None else f"#{index}"
