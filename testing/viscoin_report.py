"""`test viscoin`: evaluate a bundle on a split and save metrics (JSON/CSV), reconstructions and a figure."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from core.atomic import write_text
from core.device import loader_settings, resolve_device
from core.errors import UserError
from core.plotting import pyplot, save_figure, save_table, show_or_close
from core.rundir import mark_run
from datasets.registry import DataSpec, build_dataset, collate_skipping, resolve_meta
from datasets.transforms import to_uint8_images
from models.viscoin_io import check_compatible, load_viscoin
from testing.viscoin import InceptionFeatures, concept_alignment_summary, evaluate_viscoin, load_lpips

HEADLINE = (
    "accuracy_f",
    "accuracy_theta",
    "fidelity",
    "accuracy_f_reconstructions",
    "l1",
    "l2",
    "lpips",
    "faithfulness",
    "drop_top",
    "drop_random",
)


def data_spec_for(models, dataset: str | None, data_dir: str | None) -> DataSpec:
    trained = models.meta.get("dataset") or {}
    config = models.meta.get("config") or {}
    name = dataset or trained.get("name", "world")
    check_compatible(models, dataset=name)
    return DataSpec(name, data_dir or config.get("data_dir"), trained.get("world") or "default", models.image_size,
                    config.get("val_fraction", 0.1), config.get("seed", 0))  # fmt: skip


def plot_reconstructions(models, dataset, device, path: Path, n: int = 8, show: bool = False) -> Path:
    """Originals (top row) above their reconstructions (bottom row) for the first `n` images of the split."""
    plt = pyplot()
    items = [dataset[i] for i in range(min(n, len(dataset)))]
    items = [it for it in items if it is not None]
    x = torch.stack([it["image"] for it in items]).to(device)
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
    plt = pyplot()
    names = [k for k in HEADLINE if k in metrics]
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(names, [metrics[k] for k in names], color="tab:blue")
    ax.set_title(f"VisCoIN on {metrics['dataset']}/{metrics['split']} ({metrics['n']} images)")
    ax.tick_params(axis="x", rotation=45, labelsize=8)
    ax.grid(axis="y", alpha=0.3)
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
    top_k: int = 5,
    lpips_weights: str | None = None,
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
    if top_k <= 0:
        raise UserError(f"--top-k must be positive, got {top_k}")
    if max_images is not None and max_images < 1:
        raise UserError(
            f"--max-images must be at least 1 (leave it out for the whole split), got {max_images}"
        )
    dev = resolve_device(device)
    models = load_viscoin(bundle, device=str(dev))
    if top_k > models.n_concepts:
        raise UserError(
            f"--top-k must be between 1 and the bundle's {models.n_concepts} concepts, got {top_k}"
        )
    spec = data_spec_for(models, dataset, data_dir)
    meta = resolve_meta(spec, quiet=quiet)
    check_compatible(models, num_classes=meta.num_classes)
    data = build_dataset(spec, split, train_transform=False, meta=meta, attributes=None)
    subset = data if not max_images or max_images >= len(data) else Subset(data, range(max_images))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate_skipping,
                        **loader_settings(dev, num_workers))  # fmt: skip
    lpips_weights = lpips_weights or (models.meta.get("config") or {}).get("lpips_weights", "imagenet")
    lpips = load_lpips(lpips_weights, dev)
    fid = None if fid_weights == "none" else InceptionFeatures(fid_weights).to(dev)
    run_dir = prepare_run_dir(
        run_dir, "test viscoin", overwrite=overwrite, inputs=[bundle, spec.data_dir], resumable=False
    )
    result = evaluate_viscoin(models, loader, dev, lpips=lpips, fid=fid, top_k=top_k, amp=amp,
                              attributes=data.attributes is not None, progress=not quiet)  # fmt: skip
    metrics = {
        "bundle": str(bundle),
        "dataset": spec.dataset,
        "split": split,
        "n_concepts": models.n_concepts,
    }
    auc = result.pop("alignment_auc", None)
    metrics.update(result)
    if lpips is not None:
        metrics["lpips_backbone"] = lpips_weights
    if fid is not None:
        metrics["fid_extractor"] = f"inception_v3 ({fid_weights})"
        metrics["fid_resize"] = InceptionFeatures.resize_mode
        metrics["fid_images"] = result["n"]
    if auc is not None:
        alignment = concept_alignment_summary(auc, data.attribute_names)
        metrics["alignment_mean_best_auc"] = alignment["mean_best_auc"]
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
