"""Generator quality as a Fréchet distance between feature statistics of real and generated images.

Features are the global-average-pooled last stage of a classifier: the project's trained classifier when
one is given (`--metric-classifier`), else a frozen random-init ResNet-18 seeded with 0 (no download, the same
on every machine; random features still separate image distributions, but its numbers are comparable only
with runs that used the same extractor). The distance is computed in float64 with `torch.linalg.eigh`:
FD = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1^1/2 S2 S1^1/2)^1/2).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

RANDOM_EXTRACTOR = "random_resnet18"


class FeatureExtractor(nn.Module):
    """[-1, 1] images -> pooled last-stage features of a classifier, resized to its training resolution."""

    def __init__(self, classifier: nn.Module, name: str, image_size: int | None = None):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.name = name
        self.image_size = image_size

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        if self.image_size is not None and images.shape[-1] != self.image_size:
            size = (self.image_size, self.image_size)
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        _, stages = self.classifier(images)
        return stages[-1].float().mean(dim=[2, 3])


def build_extractor(classifier_path: str | os.PathLike | None, device: torch.device) -> FeatureExtractor:
    """The project's classifier at `classifier_path`, or the seeded random ResNet-18 when None."""
    from models.classifiers import Classifier, load_classifier

    if classifier_path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = Classifier("resnet18", 1)
        return FeatureExtractor(model, RANDOM_EXTRACTOR).to(device)
    model, meta = load_classifier(classifier_path, device=str(device))
    name = f"classifier_{model.arch}"
    return FeatureExtractor(model, name, image_size=meta.get("image_size")).to(device)


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, unbiased covariance) of an [N, D] feature matrix, in float64."""
    x = features.double()
    mu = x.mean(dim=0)
    centred = x - mu
    sigma = centred.T @ centred / max(x.shape[0] - 1, 1)
    return mu, sigma


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (negative rounding eigenvalues clipped)."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(
    mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor
) -> float:
    """Fréchet distance between Gaussians N(mu1, S1) and N(mu2, S2), in float64."""
    mu1, sigma1, mu2, sigma2 = (t.double() for t in (mu1, sigma1, mu2, sigma2))
    root1 = _sqrtm_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    middle = (middle + middle.T) / 2  # exact symmetry for eigh
    trace_sqrt = torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum()
    value = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return float(value.clamp(min=0))


@torch.no_grad()
def extract_features(extractor: FeatureExtractor, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """Concatenated features of every batch (images in [-1, 1]), on the CPU."""
    return torch.cat([extractor(images).cpu() for images in batches])


@torch.no_grad()
def generated_batches(
    render: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, batch_size: int
) -> Iterable[torch.Tensor]:
    """`render(z_chunk)` over `z` in chunks of `batch_size`."""
    for chunk in z.split(batch_size):
        yield render(chunk)
