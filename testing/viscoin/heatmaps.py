"""Concept heat maps (`concepts heatmaps`): where each of an image's top concepts fires.

For each chosen image, the concepts most relevant to Theta's predicted class (activation x weight) are
taken; each one's g x g map is upsampled bilinearly to the image size, divided by its own maximum (so every
panel spans [0, 1] and a silent map stays 0) and overlaid on the image with a colormap. Each row is titled
with the true and the predicted class; a colour bar and a caption say what the colours and r are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.errors import UserError


def check_top(top: int, n_concepts: int) -> int:
    """`--top` must name between 1 and K concepts."""
    if not 1 <= top <= n_concepts:
        raise UserError(f"--top must be in 1..{n_concepts} (the bundle's K), got {top}")
    return top


def top_concept_maps(concepts: torch.Tensor, relevance: torch.Tensor, top: int, size: int) -> dict:
    """The `top` most relevant concepts per image and their maps, raw (B, top, g, g) and upsampled (B, top, S, S)."""
    k = min(top, concepts.shape[1])
    ranked = relevance.topk(k, dim=1)
    maps = concepts.gather(1, ranked.indices[:, :, None, None].expand(-1, -1, *concepts.shape[2:]))
    return {"concepts": ranked.indices, "relevance": ranked.values, "activation": maps.amax(dim=(2, 3)),
            "maps": maps, "heat": heat_maps(maps, size)}  # fmt: skip


def heat_maps(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Concept maps (B, k, g, g) upsampled bilinearly to (B, k, size, size), each divided by its own maximum."""
    heat = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)
    peak = heat.amax(dim=(2, 3), keepdim=True)
    return torch.where(peak > 0, heat / peak.clamp_min(1e-30), torch.zeros_like(heat))


def heatmap_table(image_ids: list[int], found: dict):
    """CSV rows (image, rank): concept, relevance, activation and the g x g map flattened (map_0 ...)."""
    import pandas as pd

    n, k = found["concepts"].shape
    flat = found["maps"].flatten(2).reshape(n * k, -1).numpy()
    table = pd.DataFrame({"image": np.repeat(image_ids, k), "rank": np.tile(np.arange(k), n),
                          "concept": found["concepts"].reshape(-1).numpy(),
                          "relevance": found["relevance"].reshape(-1).numpy(),
                          "activation": found["activation"].reshape(-1).numpy()})  # fmt: skip
    return pd.concat([table, pd.DataFrame(flat, columns=[f"map_{i}" for i in range(flat.shape[1])])], axis=1)


def _wrap(text: str, width: int = 22) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


def plot_heatmaps(
    images: torch.Tensor, image_ids: list[int], found: dict, titles: list[str], path: Path, show: bool = False
) -> Path:
    """One row per image: the image (titled with `titles`), then each top concept's heat map over it, a colour
    bar for the heat maps and a caption saying what r is."""
    from matplotlib import cm, colors

    from core.plotting import pyplot, save_figure, show_or_close
    from datasets.transforms import to_uint8_images

    plt = pyplot()
    pictures = to_uint8_images(images)
    n, k = found["concepts"].shape
    fig, axes = plt.subplots(n, k + 1, figsize=(1.9 * (k + 1) + 0.8, 2.3 * n + 0.8), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n):
        axes[i, 0].imshow(pictures[i])
        axes[i, 0].set_title(titles[i], fontsize=6.5, loc="left")
        for j in range(k):
            axes[i, j + 1].imshow(pictures[i])
            axes[i, j + 1].imshow(found["heat"][i, j].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            concept, relevance = int(found["concepts"][i, j]), float(found["relevance"][i, j])
            axes[i, j + 1].set_title(f"#{j + 1}: concept {concept}\nr = {relevance:.3g}", fontsize=7)
    fig.subplots_adjust(left=0.02, right=0.88, top=1 - 0.35 / (2.3 * n + 0.8), bottom=0.8 / (2.3 * n + 0.8) + 0.02,
                        hspace=0.75, wspace=0.08)  # fmt: skip
    bar = fig.colorbar(
        cm.ScalarMappable(colors.Normalize(0, 1), "jet"), cax=fig.add_axes([0.9, 0.3, 0.015, 0.4])
    )
    bar.set_label("concept map / its maximum on the image", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    caption = ("Columns: the concepts with the largest r for the predicted class, in order. r = the concept's "
               "activation (max over its map) x Theta's weight for the predicted class, i.e. its contribution to "
               "that class's logit. Maps are upsampled bilinearly.")  # fmt: skip
    fig.text(0.02, 0.01, _wrap(caption, 120), fontsize=7, va="bottom")
    save_figure(fig, path)
    show_or_close(fig, show)
    return path


@torch.no_grad()
def run_heatmaps(
    analysis, image_ids: list[int], run_dir: Path, top: int = 3, batch_size: int = 16, show: bool = False
) -> dict:
    """Top concepts of Theta's predicted class for each image: `heatmaps.png` and `heatmaps.csv`."""
    from core.plotting import save_table
    from testing.viscoin.amplify import encode_images

    models = analysis.models
    check_top(top, models.n_concepts)
    images, concepts, _, logits = encode_images(analysis, image_ids, batch_size)
    predicted = logits.argmax(dim=1)
    relevance = models.explainer.relevance(concepts.to(analysis.device), predicted.to(analysis.device)).cpu()
    found = top_concept_maps(concepts, relevance.float(), top, images.shape[-1])
    labels = [int(analysis.data[i]["label"]) for i in image_ids]
    name = lambda c: analysis.class_names[c].split(".", 1)[-1].replace("_", " ")  # noqa: E731
    titles = [f"image {i}" + (" (prediction right)" if t == int(p) else " (prediction wrong)")
              + f"\n{_wrap('true: ' + name(t), 30)}\n{_wrap('predicted by Theta: ' + name(int(p)), 30)}"
              for i, t, p in zip(image_ids, labels, predicted, strict=True)]  # fmt: skip
    save_table(heatmap_table(image_ids, found), run_dir / "heatmaps.csv")
    plot_heatmaps(images, image_ids, found, titles, run_dir / "heatmaps.png", show=show)
    return {"images": image_ids, "top": int(found["concepts"].shape[1]), "predicted": predicted.tolist(),
            "labels": labels}  # fmt: skip
