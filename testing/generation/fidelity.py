"""Sample fidelity, measured: does a generated image look like what was asked for, and do samples vary as much
as real images do?

- Recognition: an independent classifier (a `train classifier` run, `models.classifiers.load_classifier`)
  labels every sample with a species; per tree level, the share of samples whose predicted species falls in
  the intended group (the species itself at the last level, the clade of a `--node` sample at its level and
  the ancestors' above it), beside the chance a uniformly random species would have.
- Diversity: the within-class per-pixel standard deviation of the samples against that of real images of the
  same classes (their ratio; 1 = as varied as reality, 0 = one template per class), and the Frechet distance
  between classifier features of samples and real images (`testing.gan_metrics`, the distance the GAN logs),
  over all images and per class.
- The round trip: the classifier's accuracy on real images and on their reconstructions through the codes.
Everything returns plain dicts; `write_fidelity` saves them (JSON without NaN literals, a CSV per table) with a
labelled figure.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.atomic import write_text
from core.plotting import pyplot, save_figure, save_table, show_or_close
from testing.gan_metrics import feature_statistics, frechet_distance

NOT_GIVEN = -1  # an intended group left open (levels below a --node sample's)


@torch.no_grad()
def classifier_outputs(
    classifier, images: torch.Tensor, image_size: int | None = None, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class [N], pooled last-stage features [N, D]) on the CPU, for [-1, 1] images resized to the
    classifier's training resolution as `testing.gan_metrics.FeatureExtractor` resizes them."""
    classifier.eval()
    device = next(classifier.parameters()).device
    predicted, features = [], []
    for chunk in images.split(batch_size):
        x = chunk.to(device).float().clamp(-1, 1)
        if image_size is not None and x.shape[-1] != image_size:
            x = F.interpolate(
                x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
            )
        logits, stages = classifier(x)
        predicted.append(logits.argmax(1).cpu())
        features.append(stages[-1].float().mean(dim=[2, 3]).cpu())
    return torch.cat(predicted), torch.cat(features)


def recognition_by_level(predicted: torch.Tensor, intended: np.ndarray, assignment: np.ndarray) -> list[dict]:
    """Per level l: the share of samples whose predicted species lies in their intended group
    (`assignment[l, predicted] == intended[l]`), over the samples with a group given at that level
    (`NOT_GIVEN` elsewhere), and the chance of a uniformly random species (the mean share of species in the
    intended groups). `intended` [L, N] group indices; `assignment` [L, C] each species' group per level."""
    predicted = np.asarray(predicted)
    n_species = assignment.shape[1]
    rows = []
    for level, (wanted, groups) in enumerate(zip(intended, assignment, strict=True)):
        given = wanted != NOT_GIVEN
        if not given.any():
            continue
        hits = groups[predicted[given]] == wanted[given]
        sizes = np.bincount(groups, minlength=int(groups.max()) + 1)
        rows.append({"level": level, "samples": int(given.sum()), "rate": float(hits.mean()),
                     "chance": float((sizes[wanted[given]] / n_species).mean())})  # fmt: skip
    return rows


def species_targets(species: np.ndarray, assignment: np.ndarray) -> np.ndarray:
    """[L, N] intended groups of samples drawn for species `species` [N]: their own group at every level."""
    return assignment[:, np.asarray(species)]


def node_targets(level: int, group: int, n: int, assignment: np.ndarray) -> np.ndarray:
    """[L, N] intended groups of n samples drawn under group `group` of level `level`: that group, its
    ancestors' groups above it, nothing below it."""
    member = int(np.flatnonzero(assignment[level] == group)[0])
    targets = np.full((assignment.shape[0], n), NOT_GIVEN)
    targets[: level + 1] = assignment[: level + 1, member][:, None]
    return targets


def pixel_spread(images: torch.Tensor, labels: np.ndarray) -> dict[int, float]:
    """Per label with two or more images: the per-pixel standard deviation across its images (unbiased),
    averaged over pixels and channels; 0 when all its images are identical."""
    labels = np.asarray(labels)
    out = {}
    for label in np.unique(labels):
        members = images[torch.from_numpy(np.flatnonzero(labels == label))].float()
        if len(members) > 1:
            out[int(label)] = float(members.std(dim=0).mean())
    return out


def spread_ratio(samples: dict[int, float], real: dict[int, float]) -> dict:
    """Per label present in both: sample spread / real spread, and their mean (`ratio`)."""
    shared = [k for k in samples if k in real and real[k] > 0]
    per = {k: samples[k] / real[k] for k in shared}
    return {"ratio": float(np.mean(list(per.values()))) if per else float("nan"), "per_label": per}


def feature_distance(sample_features: torch.Tensor, real_features: torch.Tensor) -> float:
    """Frechet distance between the Gaussians of two feature sets (`testing.gan_metrics.frechet_distance`)."""
    return frechet_distance(*feature_statistics(sample_features), *feature_statistics(real_features))


def per_label_distance(sample_features, sample_labels, real_features, real_labels) -> dict[int, float]:
    """Frechet distance of the features per label with two or more images on both sides."""
    sample_labels, real_labels = np.asarray(sample_labels), np.asarray(real_labels)
    out = {}
    for label in np.unique(sample_labels):
        mine, theirs = np.flatnonzero(sample_labels == label), np.flatnonzero(real_labels == label)
        if len(mine) > 1 and len(theirs) > 1:
            out[int(label)] = feature_distance(sample_features[mine], real_features[theirs])
    return out


def fidelity_report(
    classifier,
    samples: torch.Tensor,
    intended: np.ndarray,
    groups: np.ndarray,
    real_images: torch.Tensor,
    real_groups: np.ndarray,
    assignment: np.ndarray,
    image_size: int | None = None,
    batch_size: int = 64,
) -> dict:
    """Recognition per level and diversity of `samples` against `real_images`.

    `intended` [L, N]: each sample's intended group per level (`species_targets`, `node_targets`); `groups` [N]
    and `real_groups` [M]: the label samples and real images are compared under (the species, or the node's
    group at its level for the real images of that clade); `assignment` [L, C]: species -> group per level."""
    predicted, features = classifier_outputs(classifier, samples, image_size, batch_size)
    _, real_features = classifier_outputs(classifier, real_images, image_size, batch_size)
    spread = spread_ratio(pixel_spread(samples, groups), pixel_spread(real_images, real_groups))
    per_label = per_label_distance(features, groups, real_features, real_groups)
    return {
        "samples": int(len(samples)),
        "real_images": int(len(real_images)),
        "recognition": recognition_by_level(predicted, intended, assignment),
        "pixel_spread": {
            "samples": pixel_spread(samples, groups),
            "real": pixel_spread(real_images, real_groups),
            **spread,
        },  # fmt: skip
        "feature_distance": {
            "all": feature_distance(features, real_features),
            "per_label_mean": float(np.mean(list(per_label.values()))) if per_label else None,
            "per_label": per_label,
        },  # fmt: skip
        "predicted": predicted.tolist(),
    }


@torch.no_grad()
def round_trip(
    classifier, reconstruct: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: np.ndarray,
    image_size: int | None = None, batch_size: int = 64,
) -> dict:  # fmt: skip
    """The classifier's accuracy on real images and on `reconstruct(images)` (e.g. decode(encode(x))): how
    much of what makes a species recognisable survives the codes."""
    recon = torch.cat([reconstruct(chunk).float().cpu() for chunk in images.split(batch_size)])
    real_pred, _ = classifier_outputs(classifier, images, image_size, batch_size)
    recon_pred, _ = classifier_outputs(classifier, recon, image_size, batch_size)
    labels = torch.as_tensor(np.asarray(labels))
    return {"images": int(len(images)), "real_accuracy": float((real_pred == labels).float().mean()),
            "round_trip_accuracy": float((recon_pred == labels).float().mean()),
            "l1": float((recon.clamp(-1, 1) - images.float()).abs().mean())}  # fmt: skip


def write_fidelity(report: dict, out_dir: str | os.PathLike, level_names: list[str] | None = None,
                   show: bool = False) -> Path:  # fmt: skip
    """fidelity.json (no NaN literals), recognition.csv and fidelity.png (recognition per level beside chance,
    with the diversity figures in the title) in `out_dir`."""
    import pandas as pd

    from core.runlog import json_ready

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "fidelity.json", json.dumps(json_ready(report), indent=1, allow_nan=False))
    frame = pd.DataFrame(report["recognition"])
    save_table(frame, out_dir / "recognition.csv")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    x = np.arange(len(frame))
    bars = ax.bar(x - 0.2, frame["rate"], 0.4, label="samples recognised in their group")
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in frame["rate"]], fontsize=7, padding=1)
    bars = ax.bar(x + 0.2, frame["chance"], 0.4, label="chance (random species)", color="grey")
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in frame["chance"]], fontsize=7, padding=1)
    names = level_names or [f"level {lv}" for lv in frame["level"]]
    ax.set_xticks(x, [names[lv] if lv < len(names) else f"level {lv}" for lv in frame["level"]])
    ax.set_xlabel("tree level (coarse to fine)")
    ax.set_ylabel("share of samples")
    ax.set_ylim(0, 1.28)  # room above the bars for the legend
    spread, distance = report["pixel_spread"]["ratio"], report["feature_distance"]["all"]
    ax.set_title(f"Recognition by an independent classifier ({report['samples']} samples)\n"
                 f"pixel spread vs real {spread:.2f}, feature Frechet distance {distance:.3g}", fontsize=9)  # fmt: skip
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    save_figure(fig, out_dir / "fidelity.png")
    show_or_close(fig, show)
    return out_dir / "fidelity.json"
