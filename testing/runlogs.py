"""`logs`: training/validation curves of any run (also one still going) and a summary table."""

from __future__ import annotations

import math
import os
from pathlib import Path

from core.errors import UserError
from core.plotting import pyplot, save_figure, save_table, show_or_close

BOOKKEEPING = {"step", "split", "time", "epoch", "n", "skipped"}
HIGHER_IS_BETTER = ("acc", "top1", "top5", "auc", "fidelity", "agreement", "images_per_s")


def higher_is_better(metric: str) -> bool:
    return any(token in metric for token in HIGHER_IS_BETTER)


def long_table(frame):
    """step, split, metric, value rows for every numeric metric of the log."""
    import pandas as pd

    metrics = [c for c in frame.columns if c not in BOOKKEEPING and pd.api.types.is_numeric_dtype(frame[c])]
    if not metrics:
        raise UserError("the run log holds no numeric metrics to plot")
    melted = frame.melt(id_vars=["step", "split"], value_vars=metrics, var_name="metric", value_name="value")
    return melted.dropna(subset=["value"]).sort_values(["metric", "split", "step"], kind="stable")


def summarize(table):
    """Per split and metric: number of points, last value, best value and the step where it was reached."""
    import pandas as pd

    rows = []
    for (metric, split), group in table.groupby(["metric", "split"], sort=True):
        best_idx = group["value"].idxmax() if higher_is_better(metric) else group["value"].idxmin()
        rows.append(
            {
                "split": split,
                "metric": metric,
                "points": len(group),
                "last": float(group["value"].iloc[-1]),
                "last_step": int(group["step"].iloc[-1]),
                "best": float(group.loc[best_idx, "value"]),
                "best_step": int(group.loc[best_idx, "step"]),
            }
        )
    return pd.DataFrame(rows)


def plot_curves(table, path: Path, title: str, show: bool = False) -> Path:
    plt = pyplot()
    metrics = list(dict.fromkeys(table["metric"]))
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    styles = {"train": "-", "val": "-o", "test": "-s"}
    for ax, metric in zip(axes.flat, metrics, strict=False):
        part = table[table["metric"] == metric]
        for split, group in part.groupby("split", sort=True):
            ax.plot(
                group["step"],
                group["value"],
                styles.get(split, "-"),
                label=split,
                markersize=3,
                linewidth=1.2,
            )
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    show_or_close(fig, show)
    return path


def plot_run_log(
    source: str | os.PathLike, out_dir: str | os.PathLike | None = None, show: bool = False
) -> dict:
    """Read a run's log.jsonl, save `curves.png` + `curves.csv` + `summary.csv`; return the summary frame."""
    from core.runlog import read_log

    source = Path(source)
    run_dir = source if source.is_dir() else source.parent
    out = Path(out_dir) if out_dir else run_dir / "logs"
    table = long_table(read_log(source))
    summary = summarize(table)
    save_table(table, out / "curves.csv")
    save_table(summary, out / "summary.csv")
    figure = plot_curves(table, out / "curves.png", title=str(run_dir), show=show)
    return {"summary": summary, "figure": figure, "out_dir": out}
