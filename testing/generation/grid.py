"""Image grids that say what they show: a title naming what rows and columns are, a label beside every row
(species, node, condition, dimension) and above every column (seed, value, step), or under every cell when
rows differ. Cells are enlarged by nearest neighbour to at least `CELL` pixels so that 32 px samples and their
labels are readable at a glance. Pure PIL and numpy: the same cells give the same bytes."""

from __future__ import annotations

import math

import numpy as np

CELL = 96  # smallest side of a cell in the figure, in pixels
FONT_SIZE = 13
PAD = 6
GAP = 2
MAX_ROW_LABEL = 240  # pixels; longer row labels wrap onto the lines a cell's height holds


def _font(size: int = FONT_SIZE):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # FreeType's bundled font
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int, lines: int) -> list[str]:
    """`text` in at most `lines` lines of `width` pixels, broken between words (the last cut if need be)."""
    out, current = [], ""
    for word in text.split(" "):
        trial = f"{current} {word}".strip()
        if current and draw.textlength(trial, font=font) > width:
            out.append(current)
            current = word
        else:
            current = trial
    out.append(current)
    if len(out) > lines:
        out = out[: lines - 1] + [" ".join(out[lines - 1 :])]
    return [_fit(draw, line, font, width) for line in out]


def _fit(draw, text: str, font, width: int) -> str:
    """`text`, cut with an ellipsis until it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def labelled_grid(
    rows: list[np.ndarray],
    row_labels: list[str],
    column_labels: list[list[str]],
    title: str,
) -> tuple[np.ndarray, list[list[tuple[int, int, int, int]]]]:
    """(one HWC uint8 image, the (x, y, width, height) box of every cell): `rows[i]` [k_i, H, W, 3] uint8 cells
    in row i labelled `row_labels[i]`, cell j of row i labelled `column_labels[i][j]` (one header row when the
    rows' labels agree where they overlap)."""
    from PIL import Image, ImageDraw

    h, w = rows[0].shape[1:3]
    scale = max(1, math.ceil(CELL / max(h, w)))
    ch, cw = h * scale, w * scale
    columns = max(len(r) for r in rows)
    longest = max(column_labels, key=len)
    shared = all(labels == longest[: len(labels)] for labels in column_labels)
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = FONT_SIZE + 4
    left = min(MAX_ROW_LABEL, max(int(probe.textlength(t, font=font)) for t in row_labels)) + 2 * PAD
    top = line + PAD + (line if shared else 0)
    caption = 0 if shared else line
    width = max(left + columns * (cw + GAP), int(probe.textlength(title, font=font)) + 2 * PAD)
    height = top + len(rows) * (ch + caption + GAP) + PAD
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, PAD // 2), title, fill=(0, 0, 0), font=font)
    if shared:
        for j, label in enumerate(longest):
            x = left + j * (cw + GAP)
            text = _fit(draw, label, font, cw)
            draw.text(
                (x + (cw - draw.textlength(text, font=font)) / 2, top - line),
                text,
                fill=(60, 60, 60),
                font=font,
            )
    boxes = []
    for i, (cells, label) in enumerate(zip(rows, row_labels, strict=True)):
        y = top + i * (ch + caption + GAP)
        boxes.append([(left + j * (cw + GAP), y, cw, ch) for j in range(len(cells))])
        lines = _wrap(draw, label, font, left - 2 * PAD, max(1, ch // line))
        for k, text in enumerate(lines):
            draw.text((PAD, y + (ch - len(lines) * line) / 2 + k * line), text, fill=(0, 0, 0), font=font)
        for j, cell in enumerate(cells):
            x = left + j * (cw + GAP)
            canvas.paste(Image.fromarray(cell.repeat(scale, axis=0).repeat(scale, axis=1)), (x, y))
            if not shared:
                text = _fit(draw, column_labels[i][j], font, cw)
                draw.text((x + (cw - draw.textlength(text, font=font)) / 2, y + ch + 1), text, fill=(60, 60, 60),
                          font=font)  # fmt: skip
    return np.asarray(canvas), boxes
