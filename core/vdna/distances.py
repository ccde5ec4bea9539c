"""Distances between two VDNAs, neuron by neuron (EMD, NFD) or layer by layer (FD), as in the vdna package.

Options shared by `emd` and `nfd`: `layer` restricts to one layer, `neuron` (needs `layer`) to one neuron,
and `neuron_wise=True` returns ``{layer: Tensor[C]}`` instead of a scalar. The scalar is the unweighted
mean over the selected neurons pooled across layers, so wide layers weigh more; callers that want other
weights take the neuron-wise output. All arithmetic is float64 and vectorised over neurons.
"""

from __future__ import annotations

import torch

from core.errors import UserError
from core.vdna.vdna import VDNA

GAUSSIAN_TYPES = ("gaussian", "layer-gaussian")


def check_compatible(v1: VDNA, v2: VDNA, allowed_types: tuple[str, ...], distance: str) -> None:
    """Raise a UserError saying exactly what differs if `v1` and `v2` cannot be compared by `distance`."""
    for which, v in (("first", v1), ("second", v2)):
        if v.type not in allowed_types:
            raise UserError(
                f"{distance} needs {' or '.join(allowed_types)} VDNAs; the {which} one is {v.name!r}"
            )
    if v1.feature_extractor_name != v2.feature_extractor_name:
        raise UserError(
            f"VDNAs come from different feature extractors: {v1.feature_extractor_name!r} vs "
            f"{v2.feature_extractor_name!r}"
        )
    if v1.hist_nb_bins != v2.hist_nb_bins:
        raise UserError(f"histogram VDNAs have different bin counts: {v1.hist_nb_bins} vs {v2.hist_nb_bins}")
    if set(v1.neurons_list) != set(v2.neurons_list):
        only1 = [layer for layer in v1.neurons_list if layer not in v2.neurons_list]
        only2 = [layer for layer in v2.neurons_list if layer not in v1.neurons_list]
        raise UserError(f"VDNAs have different layers: only in the first {only1}, only in the second {only2}")
    for layer, c in v1.neurons_list.items():
        if v2.neurons_list[layer] != c:
            raise UserError(
                f"layer {layer!r} has {c} neurons in the first VDNA but {v2.neurons_list[layer]} in the second"
            )


def _selection(v: VDNA, layer: str | None, neuron: int | None, neuron_wise: bool) -> tuple[list[str], slice]:
    """Layers to use and the neuron slice within each, after validating the options."""
    if neuron is not None and layer is None:
        raise UserError("a neuron index needs a layer: pass the layer as well")
    if neuron is not None and neuron_wise:
        raise UserError("neuron-wise output cannot be combined with a single neuron index")
    if layer is None:
        return list(v.neurons_list), slice(None)
    if neuron is None:
        v.check_layer(layer)
        return [layer], slice(None)
    idx = v.check_neuron(layer, neuron)
    return [layer], slice(idx, idx + 1)


def _reduce(per_layer: dict[str, torch.Tensor], neuron_wise: bool) -> float | dict[str, torch.Tensor]:
    if neuron_wise:
        return per_layer
    return float(torch.cat(list(per_layer.values())).mean())


def emd_rows(h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
    """Closed-form 1-D EMD between matching rows of two count matrices ``[R, N]``, in bin units.

    Rows are normalised to probabilities in float64; ``EMD = sum_k |sum_{j<=k} (p_j - q_j)|``, i.e. W1 on
    the bin axis (W1 on the normalised [-1, 1] axis is this times the bin width 2/N).
    """
    p = h1.to(torch.float64)
    p = p / p.sum(dim=1, keepdim=True)
    q = h2.to(device=h1.device, dtype=torch.float64)
    q = q / q.sum(dim=1, keepdim=True)
    return torch.cumsum(p - q, dim=1).abs_().sum(dim=1)


def emd(
    v1: VDNA, v2: VDNA, layer: str | None = None, neuron: int | None = None, neuron_wise: bool = False
) -> float | dict[str, torch.Tensor]:
    """Earth mover's distance between histogram VDNAs, in bin units (so it scales with the bin count)."""
    check_compatible(v1, v2, ("histogram",), "EMD")
    layers, rows = _selection(v1, layer, neuron, neuron_wise)
    per_layer = {name: emd_rows(v1.data[name][rows], v2.data[name][rows]) for name in layers}
    return _reduce(per_layer, neuron_wise)


def _mean_var(v: VDNA, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-neuron mean and variance of a gaussian VDNA, or of a layer-gaussian one via Sigma's diagonal."""
    d = v.data[layer]
    var = d["var"] if v.type == "gaussian" else torch.diagonal(d["sigma"])
    return d["mu"].to(torch.float64), var.to(torch.float64)


def nfd(
    v1: VDNA, v2: VDNA, layer: str | None = None, neuron: int | None = None, neuron_wise: bool = False
) -> float | dict[str, torch.Tensor]:
    """Neuron-wise Frechet distance between 1-D Gaussians: ``(mu1 - mu2)^2 + (sigma1 - sigma2)^2``.

    Accepts gaussian or layer-gaussian VDNAs (mixed too, as vdna does: layer-gaussian uses its diagonal).
    The squared-difference form equals vdna's ``dmu^2 + var1 + var2 - 2 sqrt(var1 var2)`` without its
    cancellation; tiny negative variances from rounding are clipped to 0.
    """
    check_compatible(v1, v2, GAUSSIAN_TYPES, "NFD")
    layers, rows = _selection(v1, layer, neuron, neuron_wise)
    per_layer = {}
    for name in layers:
        mu1, var1 = _mean_var(v1, name)
        mu2, var2 = (t.to(mu1.device) for t in _mean_var(v2, name))
        dsigma = var1[rows].clamp_min(0).sqrt() - var2[rows].clamp_min(0).sqrt()
        per_layer[name] = (mu1[rows] - mu2[rows]).square() + dsigma.square()
    return _reduce(per_layer, neuron_wise)


def _psd_factor(sigma: torch.Tensor) -> torch.Tensor:
    """A factor F with F F^T = sigma: Cholesky when sigma is positive definite, else ``V sqrt(L)`` from
    `eigh` with negative rounding eigenvalues clipped (singular covariances). ``V sqrt(L) V^T`` would be
    sqrt(sigma); dropping the trailing V^T only rotates F^T S2 F, which keeps its eigenvalues."""
    factor, info = torch.linalg.cholesky_ex(sigma)
    if int(info) == 0:
        return factor
    evals, evecs = torch.linalg.eigh(sigma)
    return evecs * evals.clamp_min(0).sqrt()


def frechet_distance(
    mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor
) -> float:
    """``||mu1 - mu2||^2 + Tr S1 + Tr S2 - 2 Tr sqrtm(S1 S2)`` in float64, without scipy.

    With F F^T = S1, S1 S2 is similar to the symmetric PSD matrix ``F^T S2 F`` (for F = sqrt(S1) this is
    ``sqrt(S1) S2 sqrt(S1)``), so ``Tr sqrtm(S1 S2)`` is the sum of the square roots of its eigenvalues,
    clipped at 0: no complex arithmetic, and `eigvalsh` needs no eigenvectors.
    """
    mu1, mu2 = mu1.to(torch.float64), mu2.to(device=mu1.device, dtype=torch.float64)
    s1 = sigma1.to(torch.float64)
    s2 = sigma2.to(device=s1.device, dtype=torch.float64)
    if not (torch.isfinite(s1).all() and torch.isfinite(s2).all()):
        raise UserError("a covariance matrix has non-finite values; the FD is undefined")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    f = _psd_factor(s1)
    inner = f.T @ s2 @ f
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean)


def fd(v1: VDNA, v2: VDNA, layer: str | None = None, layer_wise: bool = False) -> float | dict[str, float]:
    """Frechet distance between layer-gaussian VDNAs: one layer's FD, or the mean of the per-layer FDs.

    The no-layer mean is vdna's convention and not a standard quantity; in particular it is not FID
    (FID is the FD of one layer, Inception's 2048-d pool features). `layer_wise` returns ``{layer: FD}``.
    """
    check_compatible(v1, v2, ("layer-gaussian",), "FD")
    layers, _ = _selection(v1, layer, None, False)
    per_layer = {
        name: frechet_distance(
            v1.data[name]["mu"], v1.data[name]["sigma"], v2.data[name]["mu"], v2.data[name]["sigma"]
        )
        for name in layers
    }
    if layer_wise:
        return per_layer
    return sum(per_layer.values()) / len(per_layer)
