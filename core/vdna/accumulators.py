"""Streaming accumulators that turn batches of layer activations into a VDNA in one pass.

Each `update` takes ``{layer: Tensor[B, C, H, W]}`` (token features as ``[B, C, N_tokens, 1]``), reduces it
at once, and keeps only per-neuron state, so memory does not depend on the number of images. The state
lives on the features' device (CPU or CUDA); `result()` returns a VDNA whose tensors are on the CPU.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from core.errors import UserError
from core.vdna.vdna import VDNA, distribution_name

# vdna's histogram normalisation: ranges are widened by this factor, then mapped onto [-1, 1].
RANGE_SCALE = 1.2
# Elements normalised at a time: small chunks stay in cache on CPU; a GPU prefers few large kernels.
CPU_CHUNK_ELEMENTS = 1 << 17
CUDA_CHUNK_ELEMENTS = 1 << 24

RangeValues = torch.Tensor | np.ndarray | Sequence[float]


def _check_features(features: Mapping[str, torch.Tensor], neurons: Mapping[str, int]) -> int:
    """Validate a batch against the expected layers and widths; return its batch size."""
    missing = [layer for layer in neurons if layer not in features]
    extra = [layer for layer in features if layer not in neurons]
    if missing or extra:
        raise UserError(f"feature layers do not match the VDNA layers: missing {missing}, unexpected {extra}")
    sizes = set()
    for layer, c in neurons.items():
        x = features[layer]
        if x.ndim != 4 or x.shape[1] != c:
            raise UserError(f"layer {layer!r}: expected features [B, {c}, H, W], got {list(x.shape)}")
        sizes.add(x.shape[0])
    if len(sizes) != 1:
        raise UserError(f"layers disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


class _Accumulator(ABC):
    """Shared bookkeeping: the layers, the image count, and assembling the final VDNA."""

    vdna_type = ""
    default_extraction_settings: dict[str, Any] = {}

    def __init__(self, neurons: Mapping[str, int]):
        if not neurons:
            raise UserError("a VDNA needs at least one layer")
        self.neurons = {layer: int(c) for layer, c in neurons.items()}
        self.num_images = 0

    def update(self, features: Mapping[str, torch.Tensor]) -> None:
        """Add one batch of features (no gradients are recorded)."""
        b = _check_features(features, self.neurons)
        with torch.no_grad():
            for layer in self.neurons:
                self._update_layer(layer, features[layer])
        self.num_images += b

    @abstractmethod
    def _update_layer(self, layer: str, x: torch.Tensor) -> None:
        """Fold one layer's batch of features into the running statistics."""

    @abstractmethod
    def _layer_data(self, layer: str) -> Any:
        """The layer's entry of `VDNA.data`."""

    def _hist_nb_bins(self) -> int | None:
        return None

    def result(
        self,
        feature_extractor_name: str = "unknown",
        data_settings: Mapping[str, Any] | None = None,
        extraction_settings: Mapping[str, Any] | None = None,
    ) -> VDNA:
        """The VDNA of everything seen so far (CPU tensors); the accumulator can keep going afterwards."""
        if self.num_images == 0:
            raise UserError(f"no images were accumulated for the {self.vdna_type} VDNA (empty image set?)")
        bins = self._hist_nb_bins()
        return VDNA(
            type=self.vdna_type,
            name=distribution_name(self.vdna_type, bins),
            data={layer: self._layer_data(layer) for layer in self.neurons},
            num_images=self.num_images,
            feature_extractor_name=feature_extractor_name,
            neurons_list=dict(self.neurons),
            hist_nb_bins=bins,
            data_settings=dict(data_settings or {}),
            extraction_settings={**self.default_extraction_settings, **(extraction_settings or {})},
            time_of_compute=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )


class HistogramAccumulator(_Accumulator):
    """Per-neuron histograms of every spatial position / token of every image (vdna's ``histogram-N``).

    Normalisation is vdna's, in float64: ``lo, hi = 1.2*min, 1.2*max``; ``x' = (x - (lo+hi)/2) /
    ((hi-lo)/2 + 1e-8)``; clamp to [-1, 1]. Binning is `torch.histc(x', bins=N, min=-1, max=1)`'s rule,
    which vdna uses for all but tiny tensors: ``bin = floor((x' + 1) * N / 2)`` in float64, with the
    right-most edge x' = 1 in the last bin. Each interior edge therefore belongs to the bin on its right,
    and out-of-range values land in the end bins through the clamp. NaN activations are not counted
    (histc skips them). All neurons of a layer are binned by one `scatter_add_` per chunk over
    ``channel * N + bin``; counts are int64.
    """

    vdna_type = "histogram"

    def __init__(
        self,
        neurons: Mapping[str, int],
        bins: int,
        ranges: Mapping[str, tuple[RangeValues, RangeValues]],
        chunk_elements: int | None = None,
    ):
        super().__init__(neurons)
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise UserError(f"the number of histogram bins must be a positive integer, got {bins!r}")
        self.bins = bins
        self.chunk_elements = chunk_elements
        self.default_extraction_settings = {
            "accumulate_spatial_feats_in_hist": True,
            "accumulate_sample_feats_in_hist": True,
            "normalise_feats": True,
            "range_scale_for_norm_params": RANGE_SCALE,
            "hist_range": [-1.0, 1.0],
            "hist_nb_bins": bins,
        }
        self.mean: dict[str, torch.Tensor] = {}
        self.std: dict[str, torch.Tensor] = {}
        for layer, c in self.neurons.items():
            if layer not in ranges:
                raise UserError(f"no activation range for layer {layer!r}; ranges cover {', '.join(ranges)}")
            lo, hi = (
                torch.as_tensor(v, dtype=torch.float64).reshape(-1).cpu() * RANGE_SCALE for v in ranges[layer]
            )
            if lo.numel() != c or hi.numel() != c:
                raise UserError(
                    f"layer {layer!r}: ranges have {lo.numel()}/{hi.numel()} values, expected {c}"
                )
            if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
                raise UserError(f"layer {layer!r}: activation ranges contain non-finite values")
            self.mean[layer] = (lo + hi) / 2
            self.std[layer] = (hi - lo) / 2 + 1e-8
        # One extra column per neuron collects NaNs and is dropped in `result`.
        self.counts: dict[str, torch.Tensor] = {}

    def _hist_nb_bins(self) -> int | None:
        return self.bins

    def _update_layer(self, layer: str, x: torch.Tensor) -> None:
        b, c = x.shape[:2]
        n = self.bins
        rows = x.reshape(b * c, -1)  # row r is image r // c, neuron r % c
        if layer not in self.counts:
            self.counts[layer] = torch.zeros(c, n + 1, dtype=torch.int64, device=x.device)
        flat = self.counts[layer].view(-1)
        neuron = torch.arange(b * c, device=x.device) % c
        mean = self.mean[layer].to(x.device)[neuron].unsqueeze(1)
        std = self.std[layer].to(x.device)[neuron].unsqueeze(1)
        offset = (neuron * (n + 1)).unsqueeze(1)
        budget = self.chunk_elements or (CUDA_CHUNK_ELEMENTS if x.is_cuda else CPU_CHUNK_ELEMENTS)
        step = min(b * c, max(1, budget // max(1, rows.shape[1])))
        # Two scratch buffers reused by every chunk: no allocation inside the loop.
        y_buf = torch.empty(step, rows.shape[1], dtype=torch.float64, device=x.device)
        idx_buf = torch.empty(step, rows.shape[1], dtype=torch.int64, device=x.device)
        one = torch.ones(1, dtype=torch.int64, device=x.device)
        for r0 in range(0, b * c, step):
            sl = slice(r0, r0 + step)
            k = min(step, b * c - r0)
            y, idx = y_buf[:k], idx_buf[:k]
            torch.sub(rows[sl], mean[sl], out=y)  # float64, like vdna's float32 - float64 promotion
            y.div_(std[sl])
            # Clamping (x'+1)*N/2 to [0, N-1] equals clamping x' to [-1, 1] then applying histc's rule,
            # because floating-point rounding is monotone.
            y.add_(1.0).mul_(n / 2).clamp_(0, n - 1).nan_to_num_(nan=float(n))
            idx.copy_(y).add_(offset[sl])  # float -> int64 truncates, i.e. floors these non-negatives
            flat.scatter_add_(0, idx.view(-1), one.expand(idx.numel()))

    def _layer_data(self, layer: str) -> torch.Tensor:
        return self.counts[layer][:, : self.bins].cpu().clone()


def _merge_moments(n_a: int, mean: torch.Tensor, m2: torch.Tensor, s: torch.Tensor) -> None:
    """Merge a batch of per-image vectors `s` [B, C] into a running mean and M2, in place (Chan et al.).

    M2 is the sum of squared deviations ([C]) or the co-moment matrix X_c^T X_c ([C, C]).
    Merging centred moments avoids the cancellation of raw sums of squares when |mean| >> std.
    """
    n_b = s.shape[0]
    n = n_a + n_b
    mean_b = s.mean(0)
    d = s - mean_b
    delta = mean_b - mean
    if m2.ndim == 2:
        m2.addmm_(d.T, d).addr_(delta, delta, alpha=n_a * n_b / n)
    else:
        m2.add_(d.square().sum(0)).addcmul_(delta, delta, value=n_a * n_b / n)
    mean.add_(delta, alpha=n_b / n)


class _SpatialMeanGaussian(_Accumulator):
    """Moments of the per-image spatially averaged features, shared by both Gaussian types."""

    outer = False
    default_extraction_settings = {"average_feats_spatially": True}

    def __init__(self, neurons: Mapping[str, int]):
        super().__init__(neurons)
        self.mean: dict[str, torch.Tensor] = {}
        self.m2: dict[str, torch.Tensor] = {}

    def _update_layer(self, layer: str, x: torch.Tensor) -> None:
        # Spatial mean in float32 (float64 features stay float64) as vdna does; 10x cheaper than a float64
        # reduction of float32 maps. The moments across images are float64.
        x = x if x.dtype in (torch.float32, torch.float64) else x.float()
        s = x.mean(dim=(2, 3)).to(torch.float64)  # [B, C]
        c = s.shape[1]
        if layer not in self.mean:
            self.mean[layer] = torch.zeros(c, dtype=torch.float64, device=x.device)
            shape = (c, c) if self.outer else (c,)
            self.m2[layer] = torch.zeros(shape, dtype=torch.float64, device=x.device)
        # `num_images` still counts the images before this batch while layers are being updated.
        _merge_moments(self.num_images, self.mean[layer], self.m2[layer], s)

    def _variance(self, layer: str) -> torch.Tensor:
        """Unbiased (n - 1) variance / covariance; zero with a single image, as in vdna."""
        if self.num_images < 2:
            warnings.warn("only one image: the Gaussian VDNA's variance is set to 0", stacklevel=3)
            return torch.zeros_like(self.m2[layer]).cpu()
        return (self.m2[layer] / (self.num_images - 1)).cpu()


class GaussianAccumulator(_SpatialMeanGaussian):
    """Per-neuron mean and unbiased variance across images of the spatially averaged activation."""

    vdna_type = "gaussian"

    def _layer_data(self, layer: str) -> dict[str, torch.Tensor]:
        return {"mu": self.mean[layer].cpu().clone(), "var": self._variance(layer)}


class LayerGaussianAccumulator(_SpatialMeanGaussian):
    """Per-layer mean [C] and unbiased covariance [C, C] (like `torch.cov`) of the spatially averaged features."""

    vdna_type = "layer-gaussian"
    outer = True

    def _layer_data(self, layer: str) -> dict[str, torch.Tensor]:
        sigma = self._variance(layer)
        return {"mu": self.mean[layer].cpu().clone(), "sigma": (sigma + sigma.T) / 2}


class ActivationRangeAccumulator(_Accumulator):
    """Per-neuron min and max over all positions of all images, reduced at once (float64 state)."""

    vdna_type = "activation-ranges"
    default_extraction_settings = {"keep_only_min_max": True}

    def __init__(self, neurons: Mapping[str, int]):
        super().__init__(neurons)
        self.min: dict[str, torch.Tensor] = {}
        self.max: dict[str, torch.Tensor] = {}

    def _update_layer(self, layer: str, x: torch.Tensor) -> None:
        lo = x.amin(dim=(0, 2, 3)).to(torch.float64)
        hi = x.amax(dim=(0, 2, 3)).to(torch.float64)
        if layer in self.min:
            lo, hi = torch.minimum(self.min[layer], lo), torch.maximum(self.max[layer], hi)
        self.min[layer], self.max[layer] = lo, hi

    def _layer_data(self, layer: str) -> dict[str, torch.Tensor]:
        return {"min": self.min[layer].cpu().clone(), "max": self.max[layer].cpu().clone()}
