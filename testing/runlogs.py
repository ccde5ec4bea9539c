"""`logs`: training/validation curves of any run (also one still going) and a summary table."""

from __future__ import annotations

import math
import os
from pathlib import Path

from core.config import saved_settings
from core.errors import UserError
from core.plotting import pyplot, save_figure, save_table, show_or_close

# Counters and settings, not measurements: never plotted. Keys ending in `_images` count images too.
BOOKKEEPING = {"step", "split", "time", "epoch", "n", "skipped", "kimg", "stage", "faithfulness_threshold",
               "consistency_concepts"}  # fmt: skip
HIGHER_IS_BETTER = ("acc", "top1", "top5", "auc", "fidelity", "agreement", "images_per_s", "faithfulness",
                    "consistency")  # fmt: skip

# Metrics drawn in one panel (train and val of one quantity under different names): metric -> panel.
PANEL_OF = {"epoch_acc": "acc", "top1": "acc", "epoch_loss": "loss", "d_real": "d_logits", "d_fake": "d_logits",
            "faithfulness_random": "faithfulness"}  # fmt: skip
# y-axis label per panel (or per prefix, ending in `_`); anything else is labelled with its own name.
Y_LABELS = {
    "loss": "loss", "acc": "top-1 accuracy (fraction)", "top5": "top-5 accuracy (fraction)", "lr": "learning rate",
    "images_per_s": "throughput (images / s)", "records_per_s": "throughput (records / s)",
    "sequences_per_s": "throughput (sequences / s)", "loss_G": "G loss: softplus(-D(G(z)))",
    "loss_D": "D loss: logistic", "d_logits": "mean D logit", "r1": "R1 penalty |dD/dx|^2",
    "pl": "path-length penalty", "pl_mean": "mean path length |J^T y|", "aug_p": "augmentation probability p",
    "ada_r_t": "r_t = E[sign D(real)] (ADA)", "fd_": "Fréchet distance (feature units^2)", "fid": "FID",
    "l1": "mean |x_hat - x| (pixels in [-1, 1])", "l2": "mean (x_hat - x)^2 (pixels in [-1, 1])",
    "lpips": "LPIPS distance", "rec": "reconstruction loss", "ce_rec": "f's cross-entropy on reconstructions (nats)", "of": "output fidelity (cross-entropy, nats)",
    "sparsity": "sparsity loss", "ortho": "orthogonality loss", "w_reg": "|w - w_avg|^2",
    "fidelity": "fraction where Theta agrees with f", "accuracy_": "accuracy (fraction)",
    "faithfulness": "drop in f's p(class)", "faithfulness_removed": "concepts removed per image",
    "faithfulness_no_concept": "fraction of images", "active_concepts": "active concepts per image",
    "consistency": "held-out accuracy (chance 0.5)", "kl": "KL (nats)", "logit_scale": "logit scale",
}  # fmt: skip


def is_bookkeeping(metric: str) -> bool:
    return (
        metric in BOOKKEEPING
        or (metric.endswith("_images") and metric != "images")
        or metric.startswith("n_")
    )


def panel_of(metric: str) -> str:
    return PANEL_OF.get(metric, metric)


def y_label(panel: str) -> str:
    if panel in Y_LABELS:
        return Y_LABELS[panel]
    prefix = next((k for k in Y_LABELS if k.endswith("_") and panel.startswith(k)), None)
    return Y_LABELS[prefix] if prefix else panel.replace("_", " ")


def higher_is_better(metric: str) -> bool:
    return any(token in metric for token in HIGHER_IS_BETTER)


def long_table(frame):
    """step, split, metric, panel, value rows for every numeric, non-bookkeeping metric of the log."""
    import pandas as pd

    metrics = [c for c in frame.columns if not is_bookkeeping(c) and pd.api.types.is_numeric_dtype(frame[c])]
    if not metrics:
        raise UserError("the run log holds no numeric metrics to plot")
    melted = frame.melt(id_vars=["step", "split"], value_vars=metrics, var_name="metric", value_name="value")
    melted["panel"] = melted["metric"].map(panel_of)
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


def plot_curves(
    table, path: Path, title: str, show: bool = False, references: dict[str, tuple[str, float]] | None = None
) -> Path:
    """One panel per quantity, train and val together, y axis labelled with what is measured; `references`
    draws a labelled horizontal line in a panel (panel -> (label, value), e.g. ADA's target)."""
    plt = pyplot()
    panels = list(dict.fromkeys(table["panel"]))
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.1 * rows), squeeze=False)
    styles = {"train": "-", "val": "-o", "test": "-s"}
    for ax, panel in zip(axes.flat, panels, strict=False):
        part = table[table["panel"] == panel]
        for (metric, split), group in part.groupby(["metric", "split"], sort=True):
            label = split if metric == panel else f"{split}: {metric}"
            style = styles.get(split, "-") if len(group) > 2 else "o"  # a lone point still shows
            ax.plot(group["step"], group["value"], style, label=label, markersize=3, linewidth=1.2)
        if references and panel in references:
            label, value = references[panel]
            ax.axhline(value, color="black", lw=0.8, ls=":", label=label)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(y_label(panel), fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / (3.1 * rows)))  # room for the title above the top panels
    save_figure(fig, path)
    show_or_close(fig, show)
    return path


# The tables `plot_run_log` writes, by their header: how it recognises its own files in an --out folder.
OUTPUT_HEADERS = {
    "curves.csv": "step,split,metric,value,panel",
    "summary.csv": "split,metric,points,last,last_step,best,best_step",
}


def check_out_dir(out: Path) -> None:
    """Refuse an output folder holding a `curves.csv`, `summary.csv` or `curves.png` that `logs` did not
    write (it would replace them): a table is its own by its header, the figure when its table is."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; logs writes a folder of figures and tables")

    def own_table(name: str) -> bool:
        try:
            with open(out / name, encoding="utf-8") as f:
                return f.readline().rstrip("\r\n") == OUTPUT_HEADERS[name]
        except (OSError, UnicodeDecodeError):
            return False

    for name in (*OUTPUT_HEADERS, "curves.png"):
        if (out / name).exists() and not own_table("curves.csv" if name == "curves.png" else name):
            raise UserError(
                f"--out {out} holds a {name} that `logs` did not write; it is kept, choose another --out"
            )


def plot_run_log(
    source: str | os.PathLike, out_dir: str | os.PathLike | None = None, show: bool = False
) -> dict:
    """Read a run's log.jsonl, save `curves.png` + `curves.csv` + `summary.csv`; return the summary frame."""
    from core.runlog import read_log

    source = Path(source)
    run_dir = source if source.is_dir() else source.parent
    out = Path(out_dir) if out_dir else run_dir / "logs"
    check_out_dir(out)
    table = long_table(read_log(source))
    summary = summarize(table)
    save_table(table, out / "curves.csv")
    save_table(summary, out / "summary.csv")
    config = run_dir / "config.yaml"
    references = {}
    if config.is_file():
        import yaml

        settings = saved_settings(yaml.safe_load(config.read_text()))
        if settings.get("aug") == "ada":
            references["ada_r_t"] = (
                f"target {settings.get('ada_target')}",
                float(settings.get("ada_target", 0.6)),
            )
    figure = plot_curves(table, out / "curves.png", title=str(run_dir), show=show, references=references)
    return {"summary": summary, "figure": figure, "out_dir": out}
