"""Figures and tables of a VDNA comparison: distance per layer (bar chart + CSV) and the most different
neurons' distributions overlaid (figure + CSV + JSON of the plotted numbers). Figures are saved; `show`
also opens them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.atomic import write_text
from core.plotting import pyplot, save_figure, save_table, show_or_close
from core.vdna import VDNA

# Histogram panels say how much mass sits in the last bin when it exceeds this fraction. vdna maps the
# calibrated range [min, max] widened by 1.2 onto [-1, 1] and clamps what lies beyond into the end bins. For
# non-negative (ReLU) activations the calibrated maximum maps to 2/3, so with 12 bins or more the last bin
# holds only activations above the range: a tail the histogram cannot show. (The first bin also holds
# in-range values, the zeros of ReLU units, so it is not flagged.)
END_BIN_NOTE = 0.005


def plot_layer_distances(
    per_layer: Any, distance: str, title: str, path: Path, highlight: str | None = None, show: bool = False
) -> Path:
    """Bar chart of the per-layer distance (mean over each layer's neurons; FD: the layer's FD)."""
    plt = pyplot()
    n = len(per_layer)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * n + 2), 3.6))
    colours = ["tab:red" if layer == highlight else "tab:blue" for layer in per_layer["layer"]]
    ax.bar(range(n), per_layer["distance"], color=colours)
    ax.set_xticks(range(n), list(per_layer["layer"]), rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(distance.upper() + (" (mean over neurons)" if distance != "fd" else ""))
    ax.set_xlabel("layer")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)
    show_or_close(fig, show)
    return path


def _neuron_entry(v: VDNA, layer: str, neuron: int) -> dict[str, Any]:
    """The plotted numbers of one neuron: normalised histogram, or mean and variance."""
    dist = v.get_neuron_dist(layer, neuron)
    if v.type == "histogram":
        counts = dist.reshape(-1).to(torch.float64)
        return {"probabilities": (counts / counts.sum().clamp_min(1)).tolist()}
    var = dist["var"] if "var" in dist else dist["sigma"]
    return {"mu": float(dist["mu"]), "var": float(var)}


def _draw_gaussian(
    ax: Any, entry: dict[str, float], label: str, colour: str, span: tuple[float, float]
) -> None:
    sd = math.sqrt(max(entry["var"], 0.0))
    if sd == 0:
        ax.axvline(entry["mu"], color=colour, label=label)
        return
    x = np.linspace(*span, 200)
    ax.plot(x, np.exp(-0.5 * ((x - entry["mu"]) / sd) ** 2) / (sd * math.sqrt(2 * math.pi)), color=colour,
            label=label)  # fmt: skip


def plot_top_neurons(
    a: VDNA, b: VDNA, top: Any, metric: str, labels: tuple[str, str], path: Path, show: bool = False
) -> list[dict[str, Any]]:
    """Overlay A's and B's distributions of the neurons in `top` (rank, layer, neuron, metric columns);
    returns the plotted numbers. Histograms are drawn on vdna's normalised axis [-1, 1] (the calibrated range
    widened by 1.2); the mass of their first and last bins, where out-of-range values are clamped, is recorded
    (`first_bin`, `last_bin`) and a panel's title says when the mass above the range exceeds `END_BIN_NOTE`."""
    plt = pyplot()
    k = max(1, len(top))
    cols = min(4, k)
    rows = math.ceil(k / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    numbers = []
    for ax, row in zip(axes.flat, top.itertuples(index=False), strict=False):
        above = [0.0, 0.0]
        layer, neuron, value = row.layer, int(row.neuron), float(getattr(row, metric))
        ea, eb = _neuron_entry(a, layer, neuron), _neuron_entry(b, layer, neuron)
        numbers.append(
            {"rank": int(row.rank), "layer": layer, "neuron": neuron, metric: value, "a": ea, "b": eb}
        )
        if a.type == "histogram":
            n = len(ea["probabilities"])
            centres = np.linspace(-1 + 1 / n, 1 - 1 / n, n)
            ax.step(centres, ea["probabilities"], where="mid", color="tab:blue", label=labels[0], lw=0.8)
            ax.step(centres, eb["probabilities"], where="mid", color="tab:orange", label=labels[1], lw=0.8)
            ax.set_xlim(-1, 1)
            ax.set_xlabel("activation, calibrated range -> [-1, 1]", fontsize=7)
            ax.set_ylabel("fraction of activations", fontsize=7)
            above = [e["probabilities"][-1] for e in (ea, eb)]
            ea["last_bin"], eb["last_bin"] = above
            ea["first_bin"], eb["first_bin"] = ea["probabilities"][0], eb["probabilities"][0]
        else:
            sds = [math.sqrt(max(e["var"], 0.0)) for e in (ea, eb)]
            lo = min(ea["mu"] - 4 * sds[0], eb["mu"] - 4 * sds[1])
            hi = max(ea["mu"] + 4 * sds[0], eb["mu"] + 4 * sds[1])
            span = (lo, hi) if hi > lo else (lo - 1, hi + 1)
            _draw_gaussian(ax, ea, labels[0], "tab:blue", span)
            _draw_gaussian(ax, eb, labels[1], "tab:orange", span)
            ax.set_xlabel("activation", fontsize=7)
            ax.set_ylabel("probability density (fitted Gaussian)", fontsize=7)
        title = f"#{row.rank} {layer}[{neuron}]  {metric.upper()}={value:.4g}"
        outside = max(above) > END_BIN_NOTE
        if outside:
            title += f"\nabove the calibrated range: {labels[0]} {above[0]:.1%}, {labels[1]} {above[1]:.1%}"
        ax.set_title(title, fontsize=7, color="tab:red" if outside else "black")
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(top) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    show_or_close(fig, show)
    return numbers


def write_comparison(
    result: Any,
    a: VDNA,
    b: VDNA,
    labels: tuple[str, str],
    out_dir: Path,
    layer: str | None,
    show: bool = False,
) -> dict[str, Path]:
    """Write the per-layer chart and CSV, the top-neuron figure, CSV and JSON, and summary.json."""
    title = (
        f"{result.distance.upper()} {labels[0]} vs {labels[1]}: {result.value:.6g} "
        f"({a.feature_extractor_name}, {a.name})"
    )
    paths = {
        "per_layer_png": plot_layer_distances(
            result.per_layer, result.distance, title, out_dir / "distance_per_layer.png", layer, show
        ),
        "per_layer_csv": save_table(result.per_layer, out_dir / "distance_per_layer.csv"),
        "top_csv": save_table(result.top, out_dir / "top_neurons.csv"),
    }
    numbers = plot_top_neurons(
        a, b, result.top, result.neuron_metric, labels, out_dir / "top_neurons.png", show
    )
    paths["top_png"] = out_dir / "top_neurons.png"
    paths["top_json"] = out_dir / "top_neurons.json"
    write_text(paths["top_json"], json.dumps(numbers, indent=1) + "\n")
    summary = {
        "distance": result.distance,
        "value": result.value,
        "layer": layer,
        "extractor": a.feature_extractor_name,
        "distribution": a.name,
        "a": {"label": labels[0], "num_images": a.num_images},
        "b": {"label": labels[1], "num_images": b.num_images},
    }
    paths["summary"] = out_dir / "summary.json"
    write_text(paths["summary"], json.dumps(summary, indent=2) + "\n")
    return paths
