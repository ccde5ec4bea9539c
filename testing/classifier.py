"""`test classifier`: top-1/top-5, per-class accuracy CSV, confusion matrix figure and CSV, metrics JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from core.atomic import write_text
from core.config import saved_settings
from core.device import loader_settings, resolve_device
from core.errors import UserError
from core.plotting import pyplot, save_figure, save_table, show_or_close
from core.rundir import mark_run
from datasets.registry import DataSpec, build_dataset, collate_skipping, resolve_meta
from models.classifiers import load_classifier
from testing.metrics import evaluate_classifier


def data_spec_from_checkpoint(meta: dict, overrides: dict) -> DataSpec:
    """The data a classifier was trained on, with user overrides (e.g. another --data-dir or split seed)."""
    config = saved_settings(meta.get("config"))
    values = {f: config.get(f) for f in DataSpec.__dataclass_fields__ if config.get(f) is not None}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return DataSpec(**values)


def plot_confusion(confusion: np.ndarray, class_names: list[str], path: Path, show: bool = False) -> Path:
    plt = pyplot()
    n = len(class_names)
    rows = confusion.sum(1, keepdims=True)
    normalised = confusion / np.maximum(rows, 1)
    size = min(14, 3 + n * 0.25)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(normalised, cmap="viridis", vmin=0, vmax=1)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"confusion matrix (row-normalised, {int(confusion.sum())} images)")
    if n <= 40:
        ax.set_xticks(range(n), [c.split(".")[-1][:18] for c in class_names], rotation=90, fontsize=6)
        ax.set_yticks(range(n), [c.split(".")[-1][:18] for c in class_names], fontsize=6)
    fig.colorbar(im, ax=ax, fraction=0.046)
    save_figure(fig, path)
    show_or_close(fig, show)
    return path


def run_classifier_test(
    checkpoint: Path,
    run_dir: Path,
    split: str = "test",
    data_overrides: dict | None = None,
    batch_size: int = 64,
    device: str = "auto",
    num_workers: int | None = None,
    amp: bool = True,
    show: bool = False,
    quiet: bool = False,
    overwrite: bool = False,
) -> dict:
    """Evaluate and write the results into `run_dir`, which is created only once every input checked out."""
    import pandas as pd

    from core.rundir import prepare_run_dir

    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    dev = resolve_device(device)
    model, meta = load_classifier(checkpoint, device=str(dev))
    spec = data_spec_from_checkpoint(meta, data_overrides or {})
    data_meta = resolve_meta(spec, quiet=quiet)
    if data_meta.num_classes != model.num_classes:
        raise UserError(
            f"the checkpoint predicts {model.num_classes} classes but dataset {spec.dataset} has "
            f"{data_meta.num_classes}: it was trained on other data"
        )
    dataset = build_dataset(spec, split, train_transform=False, meta=data_meta, output="uint8")
    if len(dataset) == 0:
        raise UserError(f"split {split} of dataset {spec.dataset} is empty")
    run_dir = prepare_run_dir(
        run_dir, "test classifier", overwrite=overwrite, inputs=[checkpoint, spec.data_dir], resumable=False
    )
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_skipping,
                        **loader_settings(dev, num_workers))  # fmt: skip
    with torch.inference_mode():
        result = evaluate_classifier(model, loader, dev, model.num_classes, amp=amp, progress=not quiet)

    confusion = result.pop("confusion").numpy()
    per_class = result.pop("per_class_accuracy")
    counts = confusion.sum(1)
    table = pd.DataFrame(
        {
            "class_id": range(len(per_class)),
            "class_name": data_meta.class_names,
            "n": counts,
            "accuracy": per_class,
        }
    )
    metrics = {"split": split, "dataset": spec.dataset, "checkpoint": str(checkpoint), **result}
    metrics["mean_per_class_accuracy"] = float(np.nanmean(per_class)) if counts.any() else float("nan")
    save_table(table, run_dir / "per_class_accuracy.csv")
    save_table(
        pd.DataFrame(confusion, columns=[str(i) for i in range(len(counts))]), run_dir / "confusion.csv"
    )
    plot_confusion(confusion, data_meta.class_names, run_dir / "confusion.png", show=show)
    write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    mark_run(run_dir, status="finished")
    return metrics
