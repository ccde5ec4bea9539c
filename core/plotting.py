"""Matplotlib helpers: a headless backend, and figures saved atomically next to the numbers behind them."""

from __future__ import annotations

import os
from pathlib import Path

from core.atomic import atomic_path


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (figures are saved; `--show` opens them)."""
    import matplotlib

    if os.environ.get("BIOVIS_SHOW") != "1":
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    return path


def save_table(frame, path: str | os.PathLike) -> Path:
    """A pandas DataFrame as CSV, atomically."""
    path = Path(path)
    with atomic_path(path, suffix=".csv") as tmp:
        frame.to_csv(tmp, index=False)
    return path


def show_or_close(fig, show: bool) -> None:
    plt = pyplot()
    if show:
        plt.show()
    plt.close(fig)
