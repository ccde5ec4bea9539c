"""Concept analytics of a VisCoIN ensemble over a split (the `concepts` command).

One pass over the split gives, per image, the concept activation vector (max-pooled concept maps, (N, K)),
f's and Theta's predictions and the label; those arrays are cached under a key of the bundle's content hash,
the data identity and the split. Everything else is derived from them, in numpy, without loops over concepts:
the activation profile, per-concept totals and dead concepts, class x concept and concept x class
importance, concept entropy, co-activation and Theta's top concepts per class. Figures are saved next to the
CSV of the numbers they show, plus `summary.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import UserError

DEAD_THRESHOLD = 1e-6  # a concept never above this on the split is dead
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
CACHE_VERSION = 1  # bump when the cached arrays change meaning


@dataclass
class Analysis:
    """A loaded ensemble and the split it is analysed on."""

    models: object  # models.viscoin_io.VisCoINModels, in eval mode on `device`
    spec: object  # datasets.registry.DataSpec
    data: object  # the split's dataset (eval transform, [-1, 1] images at the ensemble's size)
    split: str
    device: object

    @property
    def class_names(self) -> list[str]:
        return list(self.data.class_names)

    def identity(self) -> dict:
        """What the per-image arrays depend on: the ensemble's bytes and the data (for the cache key)."""
        spec = self.spec
        return {
            "version": CACHE_VERSION,
            "bundle": self.models.content_hash,
            "data": {"dataset": spec.dataset, "root": str(self.data.root), "split": self.split,
                     "world": spec.world, "image_size": spec.image_size, "val_fraction": spec.val_fraction,
                     "seed": spec.seed},
        }  # fmt: skip


def open_analysis(
    bundle: str | Path,
    dataset: str | None = None,
    data_dir: str | Path | None = None,
    split: str = "test",
    device: str = "auto",
    quiet: bool = False,
) -> Analysis:
    """Load a bundle (or run dir) and the split it is analysed on; refuse data it was not trained on."""
    from core.device import resolve_device
    from datasets.registry import build_dataset, canonical_name, resolve_meta
    from models.viscoin_io import check_compatible, load_viscoin
    from testing.viscoin.report import data_spec_for

    dev = resolve_device(device)
    models = load_viscoin(bundle, device=str(dev))
    spec = data_spec_for(
        models, canonical_name(dataset) if dataset else None, str(data_dir) if data_dir else None
    )
    name = spec.dataset
    meta = resolve_meta(spec, quiet=quiet)
    check_compatible(models, num_classes=meta.num_classes)
    data = build_dataset(spec, split, train_transform=False, meta=meta)
    if len(data) == 0:
        raise UserError(f"split {split!r} of dataset {name} is empty")
    return Analysis(models, spec, data, split, dev)


def collect_activations(
    analysis: Analysis, batch_size: int = 64, quiet: bool = False
) -> dict[str, np.ndarray]:
    """One pass over the split: activations (N, K), f's and Theta's predictions, labels, dataset indices."""
    import torch
    from torch.utils.data import DataLoader

    from core.device import loader_settings
    from core.progress import Progress
    from models.viscoin import concept_activations

    loader = DataLoader(
        analysis.data, batch_size=batch_size, shuffle=False, **loader_settings(analysis.device, None)
    )
    parts: dict[str, list] = {"activations": [], "pred_f": [], "pred_theta": [], "labels": [], "index": []}
    with torch.no_grad(), Progress(len(loader), "concept activations", enabled=not quiet) as bar:
        for batch in loader:
            logits_f, concepts, _, logits_theta = analysis.models.encode(batch["image"].to(analysis.device))
            parts["activations"].append(concept_activations(concepts).float().cpu().numpy())
            parts["pred_f"].append(logits_f.argmax(1).cpu().numpy())
            parts["pred_theta"].append(logits_theta.argmax(1).cpu().numpy())
            parts["labels"].append(batch["label"].numpy())
            parts["index"].append(batch["index"].numpy())
            bar.update(1)
    return {key: np.concatenate(value) for key, value in parts.items()}


def _class_means(acts: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean activation per class (C, K) (zero rows for classes absent from the split) and class counts."""
    onehot = np.eye(num_classes)[labels]
    counts = onehot.sum(0)
    means = (onehot.T @ acts.astype(np.float64)) / np.maximum(counts, 1)[:, None]
    return means, counts


def _normalise_rows(x: np.ndarray, by: str) -> np.ndarray:
    """Rows divided by their max or sum; all-zero rows stay zero."""
    scale = x.max(1, keepdims=True) if by == "max" else x.sum(1, keepdims=True)
    return np.divide(x, scale, out=np.zeros_like(x), where=scale > 0)


def entropy(distribution: np.ndarray) -> np.ndarray:
    """Entropy in nats of each row of a (rows sum to 1) distribution; 0 log 0 = 0."""
    safe = np.where(distribution > 0, distribution, 1.0)
    return -(distribution * np.log(safe)).sum(1)


def correlation(acts: np.ndarray) -> np.ndarray:
    """K x K Pearson correlation of the columns; NaN where a column is constant (e.g. a dead concept)."""
    x = acts.astype(np.float64)
    centred = x - x.mean(0)
    std = np.sqrt((centred**2).mean(0))
    z = np.divide(centred, std, out=np.zeros_like(centred), where=std > 0)
    corr = np.clip(z.T @ z / len(x), -1.0, 1.0)
    constant = std == 0
    corr[constant, :] = np.nan
    corr[:, constant] = np.nan
    return corr


def concept_statistics(
    acts: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    weight: np.ndarray | None = None,
    top: int = 5,
    dead_threshold: float = DEAD_THRESHOLD,
) -> dict[str, np.ndarray]:
    """Every concept statistic of the `concepts` command from activations (N, K) and labels (N,).

    - `profile_mean` (K,), `profile_quantiles` (Q, K): each image's activations sorted in decreasing order,
      averaged / quantiled across images (how many concepts an image uses, and how strongly).
    - `concept_totals` (K,), `dead` (K,): summed activation; dead = never above `dead_threshold`.
    - `class_concept` (C, K): mean activation per class divided by the class's largest (1 = its top concept).
    - `concept_class` (K, C): the class means (class-balanced: each class weighs the same whatever its size)
      divided by their sum per concept, i.e. each concept's activation distribution over the classes present.
    - `entropy` (K,) in nats and `entropy_normalised` (/ log of the classes present): 0 for a concept that
      fires for one class only, 1 for one spread evenly; NaN for dead concepts.
    - `coactivation` (K, K): correlation of the activations across images.
    - with Theta's `weight` (C, K): `theta_contribution` = W[c, k] x mean activation of k on class c's images
      (the concept's average share of class c's logit) and `theta_top` (C, top), its largest concepts.
    """
    acts = np.asarray(acts, dtype=np.float64)
    means, counts = _class_means(acts, labels, num_classes)
    ordered = -np.sort(-acts, axis=1)
    concept_class = _normalise_rows(means.T, "sum")
    present = int((counts > 0).sum())
    dead = acts.max(0) <= dead_threshold
    ent = np.where(dead, np.nan, entropy(concept_class))
    stats = {
        "profile_mean": ordered.mean(0),
        "profile_quantiles": np.quantile(ordered, QUANTILES, axis=0),
        "image_totals": acts.sum(1),
        "concept_totals": acts.sum(0),
        "dead": dead,
        "class_means": means,
        "class_counts": counts,
        "class_concept": _normalise_rows(means, "max"),
        "concept_class": concept_class,
        "entropy": ent,
        "entropy_normalised": ent / np.log(present) if present > 1 else np.full_like(ent, np.nan),
        "coactivation": correlation(acts),
    }
    if weight is not None:
        contribution = np.asarray(weight, dtype=np.float64) * means
        stats["theta_contribution"] = contribution
        stats["theta_top"] = np.argsort(-contribution, axis=1, kind="stable")[:, : min(top, acts.shape[1])]
    return stats


def prediction_summary(arrays: dict[str, np.ndarray]) -> dict[str, float]:
    """Accuracy of f and Theta against the labels, and fidelity (Theta agrees with f), over all images."""
    labels, pred_f, pred_theta = arrays["labels"], arrays["pred_f"], arrays["pred_theta"]
    return {
        "n_images": int(len(labels)),
        "accuracy_f": float((pred_f == labels).mean()),
        "accuracy_theta": float((pred_theta == labels).mean()),
        "fidelity": float((pred_theta == pred_f).mean()),
    }


def concept_order(class_concept: np.ndarray) -> np.ndarray:
    """Concepts grouped by the class they fire most for (classes in order), strongest first in a group;
    concepts silent on every class last."""
    strength = class_concept.max(0)
    best = np.where(strength > 0, class_concept.argmax(0), len(class_concept))
    return np.lexsort((-strength, best))


def _short(names: list[str]) -> list[str]:
    return [n.split(".")[-1][:18] for n in names]


def _save(fig, table, run_dir: Path, stem: str, show: bool) -> None:
    from core.plotting import save_figure, save_table, show_or_close

    save_table(table, run_dir / f"{stem}.csv")
    save_figure(fig, run_dir / f"{stem}.png")
    show_or_close(fig, show)


def _matrix(plt, matrix: np.ndarray, rows: list[str], cols: list[str], title: str, **imshow):
    fig, ax = plt.subplots(figsize=(min(16, 4 + 0.12 * len(cols)), min(14, 2.5 + 0.2 * len(rows))))
    image = ax.imshow(matrix, aspect="auto", interpolation="nearest", **imshow)
    if len(rows) <= 60:
        ax.set_yticks(range(len(rows)), rows, fontsize=6)
    if len(cols) <= 80:
        ax.set_xticks(range(len(cols)), cols, fontsize=6, rotation=90)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    return fig, ax


def save_concept_figures(
    run_dir: Path,
    arrays: dict[str, np.ndarray],
    stats: dict[str, np.ndarray],
    n_active: np.ndarray,
    class_names: list[str],
    show: bool = False,
) -> None:
    """The six figures, each with the CSV of its numbers, plus Theta's top concepts per class (CSV)."""
    import pandas as pd

    from core.plotting import pyplot, save_table

    plt = pyplot()
    acts = arrays["activations"]
    n, k = acts.shape
    totals, dead = stats["concept_totals"], stats["dead"]
    names, concept_names = _short(class_names), [str(i) for i in range(k)]

    order = np.argsort(-totals, kind="stable")
    table = pd.DataFrame({"rank": np.arange(k), "concept": order, "total": totals[order],
                          "mean": totals[order] / n, "max": acts.max(0)[order], "dead": dead[order]})  # fmt: skip
    fig, ax = plt.subplots(figsize=(min(16, 4 + 0.05 * k), 3.5))
    ax.bar(np.arange(k), totals[order], color=np.where(dead[order], "tab:red", "tab:blue"), width=1.0)
    ax.plot(np.flatnonzero(dead[order]), np.zeros(int(dead.sum())), "x", color="tab:red",
            label=f"dead ({int(dead.sum())})")  # fmt: skip
    ax.set(
        xlabel="concepts, sorted", ylabel="summed activation", title=f"activation per concept ({n} images)"
    )
    ax.legend()
    _save(fig, table, run_dir, "concept_activation", show)

    table = pd.DataFrame({"image": arrays["index"], "label": arrays["labels"], "pred_f": arrays["pred_f"],
                          "pred_theta": arrays["pred_theta"], "total": stats["image_totals"],
                          "max": acts.max(1), "n_active": n_active})  # fmt: skip
    profile = pd.DataFrame({"rank": np.arange(k), "mean": stats["profile_mean"],
                            **{f"q{round(q * 100)}": v for q, v in zip(QUANTILES, stats["profile_quantiles"], strict=True)}})  # fmt: skip
    save_table(profile, run_dir / "activation_profile.csv")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.hist(stats["image_totals"], bins=min(50, max(5, n // 4)), color="tab:blue")
    left.set(xlabel="summed activation of an image", ylabel="images", title="activation per image")
    right.fill_between(np.arange(k), profile["q10"], profile["q90"], alpha=0.2, label="10-90%")
    right.fill_between(np.arange(k), profile["q25"], profile["q75"], alpha=0.4, label="25-75%")
    right.plot(np.arange(k), profile["mean"], color="black", label="mean")
    right.set(xlabel="concept rank within the image", ylabel="activation", title="sorted activation profile")
    right.legend()
    _save(fig, table, run_dir, "image_activation", show)

    order = concept_order(stats["class_concept"])
    table = pd.DataFrame(stats["class_concept"], columns=[f"concept_{i}" for i in range(k)])
    table.insert(0, "n_images", stats["class_counts"].astype(int))
    table.insert(0, "class_name", class_names)
    table.insert(0, "class_id", np.arange(len(class_names)))
    fig, _ = _matrix(plt, stats["class_concept"][:, order], names, [concept_names[i] for i in order],
                     "class x concept (mean activation / class max)", cmap="viridis", vmin=0, vmax=1)  # fmt: skip
    _save(fig, table, run_dir, "class_concept", show)

    table = pd.DataFrame(stats["concept_class"], columns=[f"class_{c}" for c in range(len(class_names))])
    table.insert(0, "concept", np.arange(k))
    fig, _ = _matrix(plt, stats["concept_class"][order], [concept_names[i] for i in order], names,
                     "concept x class (class-balanced share per concept)", cmap="viridis", vmin=0)  # fmt: skip
    _save(fig, table, run_dir, "concept_class", show)

    table = pd.DataFrame({"concept": np.arange(k), "entropy_nats": stats["entropy"],
                          "entropy_normalised": stats["entropy_normalised"], "dead": dead,
                          "top_class": stats["concept_class"].argmax(1),
                          "top_class_share": stats["concept_class"].max(1)})  # fmt: skip
    live = np.sort(stats["entropy_normalised"][~dead])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(np.arange(len(live)), live, marker=".")
    ax.set(xlabel="live concepts, sorted", ylabel="entropy / log C", ylim=(0, 1.05),
           title="concept entropy over classes (0: one class, 1: all alike)")  # fmt: skip
    _save(fig, table, run_dir, "concept_entropy", show)

    table = pd.DataFrame(stats["coactivation"], columns=[f"concept_{i}" for i in range(k)])
    table.insert(0, "concept", np.arange(k))
    fig, _ = _matrix(plt, stats["coactivation"], concept_names, concept_names,
                     "co-activation (correlation across images)", cmap="coolwarm", vmin=-1, vmax=1)  # fmt: skip
    _save(fig, table, run_dir, "coactivation", show)

    top = stats["theta_top"]
    classes = np.repeat(np.arange(len(class_names)), top.shape[1])
    concepts = top.ravel()
    table = pd.DataFrame({"class_id": classes, "class_name": np.asarray(class_names)[classes],
                          "rank": np.tile(np.arange(top.shape[1]), len(class_names)), "concept": concepts,
                          "contribution": stats["theta_contribution"][classes, concepts],
                          "mean_activation": stats["class_means"][classes, concepts]})  # fmt: skip
    save_table(table, run_dir / "theta_top_concepts.csv")


def concept_arrays(analysis: Analysis, batch_size: int = 64, force: bool = False, quiet: bool = False):
    """The per-image arrays of `collect_activations` from the cache, or one pass over the split (then cached)."""
    from testing.cache import cached_arrays

    # looked up at call time (not bound here), so tests can replace collect_activations
    return cached_arrays(
        "concepts", analysis.identity(), lambda: collect_activations(analysis, batch_size, quiet), force=force
    )


def run_concepts(
    analysis: Analysis,
    run_dir: Path,
    batch_size: int = 64,
    force: bool = False,
    show: bool = False,
    quiet: bool = False,
) -> dict:
    """Per-image arrays from the cache (or one pass, then cached), the statistics, figures, CSVs, summary."""
    import torch

    from core.atomic import write_text
    from testing.viscoin.metrics import active_concepts

    result = concept_arrays(analysis, batch_size, force, quiet)
    arrays = result.arrays
    weight = analysis.models.explainer.linear.weight.detach().float().cpu().numpy()
    stats = concept_statistics(arrays["activations"], arrays["labels"], len(analysis.class_names), weight)
    n_active = active_concepts(torch.from_numpy(arrays["activations"])[:, :, None, None]).numpy()
    summary = {
        **prediction_summary(arrays),
        "n_concepts": int(arrays["activations"].shape[1]),
        "n_classes": len(analysis.class_names),
        "n_dead": int(stats["dead"].sum()),
        "mean_active": float(n_active.mean()),
        "active_definition": "concepts above 0.1 x the image's strongest one (as in `test viscoin`)",
        "dead_threshold": DEAD_THRESHOLD,
        "split": analysis.split,
        "dataset": analysis.spec.dataset,
        "bundle": analysis.models.source,
        "bundle_hash": analysis.models.content_hash,
        "cache": {"hit": result.hit, "key": result.key, "path": str(result.path)},
    }
    save_concept_figures(run_dir, arrays, stats, n_active, analysis.class_names, show=show)
    write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary
