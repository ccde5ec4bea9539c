"""`test viscoin`: evaluate a bundle on a split and save metrics (JSON/CSV), reconstructions and a figure."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from core.atomic import write_text
from core.config import saved_settings
from core.device import loader_settings, resolve_device
from core.errors import UserError
from core.plotting import pyplot, save_figure, save_table, show_or_close
from core.rundir import mark_run
from datasets.gpu_transforms import to_model_batch
from datasets.registry import DataSpec, build_dataset, collate_skipping, resolve_meta
from datasets.transforms import to_uint8_images
from models.viscoin_io import check_compatible, load_viscoin
from testing.fid import build_fid_network, check_fid_options
from testing.viscoin.evaluate import concept_alignment_summary, evaluate_viscoin, load_lpips
from testing.viscoin.metrics import DEFAULT_THRESHOLD

# metrics.png: one panel per unit, so that no axis mixes fractions, pixel errors and probability drops
PANELS = (
    ("predictions", "fraction of images", (
        ("accuracy_f", "accuracy of f"), ("accuracy_theta", "accuracy of Theta"),
        ("fidelity", "fidelity (Theta = f)"), ("accuracy_f_reconstructions", "f correct on\nreconstructions"))),
    ("reconstruction error", "mean per-image distance\n(pixels in [-1, 1])", (
        ("l1", "L1"), ("l2", "L2 (squared)"), ("lpips", "LPIPS"))),
    ("faithfulness", "drop in f's probability\nof the explained class", (
        ("faithfulness", "important\nconcepts removed"), ("faithfulness_random", "as many random\nconcepts removed"))),
    ("consistency and alignment", "held-out accuracy / AUC\n(chance 0.5)", (
        ("consistency", "consistency"), ("alignment_mean_best_auc", "alignment AUC"),
        ("alignment_null_mean", "alignment AUC,\nshuffled attributes"))),
)  # fmt: skip


def data_spec_for(models, dataset: str | None, data_dir: str | None) -> DataSpec:
    trained = models.meta.get("dataset") or {}
    config = saved_settings(models.meta.get("config"))
    name = dataset or trained.get("name", "world")
    check_compatible(models, dataset=name)
    return DataSpec(name, data_dir or config.get("data_dir"), trained.get("world") or "default", models.image_size,
                    config.get("val_fraction", 0.1), seed=config.get("seed", 0))  # fmt: skip


def plot_reconstructions(models, dataset, device, path: Path, n: int = 8, show: bool = False) -> Path:
    """Originals (top row) above their reconstructions (bottom row) for the first `n` images of the split."""
    plt = pyplot()
    items = [dataset[i] for i in range(min(n, len(dataset)))]
    items = [it for it in items if it is not None]
    x = to_model_batch(collate_skipping(items), device, train=False)["image"]
    with torch.no_grad():
        _, concepts, support, _ = models.encode(x)
        x_hat, _ = models.decoder(concepts, support, noise_mode="const")
    rows = [to_uint8_images(x), to_uint8_images(x_hat)]
    fig, axes = plt.subplots(2, len(items), figsize=(1.6 * len(items), 3.4), squeeze=False)
    for r, (row, label) in enumerate(zip(rows, ("input", "reconstruction"), strict=True)):
        for c, img in enumerate(row):
            axes[r, c].imshow(img)
            axes[r, c].axis("off")
        axes[r, 0].set_title(label, fontsize=8, loc="left")
    save_figure(fig, path)
    show_or_close(fig, show)
    return path


def plot_metrics(metrics: dict, path: Path, show: bool = False) -> Path:
    """One bar panel per kind of number (fractions, pixel errors, probability drops, held-out scores)."""
    plt = pyplot()
    panels = [
        (t, y, [(k, label) for k, label in bars if metrics.get(k) is not None]) for t, y, bars in PANELS
    ]
    panels = [p for p in panels if p[2]]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.6), squeeze=False)
    for ax, (title, ylabel, bars) in zip(axes[0], panels, strict=True):
        values = [metrics[k] for k, _ in bars]
        colours = ["tab:gray" if ("random" in k or "null" in k) else "tab:blue" for k, _ in bars]
        ax.bar(range(len(bars)), values, color=colours)
        for i, v in enumerate(values):
            ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(bars)), [label for _, label in bars], fontsize=7, rotation=30, ha="right")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if title in ("predictions", "consistency and alignment"):
            ax.set_ylim(0, 1.08)
        else:
            ax.set_ylim(min(0, *values) * 1.15, max(0, *values) * 1.15 or 1)
        if title == "consistency and alignment":
            ax.axhline(0.5, color="black", lw=0.8, ls=":", label="chance")
            ax.legend(fontsize=7, loc="lower right")
    tau = metrics.get("faithfulness_threshold")
    fid = "" if metrics.get("fid") is None else (
        f"; reconstruction FID {metrics['fid']:.2f} ({metrics['fid_network']}, {metrics['fid_images_real']} vs "
        f"{metrics['fid_images_fake']} images)")  # fmt: skip
    fig.suptitle(f"VisCoIN on {metrics['dataset']}/{metrics['split']} ({metrics['n']} images, K={metrics['n_concepts']}; "
                 f"important concepts: normalised relevance > {tau}{fid})", fontsize=9)  # fmt: skip
    fig.tight_layout()
    save_figure(fig, path)
    show_or_close(fig, show)
    return path


def run_viscoin_test(
    bundle: Path,
    run_dir: Path,
    split: str = "test",
    dataset: str | None = None,
    data_dir: str | None = None,
    batch_size: int = 32,
    max_images: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    consistency_images: int = 64,
    lpips_weights: str | None = None,
    fid_network: str = "fid-inception",
    fid_weights: str = "none",
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
    if not 0.0 <= threshold < 1.0:
        raise UserError(
            f"--concept-threshold must be in [0, 1) (relative to the top relevance), got {threshold}"
        )
    if consistency_images < 0:
        raise UserError(f"--consistency-images must be >= 0 (0 skips consistency), got {consistency_images}")
    check_fid_options(fid_network, fid_weights)
    if max_images is not None and max_images < 1:
        raise UserError(
            f"--max-images must be at least 1 (leave it out for the whole split), got {max_images}"
        )
    dev = resolve_device(device)
    models = load_viscoin(bundle, device=str(dev))
    spec = data_spec_for(models, dataset, data_dir)
    meta = resolve_meta(spec, quiet=quiet)
    check_compatible(models, num_classes=meta.num_classes)
    data = build_dataset(spec, split, train_transform=False, meta=meta, attributes=None, output="uint8")
    subset = data if not max_images or max_images >= len(data) else Subset(data, range(max_images))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate_skipping,
                        **loader_settings(dev, num_workers))  # fmt: skip
    lpips_weights = lpips_weights or saved_settings(models.meta.get("config")).get(
        "lpips_weights", "imagenet"
    )
    lpips = load_lpips(lpips_weights, dev)
    fid = build_fid_network(fid_network, fid_weights, dev)
    run_dir = prepare_run_dir(
        run_dir, "test viscoin", overwrite=overwrite, inputs=[bundle, spec.data_dir], resumable=False
    )
    result = evaluate_viscoin(models, loader, dev, lpips=lpips, fid=fid, threshold=threshold, amp=amp,
                              attributes=data.attributes is not None, consistency_images=consistency_images,
                              progress=not quiet)  # fmt: skip
    metrics = {
        "bundle": str(bundle),
        "dataset": spec.dataset,
        "split": split,
        "n_concepts": models.n_concepts,
    }
    auc, null = result.pop("alignment_auc", None), result.pop("alignment_null", None)
    per_concept = result.pop("consistency_per_concept", None)
    metrics.update(result)
    if lpips is not None:
        metrics["lpips_backbone"] = lpips_weights
    if per_concept is not None:
        save_table(pd.DataFrame({"concept": range(len(per_concept)), "consistency": per_concept.numpy()}),
                   run_dir / "concept_consistency.csv")  # fmt: skip
    if auc is not None:
        alignment = concept_alignment_summary(auc, data.attribute_names)
        metrics["alignment_mean_best_auc"] = alignment["mean_best_auc"]
        metrics["alignment_null_mean"] = float(null.mean())
        metrics["alignment_null_p95"] = float(null.quantile(0.95))
        metrics["alignment_null_permutations"] = len(null)
        save_table(pd.DataFrame(alignment["per_concept"]), run_dir / "concept_attribute_alignment.csv")
        save_table(
            pd.DataFrame(auc.numpy(), columns=data.attribute_names), run_dir / "concept_attribute_auc.csv"
        )
    write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    save_table(
        pd.DataFrame([{k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}]),
        run_dir / "metrics.csv",
    )
    plot_metrics(metrics, run_dir / "metrics.png", show=show)
    plot_reconstructions(models, data, dev, run_dir / "reconstructions.png", show=show)
    mark_run(run_dir, status="finished")
    return metrics
