"""LPIPS (Zhang et al. 2018, v0.1, VGG-16) for images in [-1, 1].

The network is torchvision's VGG-16 feature stack; the calibrated per-channel linear heads are read from
the `lpips` package's data file with `torch.load(weights_only=True)` (the package's code is not used).
Backbone weights: torchvision ImageNet (`imagenet`, cached or downloaded), a local VGG-16 state dict, or
`random` (seeded; only for tests and offline smoke runs, not a meaningful perceptual distance).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from core.errors import UserError

# VGG-16 `features` indices after which LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
TAPS = (3, 8, 15, 22, 29)
CHANNELS = (64, 128, 256, 512, 512)


def _heads_file() -> Path:
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("LPIPS needs the `lpips` package for its linear heads: pip install lpips")
    return Path(next(iter(spec.submodule_search_locations))) / "weights" / "v0.1" / "vgg.pth"


def _vgg_state(weights: str, option: str) -> dict | None:

    if weights == "random":
        return None
    if weights == "imagenet":
        from models.classifiers import imagenet_state_dict

        return imagenet_state_dict("vgg16", option=option)
    from core.checkpoint import load_foreign_state_dict

    return load_foreign_state_dict(weights)


class LPIPS(nn.Module):
    """`lpips(x, y) -> (B,)` perceptual distance; frozen, eval mode, differentiable w.r.t. the inputs."""

    def __init__(self, weights: str = "imagenet", seed: int = 0, option: str = "--lpips-weights"):
        super().__init__()
        import torchvision

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vgg = torchvision.models.vgg16(weights=None)
        state = _vgg_state(weights, option)  # `option`: the command's option that chose the weights
        if state is not None:
            from core.checkpoint import load_state_dict_checked

            load_state_dict_checked(vgg, state, f"VGG-16 weights {weights}")
        self.weights = weights
        self.features = vgg.features[: TAPS[-1] + 1]
        heads = torch.load(_heads_file(), map_location="cpu", weights_only=True)
        self.heads = nn.ParameterList(nn.Parameter(heads[f"lin{i}.model.1.weight"]) for i in range(len(TAPS)))
        self.register_buffer(
            "shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # always frozen

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, h = [], (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in TAPS:
                out.append(h)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = x.new_zeros(x.shape[0])
        for fx, fy, head in zip(self._taps(x), self._taps(y), self.heads, strict=True):
            nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + torch.nn.functional.conv2d((nx - ny) ** 2, head).mean(dim=(1, 2, 3))
        return total
