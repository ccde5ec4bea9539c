"""Streaming accumulators that turn batches of layer activations into a VDNA in one pass.

Each `update` takes ``{layer: Tensor[B, C, H, W]}`` (token features as ``[B, C, N_tokens, 1]``), reduces it
at once, and keeps only per-neuron state, so memory does not depend on the number of images. The state
lives on the features' device (CPU or CUDA); `result()` returns a VDNA whose tensors are on the CPU.
"""

from __future__ import annotations

import bisect
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from core.errors import UserError
from core.vdna import native
from core.vdna.vdna import VDNA, distribution_name

# vdna's histogram normalisation: ranges are widened by this factor, then mapped onto [-1, 1].
RANGE_SCALE = 1.2
# Elements binned at a time. On the CPU a chunk costs ~25 small ops of Python dispatch, so chunks of 1M
# (4 MB float32 buffers) bin ResNet-50 features ~1.5x faster than chunks of 128k; a GPU prefers few
# large kernels.
CPU_CHUNK_ELEMENTS = 1 << 20
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


# The float32 fast path: unit roundoff, a safety factor on the error bound, and the largest tolerance worth
# using (neurons whose bound exceeds it are binned in float64; it takes |mean / std| > ~40 to get there).
FLOAT32_UNIT_ROUNDOFF = 2.0**-24
TOLERANCE_SAFETY = 1.5
MAX_TOLERANCE = 1e-2
# Values per block when looking for the few activations near a bin edge.
NEAR_EDGE_BLOCK = 64
INT32_MAX = 2**31 - 1
# Count columns beyond the N bins: one collects NaNs (torch path), eight take zeros in turn (C kernel).
SPARE_COLUMNS = 9


@dataclass
class _LayerConstants:
    """Per-neuron constants of one layer's binning on one device (see `HistogramAccumulator`).

    ``mean``, ``std``: float64 [C]; ``scale``: float32 [C, 1, 1] = N / (2 std); ``offset``: float32 [C, 1] =
    N/2 - mean * scale + tol; ``margin`` = 2 tol; ``exact``: sorted indices of the neurons binned in float64.
    """

    mean: torch.Tensor
    std: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    margin: float
    exact: torch.Tensor
    exact_list: list[int]

    @classmethod
    def build(cls, mean: torch.Tensor, std: torch.Tensor, bins: int, device: torch.device) -> _LayerConstants:
        a = (bins / 2) / std
        b = bins / 2 - mean * a
        # w = fl(fl(x * fl(a)) + fl(b + tol)) differs from the float64 value by at most
        # u * (2 |x a| + |b| + |w|) (+ float64 terms 2^29 times smaller), and |x a| <= N + |b|, |w| <= N + 1
        # wherever the float64 value is within [0, N] (elsewhere both land in the same end bin).
        bound = TOLERANCE_SAFETY * FLOAT32_UNIT_ROUNDOFF * (3 * bins + 3 * b.abs() + 2)
        loose = bound > MAX_TOLERANCE
        tol = float(bound[~loose].max()) if bool((~loose).any()) else MAX_TOLERANCE
        tol = float(np.float32(tol * 1.001))  # a float32 value >= the bound, so 2 tol is exact in float32
        offset = (b + tol).to(torch.float32)
        # Activation 0 gives w = offset exactly: neurons whose zero would fail the edge test every time.
        w0 = offset.clamp(0.5, bins - 0.5)
        zero_on_edge = torch.frac(w0) < 2 * tol
        exact = torch.nonzero(loose | zero_on_edge).flatten()
        return cls(
            mean=mean.to(device),
            std=std.to(device),
            scale=a.to(torch.float32).view(-1, 1, 1).to(device),
            offset=offset.view(-1, 1).to(device),
            margin=2 * tol,
            exact=exact.to(device),
            exact_list=exact.tolist(),
        )

    def exact_rows(self, start: int, count: int) -> torch.Tensor | None:
        """Indices, relative to `start`, of the float64-binned neurons among start .. start+count-1."""
        lo = bisect.bisect_left(self.exact_list, start)
        hi = bisect.bisect_left(self.exact_list, start + count)
        return None if lo == hi else self.exact[lo:hi] - start


def _near_edges(frac: torch.Tensor, margin: float) -> torch.Tensor | None:
    """Flat positions where ``frac < margin`` or NaN (None if there are none), without a full `nonzero`:
    the minimum of each block of `NEAR_EDGE_BLOCK` values (one cheap reduction) picks the few blocks to
    search, so the cost stays close to one read of `frac` while ~0.1% of the values are near an edge."""
    full = frac.numel() // NEAR_EDGE_BLOCK * NEAR_EDGE_BLOCK
    blocks = frac[:full].view(-1, NEAR_EDGE_BLOCK).amin(1)
    candidates = torch.nonzero(~(blocks >= margin)).flatten()  # ~(>=) also catches NaN
    offsets = torch.arange(NEAR_EDGE_BLOCK, device=frac.device)
    candidates = (candidates[:, None] * NEAR_EDGE_BLOCK + offsets).view(-1)
    if full < frac.numel():
        candidates = torch.cat([candidates, torch.arange(full, frac.numel(), device=frac.device)])
    near = candidates[~(frac[candidates] >= margin)]
    return near if near.numel() else None


def _exact_bins(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, bins: int) -> torch.Tensor:
    """vdna's bin of each activation, in float64 exactly as `HistogramAccumulator` documents; NaN -> `bins`.

    `mean` and `std` broadcast against `x`. Clamping (x'+1)*N/2 to [0, N-1] equals clamping x' to [-1, 1]
    and then applying histc's rule, because floating-point rounding is monotone.
    """
    u = (x.to(torch.float64) - mean).div_(std).add_(1.0).mul_(bins / 2)
    return u.clamp_(0, bins - 1).nan_to_num_(nan=float(bins)).floor_()


class HistogramAccumulator(_Accumulator):
    """Per-neuron histograms of every spatial position / token of every image (vdna's ``histogram-N``).

    Normalisation is vdna's, in float64: ``lo, hi = 1.2*min, 1.2*max``; ``x' = (x - (lo+hi)/2) /
    ((hi-lo)/2 + 1e-8)``; clamp to [-1, 1]. Binning is `torch.histc(x', bins=N, min=-1, max=1)`'s rule,
    which vdna uses for all but tiny tensors: ``bin = floor((x' + 1) * N / 2)`` in float64, with the
    right-most edge x' = 1 in the last bin. Each interior edge therefore belongs to the bin on its right,
    and out-of-range values land in the end bins through the clamp. NaN activations are not counted
    (histc skips them). Counts are int64.

    On the CPU, float32 features are binned by a compiled C kernel in one pass (`native.binning_kernel`,
    `binning.c` proves its bins equal the float64 rule's), split by rows among torch's threads. Elsewhere
    (CUDA, other dtypes, no C compiler) torch ops give the same bins, computed as follows.

    The torch path's bins are exactly those of that float64 rule, computed faster: float32 features are mapped to
    ``w = x * a + b`` in float32 (``a = N / (2 std)``, ``b`` the matching offset plus a tolerance `tol`
    that bounds the float32 rounding error, see `_LayerConstants.build`), so that the float64 value lies in
    ``[w - 2 tol, w]``. Where ``frac(w) >= 2 tol`` no bin edge lies in that interval and ``floor(w)`` is the
    exact bin; the few activations closer to an edge, and NaNs, are re-binned by the float64 rule. Neurons
    whose activation 0 sits on an edge (dead ReLU units: min = max = 0 puts every zero on the middle edge)
    or whose offset is too large for the bound to be useful are binned by the float64 rule throughout,
    as are features that are not float32. Each chunk of neurons is counted by one `scatter_add_` into
    its rows of the ``[C, N + SPARE_COLUMNS]`` count table (the spare columns are dropped).
    """

    vdna_type = "histogram"

    def __init__(
        self,
        neurons: Mapping[str, int],
        bins: int,
        ranges: Mapping[str, tuple[RangeValues, RangeValues]],
        chunk_elements: int | None = None,
        c_kernel: bool = True,
    ):
        """`chunk_elements`: elements per torch-path chunk (default per device); `c_kernel`: bin float32 CPU
        features with the compiled kernel when it is available (False: always the torch ops)."""
        super().__init__(neurons)
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise UserError(f"the number of histogram bins must be a positive integer, got {bins!r}")
        self.bins = bins
        self.chunk_elements = chunk_elements
        self.c_kernel = c_kernel
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
        # Updates scatter into int32 counts (~25% faster than int64), which are added to the int64 totals
        # (made at the first flush) before any bin could pass 2^31 - 1, and when a result is taken.
        self.counts: dict[str, torch.Tensor] = {}
        self._recent: dict[str, torch.Tensor] = {}
        self._recent_values: dict[str, int] = {}
        self._constants: dict[tuple[str, torch.device], _LayerConstants] = {}
        self._buffers: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _hist_nb_bins(self) -> int | None:
        return self.bins

    def _layer_constants(self, layer: str, device: torch.device) -> _LayerConstants:
        key = (layer, device)
        if key not in self._constants:
            self._constants[key] = _LayerConstants.build(self.mean[layer], self.std[layer], self.bins, device)
        return self._constants[key]

    def _scratch(self, size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Flat float32, float32 and int64 work buffers of at least `size` elements, kept between updates:
        allocating them per layer and batch costs page faults that can double the binning time."""
        bufs = self._buffers.get(device)
        if bufs is None or bufs[0].numel() < size:
            f32 = torch.float32
            bufs = tuple(torch.empty(size, dtype=t, device=device) for t in (f32, f32, torch.int64))
            self._buffers[device] = bufs
        return bufs

    def _update_layer(self, layer: str, x: torch.Tensor) -> None:
        b, c = x.shape[:2]
        per_row = x[0, 0].numel() * b
        if per_row > INT32_MAX:  # one update must fit the int32 counts: split the batch
            if b == 1:
                raise UserError(f"layer {layer!r}: {per_row} positions per neuron in one image is too many")
            for part in x.split((b + 1) // 2):
                self._update_layer(layer, part)
            return
        if layer not in self._recent:
            self._recent[layer] = torch.zeros(
                c, self.bins + SPARE_COLUMNS, dtype=torch.int32, device=x.device
            )
            self._recent_values[layer] = 0
        if self._recent_values[layer] + per_row > INT32_MAX:
            self._flush(layer)
        self._recent_values[layer] += per_row
        use_kernel = self.c_kernel and x.device.type == "cpu" and x.dtype == torch.float32
        kernel = native.binning_kernel() if use_kernel else None
        if kernel is not None:
            kernel.bin_rows(
                x.reshape(b, c, -1), self.mean[layer], self.std[layer], self.bins, self._recent[layer]
            )
        else:
            self._bin_torch(layer, x)

    def _bin_torch(self, layer: str, x: torch.Tensor) -> None:
        """Bin with torch ops (CUDA, non-float32 features, or no compiled kernel) into `_recent[layer]`."""
        b, c = x.shape[:2]
        n = self.bins
        k_ = self._layer_constants(layer, x.device)
        by_neuron = x.reshape(b, c, -1).transpose(0, 1)  # [C, B, L] view: row c holds neuron c
        length = by_neuron.shape[2]
        per_row = b * length
        budget = self.chunk_elements or (CUDA_CHUNK_ELEMENTS if x.is_cuda else CPU_CHUNK_ELEMENTS)
        step = min(c, max(1, budget // per_row))
        w_buf, frac_buf, idx_buf = self._scratch(step * per_row, x.device)
        one = torch.ones(1, dtype=torch.int32, device=x.device)
        fast = x.dtype == torch.float32
        for c0 in range(0, c, step):
            k = min(step, c - c0)
            xs = by_neuron[c0 : c0 + k]
            w, idx = w_buf[: k * per_row].view(k, per_row), idx_buf[: k * per_row].view(k, per_row)
            exact = k_.exact_rows(c0, k) if fast else torch.arange(k, device=x.device)
            if fast:
                torch.mul(xs, k_.scale[c0 : c0 + k], out=w.view(k, b, length))
                w.add_(k_.offset[c0 : c0 + k]).clamp_(0.5, n - 0.5)
            if exact is not None:  # bin + 0.5: floored below, and never near an edge
                bins = _exact_bins(
                    xs[exact], k_.mean[c0 + exact, None, None], k_.std[c0 + exact, None, None], n
                )
                w[exact] = bins.view(len(exact), per_row).add_(0.5).float()
            idx.copy_(w)  # float -> int64 truncates, i.e. floors these non-negatives
            if fast:
                near = _near_edges(torch.frac(w.view(-1), out=frac_buf[: k * per_row]), k_.margin)
                if near is not None:
                    i, j = near // per_row, near % per_row
                    values = xs[i, j // length, j % length]
                    idx.view(-1)[near] = _exact_bins(values, k_.mean[c0 + i], k_.std[c0 + i], n).long()
            self._recent[layer][c0 : c0 + k].scatter_add_(1, idx, one.expand(k, per_row))

    def _flush(self, layer: str) -> None:
        with torch.inference_mode():  # the counts are inference tensors when updates ran in that mode
            if layer in self.counts:
                self.counts[layer] += self._recent[layer]
            else:
                self.counts[layer] = self._recent[layer].to(torch.int64)
            self._recent[layer].zero_()
        self._recent_values[layer] = 0

    def _layer_data(self, layer: str) -> torch.Tensor:
        self._flush(layer)
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
