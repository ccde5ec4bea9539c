"""Do the codes follow the tree? Phylo-NN's headline measure, per level.

For each species, the histogram of codebook indices at every code position over its images; the distance of two
species is the Jensen-Shannon distance (base 2, in [0, 1]) of their histograms averaged over a set of positions.
Per level l, the Spearman correlation over species pairs between that code distance and the tree distance of the
species' level-l groups, for: the phylo codes of levels 0..l (the prefix the level-l head reads), the free codes,
and all codes of a plain VQ autoencoder of equal size. Figures: heat maps of the tree and code distance
matrices per level, and the correlations as bars, each beside the numbers (CSV/JSON). A correlation that does
not exist (one of the two distances is the same for every pair) is NaN in memory and `null` in the JSON, with
a `<column>_reason` beside it saying why; JSON files never hold `NaN` literals.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from core.atomic import write_text
from core.plotting import pyplot, save_figure, save_table, show_or_close
from core.progress import Progress
from core.runlog import json_ready
from datasets.phylogeny import Levels


@torch.no_grad()
def encode_dataset(autoencoder, loader, device, quiet: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [N, T], labels [N]) of every image of `loader` (items with `image` and `label`)."""
    autoencoder.eval()
    codes, labels = [], []
    with Progress(len(loader), "encode", enabled=not quiet) as bar:
        for batch in loader:
            if "image" in batch:
                codes.append(autoencoder.encode_codes(batch["image"].to(device)).cpu())
                labels.append(batch["label"])
            bar.update(1)
    return torch.cat(codes), torch.cat(labels)


def code_histograms(codes: torch.Tensor, labels: torch.Tensor, n_species: int, vocab: int) -> np.ndarray:
    """[species, positions, vocab] share of each species' images with code v at each position."""
    n, t = codes.shape
    flat = (labels.long()[:, None] * t + torch.arange(t)) * vocab + codes.long()
    counts = (
        torch.bincount(flat.flatten(), minlength=n_species * t * vocab).view(n_species, t, vocab).double()
    )
    totals = counts.sum(2, keepdim=True)
    return (counts / totals.clamp(min=1)).numpy()


def js_distances(histograms: np.ndarray) -> np.ndarray:
    """[species, species, positions] Jensen-Shannon distance (sqrt of the divergence, base 2) per position."""
    p, q = histograms[:, None], histograms[None, :]
    m = (p + q) / 2

    def kl(a, b):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(a > 0, a * np.log2(a / np.where(b > 0, b, 1.0)), 0.0).sum(-1)

    return np.sqrt(np.clip((kl(p, m) + kl(q, m)) / 2, 0.0, None))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation of the upper triangles (species pairs) of two distance matrices (NaN when
    undefined; `undefined_reason` says why)."""
    from scipy.stats import spearmanr

    if undefined_reason(a, b) is not None:
        return float("nan")
    upper = np.triu_indices(a.shape[0], k=1)
    return float(spearmanr(a[upper], b[upper]).statistic)


def undefined_reason(code: np.ndarray, tree: np.ndarray) -> str | None:
    """Why the Spearman correlation of two distance matrices does not exist, or None when it does."""
    upper = np.triu_indices(code.shape[0], k=1)
    if len(upper[0]) < 2:
        return f"{code.shape[0]} species give fewer than two pairs"
    if np.ptp(tree[upper]) == 0:
        return "the tree distance is the same for every species pair at this level"
    if np.ptp(code[upper]) == 0:
        return "the code distance is the same for every species pair"
    return None


def present_species(labels: torch.Tensor, n_species: int) -> np.ndarray:
    counts = np.bincount(labels.numpy(), minlength=n_species)
    return np.flatnonzero(counts > 0)


def correlations(phylo_codes, labels, autoencoder, levels: Levels, plain=None) -> dict:
    """Per level: Spearman of tree vs code distances for the phylo prefix, the free part and the plain VQ.

    `plain` is (codes, labels) of the plain VQ autoencoder on the same images, or (codes, labels, vocab) when
    its codebook differs in size (a stage-1 VQGAN's), or None. Species without images in the split are left out
    (and counted)."""
    n_species, vocab = len(levels.species), autoencoder.quantizer.n_embed
    keep = present_species(labels, n_species)
    distances = js_distances(code_histograms(phylo_codes, labels, n_species, vocab))[np.ix_(keep, keep)]
    plain_distances = None
    if plain is not None:
        plain_codes, plain_labels, *rest = plain
        hist = code_histograms(plain_codes, plain_labels, n_species, rest[0] if rest else vocab)
        plain_distances = js_distances(hist)[np.ix_(keep, keep)].mean(-1)
    free = distances[..., list(autoencoder.free_positions)].mean(-1)
    rows, matrices = [], {}
    for level in range(levels.n_levels):
        tree = levels.distances[level][np.ix_(keep, keep)]
        code = distances[..., list(autoencoder.level_positions(level))].mean(-1)
        matrices[level] = (tree, code)
        cut = levels.cuts[level] if level < len(levels.cuts) else 1.0
        row = {"level": level, "cut": cut, "groups": len(levels.groups[level])}
        series = {"phylo": code, "free": free}
        if plain_distances is not None:
            series["plain_vq"] = plain_distances
        for name, matrix in series.items():
            row[name] = spearman(matrix, tree)
        for name, matrix in series.items():
            reason = undefined_reason(matrix, tree)
            if reason is not None:
                row[f"{name}_reason"] = reason
        rows.append(row)
    return {
        "species": [levels.species[i] for i in keep],
        "species_without_images": len(levels.species) - len(keep),
        "images": int(len(labels)),
        "levels": rows,
        "matrices": matrices,
        "order": tree_order(levels, [levels.species[i] for i in keep]),
        "free_matrix": free,
        "plain_matrix": plain_distances,
    }


def tree_order(levels: Levels, species: list[str]) -> list[int]:
    """Indices of `species` sorted by their groups coarse to fine, so clades form blocks in the heat maps."""
    index = {name: i for i, name in enumerate(levels.species)}
    return sorted(range(len(species)), key=lambda k: tuple(levels.assignment[:, index[species[k]]]))


def write_report(result: dict, out_dir: str | os.PathLike, show: bool = False) -> dict:
    """correlation.json, correlation.png (+ .csv), heatmaps.png (+ one CSV per matrix) in `out_dir`."""
    import pandas as pd

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {k: result[k] for k in ("species", "species_without_images", "images", "levels")}
    write_text(out_dir / "correlation.json", json.dumps(json_ready(summary), indent=2, allow_nan=False))
    frame = pd.DataFrame(result["levels"])
    save_table(frame, out_dir / "correlation.csv")

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    series = [c for c in ("phylo", "free", "plain_vq") if c in frame]
    labels = {"phylo": "phylo codes (levels 0..l)", "free": "free codes", "plain_vq": "plain VQ (all codes)"}
    width = 0.8 / len(series)
    for i, column in enumerate(series):
        values = frame[column].fillna(0)
        bars = ax.bar(
            frame["level"] + (i - (len(series) - 1) / 2) * width, values, width, label=labels[column]
        )
        shown = [f"{v:.2f}" if np.isfinite(v) else "n/a" for v in frame[column]]
        ax.bar_label(bars, labels=shown, fontsize=7, padding=1)
    ax.set_xticks(
        frame["level"], [f"{lv}\n({g} groups)" for lv, g in zip(frame["level"], frame["groups"], strict=True)]
    )
    ax.set_xlabel("tree level (coarse to fine; last = species)")
    ax.set_ylabel("Spearman correlation with tree distance")
    values = frame[series].to_numpy(dtype=float)
    lowest = float(values[np.isfinite(values)].min()) if np.isfinite(values).any() else 0.0
    ax.set_ylim(min(-0.2, lowest - 0.05), 1.0)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(f"Code distances vs tree distances ({len(result['species'])} species)")
    save_figure(fig, out_dir / "correlation.png")
    show_or_close(fig, show)

    order = result["order"]
    n_levels = len(result["matrices"])
    fig, axes = plt.subplots(2, n_levels, figsize=(3.2 * n_levels, 6.4), squeeze=False)
    for level, (tree, code) in result["matrices"].items():
        for row, (matrix, name, cmap) in enumerate(((tree, "tree", "viridis"), (code, "code", "magma"))):
            shown = matrix[np.ix_(order, order)]
            ax = axes[row][level]
            image = ax.imshow(shown, cmap=cmap)
            ax.set_title(
                f"level {level}: {name} distance" + (f"\n(codes of levels 0..{level})" if row else ""),
                fontsize=9,
            )
            ax.set_xlabel("species (tree order)", fontsize=8)
            ax.set_ylabel("species (tree order)", fontsize=8)
            ax.tick_params(labelsize=6)
            fig.colorbar(image, ax=ax, fraction=0.046)
            names = [result["species"][k] for k in order]
            save_table(pd.DataFrame(shown, index=names, columns=names).reset_index(names="species"),
                       out_dir / f"{name}_distance_level{level}.csv")  # fmt: skip
    fig.suptitle("Tree distance of the species' level groups (top) and JS distance of their code histograms (bottom)",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    save_figure(fig, out_dir / "heatmaps.png")
    show_or_close(fig, show)
    return summary
