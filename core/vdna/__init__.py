"""Visual DNA core: per-neuron activation distributions of image sets, their files and distances.

Domain-free: it works on activation tensors ``{layer: [B, C, H, W]}``; building features from images and
models is the caller's job. See `reference/vdna.md` for the package this mirrors.
"""

from core.vdna.accumulators import (
    ActivationRangeAccumulator,
    GaussianAccumulator,
    HistogramAccumulator,
    LayerGaussianAccumulator,
)
from core.vdna.distances import check_compatible, emd, emd_rows, fd, frechet_distance, nfd
from core.vdna.io import load_activation_ranges_json, load_vdna, save_vdna, vdna_paths
from core.vdna.vdna import VDNA, VDNA_TYPES, distribution_name

__all__ = [
    "VDNA",
    "VDNA_TYPES",
    "ActivationRangeAccumulator",
    "GaussianAccumulator",
    "HistogramAccumulator",
    "LayerGaussianAccumulator",
    "check_compatible",
    "distribution_name",
    "emd",
    "emd_rows",
    "fd",
    "frechet_distance",
    "load_activation_ranges_json",
    "load_vdna",
    "nfd",
    "save_vdna",
    "vdna_paths",
]
