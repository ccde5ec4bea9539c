"""Concept amplification (the `amplify` command): scale chosen concepts, regenerate, and ask f what it sees.

For each chosen image, the concepts that explain Theta's prediction are selected by a relevance threshold
(default: the paper's rule, normalised relevance > 0.2, as `test viscoin`'s faithfulness), a top-k or an
explicit list; their maps are multiplied by each multiplier, decoded by Omega with constant noise,
and f classifies the decoded image. The probability recorded is that of the class Theta predicted on the
original image (the class being explained). The baseline scales as many random concepts, drawn among the
unselected ones (those that fire on the image first), by the same multipliers.

Omega `normalize_2nd_moment`s its concept input, so only relative sizes matter: amplifying the selected
concepts also shrinks all the others after normalisation, and scaling *every* concept by m > 0 changes nothing.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.errors import UserError
from models.viscoin import concept_activations
from testing.viscoin.metrics import DEFAULT_THRESHOLD, normalised_relevance, random_baseline, scale_selected

DEFAULT_IMAGES = 5


def choose_images(
    n: int, indices: list[int] | None, seed: int = 0, count: int = DEFAULT_IMAGES, split: str = "the"
) -> list[int]:
    """The given indices into the split of `n` images (checked), or `count` of them drawn with `seed`."""
    if indices is None:
        rng = np.random.default_rng(seed)
        return sorted(rng.choice(n, size=min(count, n), replace=False).tolist())
    if not indices:
        raise UserError("--image-indices is empty: give indices such as 0,5,9")
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise UserError(f"--image-indices {bad} out of range: {split} split has {n} images, valid 0..{n - 1}")
    return list(indices)


@dataclass(frozen=True)
class Selection:
    """How concepts are chosen: `threshold` (float), `top_k` (int) or `indices` (tuple of ints)."""

    mode: str
    value: float | int | tuple[int, ...]

    def describe(self) -> str:
        if self.mode == "threshold":
            return f"relevance / max|relevance| > {self.value}"
        if self.mode == "top_k":
            return f"top {self.value} by relevance"
        return "concepts " + ",".join(map(str, self.value))


def check_selection_options(
    threshold: float | None = None, top_k: int | None = None, indices: list[int] | None = None
) -> None:
    """What needs no model: at most one way of selecting, and a threshold in [0, 1]."""
    given = [name for name, value in (("--concept-threshold", threshold), ("--concept-top-k", top_k),
                                      ("--concept-indices", indices)) if value is not None]  # fmt: skip
    if len(given) > 1:
        raise UserError(f"{' and '.join(given)} exclude each other: select concepts one way")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise UserError(
            f"--concept-threshold must be in [0, 1] (relative to the top relevance), got {threshold}"
        )


def resolve_selection(
    n_concepts: int,
    threshold: float | None = None,
    top_k: int | None = None,
    indices: list[int] | None = None,
) -> Selection:
    """Exactly one of threshold / top-k / indices (none: the threshold `DEFAULT_THRESHOLD`, as `test viscoin`),
    validated against the bundle's K."""
    check_selection_options(threshold, top_k, indices)
    if threshold is not None:
        return Selection("threshold", float(threshold))
    if indices is not None:
        if not indices:
            raise UserError("--concept-indices is empty: give indices such as 1,2")
        bad = [i for i in indices if not 0 <= i < n_concepts]
        if bad:
            raise UserError(
                f"--concept-indices {bad} out of range: the bundle has K={n_concepts}, valid 0..{n_concepts - 1}"
            )
        return Selection("indices", tuple(dict.fromkeys(indices)))
    if top_k is None:
        return Selection("threshold", DEFAULT_THRESHOLD)
    if not 1 <= top_k <= n_concepts:
        raise UserError(f"--concept-top-k must be in 1..{n_concepts} (the bundle's K), got {top_k}")
    return Selection("top_k", top_k)


def select_concepts(relevance: torch.Tensor, selection: Selection) -> torch.Tensor:
    """Boolean mask (B, K) of the selected concepts of each image, from its relevances (B, K)."""
    mask = torch.zeros_like(relevance, dtype=torch.bool)
    if selection.mode == "threshold":
        return normalised_relevance(relevance) > selection.value
    if selection.mode == "top_k":
        return mask.scatter_(1, relevance.topk(int(selection.value), dim=1).indices, True)
    mask[:, list(selection.value)] = True
    return mask


@torch.no_grad()
def decode_and_classify(models, concepts: torch.Tensor, support: torch.Tensor, target: torch.Tensor):
    """Omega's image (noise_mode const) for the concept maps, and f's probability of `target` on it."""
    image, _ = models.decoder(concepts, support, noise_mode="const")
    logits, _ = models.classifier(image)
    return image, F.softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)


@dataclass
class AmplifyPlan:
    """The chosen images, encoded, with their selections: everything checked before any output is written."""

    image_ids: list[int]
    images: torch.Tensor  # (N, 3, H, W) in [-1, 1], CPU
    concepts: torch.Tensor  # (N, K, g, g)
    support: torch.Tensor
    target: torch.Tensor  # Theta's predicted class on the original image
    normalised: torch.Tensor  # relevance / max|relevance| for that class, (N, K)
    selected: torch.Tensor  # (N, K) bool
    random: torch.Tensor  # (N, K) bool
    selection: Selection
    multipliers: list[float]

    def empty_lines(self) -> list[str]:
        """One console line per image whose selection is empty."""
        empty = ~self.selected.any(dim=1)
        peaks = self.normalised.amax(dim=1)
        return [f"image {self.image_ids[i]}: no concept selected ({self.selection.describe()}); its highest "
                f"normalised relevance is {float(peaks[i]):.3f}" for i in empty.nonzero().flatten().tolist()]  # fmt: skip


def encode_tensor(models, images: torch.Tensor, device, batch_size: int = 16):
    """(f logits, concepts, support, Theta logits) of images (N, 3, H, W) in [-1, 1], float, on the CPU."""
    outs = [models.encode(chunk.to(device)) for chunk in images.split(batch_size)]
    return tuple(torch.cat([o[j].float().cpu() for o in outs]) for j in range(4))


def encode_images(analysis, image_ids: list[int], batch_size: int = 16):
    """Images of the split at `image_ids`, and their (concepts, support, Theta logits), on the CPU."""
    images = torch.stack([analysis.data[i]["image"] for i in image_ids])
    _, concepts, support, logits = encode_tensor(analysis.models, images, analysis.device, batch_size)
    return images, concepts, support, logits


def plan_encoded(
    models,
    device,
    image_ids: list,
    images: torch.Tensor,
    codes: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    selection: Selection,
    multipliers: list[float],
    seed: int = 0,
    target: torch.Tensor | None = None,
) -> AmplifyPlan:
    """The plan of encoded images, `codes` = (concepts, support, Theta logits): the explained class is
    `target` (default: Theta's prediction), its concepts selected; any selection, also an empty one."""
    concepts, support, logits = codes
    target = logits.argmax(dim=1) if target is None else target
    relevance = models.explainer.relevance(concepts.to(device), target.to(device)).float().cpu()
    selected = select_concepts(relevance, selection)
    scores = torch.rand(len(image_ids), concepts.shape[1], generator=torch.Generator().manual_seed(seed))
    return AmplifyPlan(list(image_ids), images, concepts, support, target, normalised_relevance(relevance), selected,
                       random_baseline(selected, scores, concept_activations(concepts) > 0), selection,
                       list(multipliers))  # fmt: skip


def plan_amplify(
    analysis,
    image_ids: list[int],
    selection: Selection,
    multipliers: list[float],
    seed: int = 0,
    batch_size: int = 16,
) -> AmplifyPlan:
    """Encode the images and select their concepts; UserError when no image has any concept selected."""
    images, *codes = encode_images(analysis, image_ids, batch_size)
    plan = plan_encoded(
        analysis.models, analysis.device, image_ids, images, codes, selection, multipliers, seed
    )
    if not plan.selected.any():
        raise UserError(
            f"no image has a concept with {selection.describe()} (highest normalised relevance: "
            f"{float(plan.normalised.max()):.3f}); lower --concept-threshold or use --concept-top-k"
        )
    return plan


def amplify_images(plan: AmplifyPlan, models, device, batch_size: int = 16, quiet: bool = False) -> dict:
    """Decode every (image, multiplier) for the selected and the random concepts; f's probabilities.

    Returns `reconstruction` (N, 3, H, W), `p_reconstruction` (N,), and for `selected` / `random`:
    images (M, N, 3, H, W) and probabilities (N, M).
    """
    from core.progress import Progress

    chunks = list(range(0, len(plan.image_ids), batch_size))
    out: dict[str, list] = {"reconstruction": [], "p_reconstruction": []}
    for kind in ("selected", "random"):
        out.update({f"images_{kind}": [], f"p_{kind}": []})
    with Progress(len(chunks) * (1 + 2 * len(plan.multipliers)), "amplify", enabled=not quiet) as bar:
        for start in chunks:
            part = slice(start, start + batch_size)
            concepts, support = plan.concepts[part].to(device), plan.support[part].to(device)
            target = plan.target[part].to(device)
            image, p = decode_and_classify(models, concepts, support, target)
            out["reconstruction"].append(image.cpu())
            out["p_reconstruction"].append(p.cpu())
            bar.update(1)
            for kind, mask in (("selected", plan.selected[part]), ("random", plan.random[part])):
                images, probs = [], []
                for m in plan.multipliers:
                    image, p = decode_and_classify(
                        models, scale_selected(concepts, mask.to(device), m), support, target
                    )
                    images.append(image.cpu())
                    probs.append(p.cpu())
                    bar.update(1)
                out[f"images_{kind}"].append(torch.stack(images))
                out[f"p_{kind}"].append(torch.stack(probs, dim=1))
    return {key: torch.cat(value, dim=1 if key.startswith("images_") else 0) for key, value in out.items()}


def _concept_list(mask: torch.Tensor, sep: str = ",") -> str:
    return sep.join(map(str, mask.nonzero().flatten().tolist()))


def amplify_table(plan: AmplifyPlan, result: dict, class_names: list[str]):
    """CSV rows (image x multiplier); images without a selection get empty concepts and NaN probabilities."""
    import pandas as pd

    n, m = len(plan.image_ids), len(plan.multipliers)
    has = plan.selected.any(dim=1).numpy()
    as_text = [_concept_list(row, " ") for row in plan.selected]
    random_text = [_concept_list(row, " ") for row in plan.random]
    rows = np.repeat(np.arange(n), m)
    p_sel = np.where(has[:, None], result["p_selected"].numpy(), np.nan).ravel()
    p_rand = np.where(has[:, None], result["p_random"].numpy(), np.nan).ravel()
    target = plan.target.numpy()[rows]
    return pd.DataFrame({
        "image": np.asarray(plan.image_ids)[rows], "explained_class": target,
        "explained_class_name": np.asarray(class_names)[target], "multiplier": np.tile(plan.multipliers, n),
        "selected_concepts": np.asarray(as_text, dtype=object)[rows],
        "random_concepts": np.asarray(random_text, dtype=object)[rows],
        "p_selected": p_sel, "p_random": p_rand, "p_reconstruction": result["p_reconstruction"].numpy()[rows],
        "max_normalised_relevance": plan.normalised.amax(dim=1).numpy()[rows],
    })  # fmt: skip


def amplify_summary(plan: AmplifyPlan, result: dict) -> dict:
    """Mean probability of the explained class per multiplier, selected vs random, over images with a selection."""
    has = plan.selected.any(dim=1)
    keys = [f"{m:g}" for m in plan.multipliers]
    mean = {kind: dict(zip(keys, result[f"p_{kind}"][has].mean(dim=0).tolist(), strict=True))
            for kind in ("selected", "random")}  # fmt: skip
    return {
        "selection": plan.selection.describe(),
        "multipliers": plan.multipliers,
        "images": plan.image_ids,
        "n_images": len(plan.image_ids),
        "n_empty": int((~has).sum()),
        "mean_p_selected": mean["selected"],
        "mean_p_random": mean["random"],
        "mean_p_reconstruction": float(result["p_reconstruction"][has].mean()),
        "probability_of": "Theta's predicted class on the original image, as f sees the decoded image",
    }


def plot_amplify(
    plan: AmplifyPlan, result: dict, class_names: list[str], path: Path, show: bool = False
) -> Path:
    """Two rows per image (selected, random): the original, then the decoded image at each multiplier."""
    from core.plotting import pyplot, save_figure, show_or_close
    from datasets.transforms import to_uint8_images

    plt = pyplot()
    n, m = len(plan.image_ids), len(plan.multipliers)
    original = to_uint8_images(plan.images)
    recon = to_uint8_images(result["reconstruction"])
    decoded = {kind: to_uint8_images(result[f"images_{kind}"].flatten(0, 1)).reshape(m, n, *original.shape[1:])
               for kind in ("selected", "random")}  # fmt: skip
    fig, axes = plt.subplots(2 * n, m + 1, figsize=(1.6 * (m + 1), 1.9 * 2 * n), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    has = plan.selected.any(dim=1).tolist()
    for i in range(n):
        name = textwrap.fill(class_names[int(plan.target[i])].split(".")[-1].replace("_", " "), 22)
        axes[2 * i, 0].imshow(original[i])
        axes[2 * i, 0].set_title(f"image {plan.image_ids[i]}, Theta predicts\n{name}", fontsize=7)
        if not has[i]:
            axes[2 * i, 1].imshow(recon[i])
            axes[2 * i, 1].set_title(
                f"no concept selected\np={float(result['p_reconstruction'][i]):.2f}", fontsize=7
            )
            continue
        label = (
            f"selected: {_concept_list(plan.selected[i])[:40]}\nrandom: {_concept_list(plan.random[i])[:40]}"
        )
        axes[2 * i + 1, 0].text(0.5, 0.5, label, ha="center", va="center", fontsize=6, wrap=True)
        for row, kind in ((2 * i, "selected"), (2 * i + 1, "random")):
            for j in range(m):
                axes[row, j + 1].imshow(decoded[kind][j, i])
                p = float(result[f"p_{kind}"][i, j])
                tag = "" if kind == "selected" else "random "
                axes[row, j + 1].set_title(f"{tag}x{plan.multipliers[j]:g} p={p:.2f}", fontsize=7)
    fig.tight_layout(rect=(0, 0.02 / n, 1, 1))
    fig.text(0.01, 0.002, "x k: the selected concepts (upper row) or as many random ones (lower row) scaled by k, "
             "then decoded; p: f's probability of Theta's class on that image.", fontsize=7, wrap=True)  # fmt: skip
    save_figure(fig, path)
    show_or_close(fig, show)
    return path


def run_amplify(
    plan: AmplifyPlan, analysis, run_dir: Path, batch_size: int = 16, show: bool = False, quiet: bool = False
) -> dict:
    """Decode, then save `amplify.png`, `amplify.csv` and `summary.json` in `run_dir`."""
    from core.atomic import write_text
    from core.plotting import save_table

    result = amplify_images(plan, analysis.models, analysis.device, batch_size, quiet)
    save_table(amplify_table(plan, result, analysis.class_names), run_dir / "amplify.csv")
    plot_amplify(plan, result, analysis.class_names, run_dir / "amplify.png", show=show)
    summary = amplify_summary(plan, result)
    write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary
