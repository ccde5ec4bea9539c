"""Figures of retrieval results, each saved beside the table of its numbers: per-rank accuracy bars (seen vs
unseen, with the chance level) and a 2-D projection (PCA, or UMAP as CLIBD draws it when umap-learn is
installed) of image and DNA embeddings coloured by a rank."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from core.errors import UserError
from core.plotting import pyplot, save_figure, save_table, show_or_close
from datasets.bioscan.taxonomy import RANKS

MAX_TAXA = 10


def plot_accuracy(
    rows: list[dict], path: str | os.PathLike, metric: str = "micro", show: bool = False
) -> Path:
    """One panel per (query -> key) pair: top-1 accuracy per rank, seen and unseen bars, chance as ticks."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    top1 = frame[(frame["k"] == 1) & frame["metric"].isin([metric, "chance"])]
    pairs = list(dict.fromkeys(zip(top1["query"], top1["key"], strict=True)))
    plt = pyplot()
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 3.8), sharey=True, squeeze=False)
    x = np.arange(len(RANKS))
    for ax, (q, k) in zip(axes[0], pairs, strict=True):
        sub = top1[(top1["query"] == q) & (top1["key"] == k)]
        for offset, kind, colour in ((-0.2, "seen", "tab:blue"), (0.2, "unseen", "tab:orange")):
            values = [sub[(sub["rank"] == r) & (sub["kind"] == kind) & (sub["metric"] == metric)]["value"].mean()
                      for r in RANKS]  # fmt: skip
            chance = [sub[(sub["rank"] == r) & (sub["kind"] == kind) & (sub["metric"] == "chance")]["value"].mean()
                      for r in RANKS]  # fmt: skip
            ax.bar(x + offset, values, width=0.4, color=colour, label=kind)
            ax.scatter(x + offset, chance, marker="_", s=300, color="black", zorder=3,
                       label="chance" if kind == "seen" else None)  # fmt: skip
        ax.set_xticks(x, RANKS)
        ax.set_title(f"{q} -> {k}")
        ax.set_xlabel("taxonomic rank")
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel(f"{metric} top-1 accuracy")
    fig.suptitle("Retrieval accuracy: queries of seen and unseen species against all keys")
    fig.tight_layout()
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=3, bbox_to_anchor=(0.5, 0.0), frameon=False)
    save_table(top1, Path(path).with_suffix(".csv"))
    save_figure(fig, path)
    show_or_close(fig, show)
    return Path(path)


PROJECTIONS = ("pca", "umap")


def check_projection(method: str) -> None:
    if method not in PROJECTIONS:
        raise UserError(f"--projection must be one of {', '.join(PROJECTIONS)}, got {method!r}")
    if method == "umap":
        try:
            import umap  # noqa: F401
        except ImportError:
            raise UserError("--projection umap needs the umap-learn package (pip install umap-learn); "
                            "or use --projection pca") from None  # fmt: skip


def umap_2d(vectors: np.ndarray, seed: int = 0) -> np.ndarray:
    """UMAP as CLIBD plots it: cosine metric, min_dist 0.5, two components (seeded)."""
    import umap

    return umap.UMAP(n_components=2, metric="cosine", min_dist=0.5, random_state=seed).fit_transform(vectors)


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """The first two principal components (float64, deterministic sign: largest loading positive)."""
    x = vectors.astype(np.float64)
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    components = vt[:2] * np.sign(vt[:2][np.arange(2), np.abs(vt[:2]).argmax(1)])[:, None]
    return x @ components.T


def plot_projection(embeddings: dict[str, np.ndarray], labels: np.ndarray, rank: str, path: str | os.PathLike,
                    title: str, show: bool = False, method: str = "pca") -> Path:  # fmt: skip
    """PCA (or UMAP) of all modalities' embeddings fitted jointly; colour = taxon at `rank` (the 10 most
    frequent, the rest grey), marker = modality."""
    import pandas as pd

    check_projection(method)
    modalities = list(embeddings)
    joined = np.concatenate([embeddings[m] for m in modalities])
    coords = umap_2d(joined) if method == "umap" else pca_2d(joined)
    axis = "UMAP" if method == "umap" else "principal component"
    names, counts = np.unique(labels, return_counts=True)
    shown = [str(n) for n in names[np.argsort(-counts, kind="stable")][:MAX_TAXA]]
    table = pd.DataFrame({
        "modality": np.repeat(modalities, [len(embeddings[m]) for m in modalities]),
        rank: np.tile(labels, len(modalities)), "pc1": coords[:, 0], "pc2": coords[:, 1],
    })  # fmt: skip
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 6))
    colours = plt.get_cmap("tab10")
    markers = {"image": "o", "dna": "^", "text": "s"}
    for m in modalities:
        part = table[table["modality"] == m]
        other = part[~part[rank].isin(shown)]
        if len(other):
            ax.scatter(other["pc1"], other["pc2"], s=10, c="lightgrey", marker=markers[m], alpha=0.6,
                       label=f"other {len(names) - len(shown)} taxa" if m == modalities[0] else None)  # fmt: skip
        for i, name in enumerate(shown):
            sel = part[part[rank] == name]
            ax.scatter(sel["pc1"], sel["pc2"], s=14, color=colours(i), marker=markers[m], alpha=0.8,
                       label=name if m == modalities[0] else None)  # fmt: skip
    for m in modalities:
        ax.scatter([], [], marker=markers[m], color="black", label=f"[{m}]")
    ax.set_xlabel(f"{axis} 1")
    ax.set_ylabel(f"{axis} 2")
    ax.set_title(title)
    ax.legend(title=rank, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    save_table(table, Path(path).with_suffix(".csv"))
    save_figure(fig, path)
    show_or_close(fig, show)
    return Path(path)
