"""The VDNA object: per-neuron activation distributions of one image set, one entry per hooked layer.

Mirrors the `vdna` package's object (Ramtoula et al., CVPR 2023) so that its files load both ways:
a neuron is one channel (or token dimension) of a layer, and `data[layer]` holds, for all of the layer's
neurons at once, one of four distributions:

- ``histogram``: ``Tensor[C, N]`` int64 counts over N bins on the normalised axis [-1, 1];
- ``gaussian``: ``{"mu": [C], "var": [C]}`` of the per-image spatially averaged activation;
- ``layer-gaussian``: ``{"mu": [C], "sigma": [C, C]}`` (full covariance of the same per-image vectors);
- ``activation-ranges``: ``{"min": [C], "max": [C]}`` over every position of every image.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field
from typing import Any

import torch

from core.errors import UserError

VDNA_TYPES = ("histogram", "gaussian", "layer-gaussian", "activation-ranges")
# Keys of the per-layer dict for the non-histogram types; the second shape is [C, C] for layer-gaussian only.
DIST_KEYS = {
    "gaussian": ("mu", "var"),
    "layer-gaussian": ("mu", "sigma"),
    "activation-ranges": ("min", "max"),
}


def distribution_name(vdna_type: str, hist_nb_bins: int | None = None) -> str:
    """The `name` the vdna package gives a distribution: 'histogram-<N>' or the type itself."""
    return f"histogram-{hist_nb_bins}" if vdna_type == "histogram" else vdna_type


def _expected_shapes(vdna_type: str, c: int, bins: int | None) -> dict[str | None, tuple[int, ...]]:
    if vdna_type == "histogram":
        return {None: (c, bins)}
    first, second = DIST_KEYS[vdna_type]
    return {first: (c,), second: (c, c) if vdna_type == "layer-gaussian" else (c,)}


@dataclass
class VDNA:
    """Distributions of neuron activations of one image set under one feature extractor.

    `neurons_list` is the ordered ``{layer: number of neurons}``; `data` follows the same layers.
    `data_settings` / `extraction_settings` are free-form records of how the VDNA was made
    (the keys the vdna package knows are written where it reads them; see `core.vdna.io`).
    """

    type: str
    name: str
    data: dict[str, Any]
    num_images: int
    feature_extractor_name: str
    neurons_list: dict[str, int]
    hist_nb_bins: int | None = None
    data_settings: dict[str, Any] = field(default_factory=dict)
    extraction_settings: dict[str, Any] = field(default_factory=dict)
    time_of_compute: str | None = None

    def __post_init__(self) -> None:
        if self.type not in VDNA_TYPES:
            raise UserError(f"unknown VDNA type {self.type!r}; expected one of {', '.join(VDNA_TYPES)}")
        if self.type == "histogram" and (not isinstance(self.hist_nb_bins, int) or self.hist_nb_bins < 1):
            raise UserError(f"a histogram VDNA needs a positive integer bin count, got {self.hist_nb_bins!r}")
        if self.type != "histogram" and self.hist_nb_bins is not None:
            raise UserError(f"a {self.type} VDNA has no bin count, got hist_nb_bins={self.hist_nb_bins!r}")
        expected_name = distribution_name(self.type, self.hist_nb_bins)
        if self.name != expected_name:
            raise UserError(f"VDNA name {self.name!r} does not match its type; expected {expected_name!r}")
        if not self.neurons_list:
            raise UserError("a VDNA needs at least one layer; neurons_list is empty")
        if list(self.data) != list(self.neurons_list):
            raise UserError(
                f"VDNA data layers {list(self.data)} differ from neurons_list layers {list(self.neurons_list)}"
            )
        for layer, c in self.neurons_list.items():
            for key, shape in _expected_shapes(self.type, c, self.hist_nb_bins).items():
                value = self.data[layer] if key is None else self.data[layer].get(key)
                where = f"layer {layer!r}" + ("" if key is None else f" {key!r}")
                if not isinstance(value, torch.Tensor):
                    raise UserError(f"VDNA {where} is missing or not a tensor")
                if tuple(value.shape) != shape:
                    raise UserError(f"VDNA {where} has shape {tuple(value.shape)}, expected {shape}")

    @property
    def device(self) -> torch.device:
        """Device of the data tensors (all layers share it)."""
        first = next(iter(self.data.values()))
        return (first if isinstance(first, torch.Tensor) else next(iter(first.values()))).device

    def to(self, device: str | torch.device) -> VDNA:
        """A copy with every data tensor on `device`."""
        moved = {
            layer: v.to(device) if isinstance(v, torch.Tensor) else {k: t.to(device) for k, t in v.items()}
            for layer, v in self.data.items()
        }
        return dataclasses.replace(self, data=moved)

    def check_layer(self, layer: str) -> None:
        """Raise a UserError naming the valid layers if `layer` is not one of them."""
        if layer not in self.neurons_list:
            raise UserError(f"unknown layer {layer!r}; valid layers: {', '.join(self.neurons_list)}")

    def check_neuron(self, layer: str, neuron_idx: int) -> int:
        """Validate a neuron index of `layer` (no negative indexing) and return it as an int."""
        self.check_layer(layer)
        c = self.neurons_list[layer]
        try:
            idx = operator.index(neuron_idx)
        except TypeError:
            raise UserError(f"neuron index must be an integer, got {neuron_idx!r}") from None
        if isinstance(neuron_idx, bool) or not 0 <= idx < c:
            raise UserError(
                f"neuron index {neuron_idx!r} is out of range for layer {layer!r} (valid: 0..{c - 1})"
            )
        return idx

    def get_neuron_dist(self, layer: str, neuron_idx: int) -> torch.Tensor | dict[str, torch.Tensor]:
        """One neuron's distribution: histogram ``[1, N]``, or a dict of scalars.

        For layer-gaussian the dict is ``{"mu", "sigma"}`` where "sigma" is the variance Sigma_ii,
        as in the vdna package.
        """
        idx = self.check_neuron(layer, neuron_idx)
        entry = self.data[layer]
        if self.type == "histogram":
            return entry[idx].reshape(1, -1)
        if self.type == "layer-gaussian":
            return {"mu": entry["mu"][idx], "sigma": entry["sigma"][idx, idx]}
        return {k: v[idx] for k, v in entry.items()}

    def get_all_neurons_in_layer_dist(self, layer: str) -> torch.Tensor | dict[str, torch.Tensor]:
        """All neurons of one layer: histogram ``[C, N]`` or the layer's dict."""
        self.check_layer(layer)
        return self.data[layer]

    def get_all_neurons_dists(self) -> torch.Tensor | dict[str, Any]:
        """All neurons of all layers in `neurons_list` order.

        Histogram: ``[sum C, N]``; gaussian / activation-ranges: a dict of concatenated ``[sum C]`` vectors;
        layer-gaussian: the per-layer dict itself (covariances do not concatenate), as in the vdna package.
        """
        layers = list(self.neurons_list)
        if self.type == "histogram":
            return torch.cat([self.data[layer] for layer in layers])
        if self.type == "layer-gaussian":
            return self.data
        return {k: torch.cat([self.data[layer][k] for layer in layers]) for k in DIST_KEYS[self.type]}

    def as_ranges(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{layer: (min, max)}`` of an activation-ranges VDNA, the `ranges` a histogram accumulator takes."""
        if self.type != "activation-ranges":
            raise UserError(f"only an activation-ranges VDNA holds ranges; this one is {self.type!r}")
        return {layer: (d["min"], d["max"]) for layer, d in self.data.items()}
