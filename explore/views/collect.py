"""A `SampleWriter` that keeps what it is given in memory: the generation views pass it to the `generate`
command's own sampling functions, which write through `add`, and get the same PNG bytes the command writes."""

from __future__ import annotations

from explore.media import pngs


class MemoryWriter:
    """`add(images, rows, group)` as `testing.generation.writer.SampleWriter`: one item per image, its PNG bytes
    (the writer's conversion and encoder) with its manifest row and group."""

    def __init__(self):
        self.items: list[dict] = []

    def add(self, images, rows: list[dict], group: str, labels: list[str] | None = None,
            row_label: str | None = None, grid: list[bool] | None = None) -> None:  # fmt: skip
        """As `SampleWriter.add`; the grid's labels are kept with each item (`label`, `row_label`)."""
        for k, (png, row) in enumerate(zip(pngs(images), rows, strict=True)):
            label = labels[k] if labels is not None else None
            self.items.append(
                {**row, "png": png, "group": group, "label": label, "row_label": row_label or group}
            )
