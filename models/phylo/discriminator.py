"""The PatchGAN discriminator of pix2pix as taming-transformers' VQGAN uses it (stage 1 of Phylo-NN).

`n_layers` stride-2 4x4 convolutions (channels `width` x 1, 2, 4, 8 capped), a stride-1 4x4 convolution, then a
4x4 convolution to one logit per patch; LeakyReLU(0.2), batch norm after every convolution but the first and
the last. Weights N(0, 0.02), batch-norm scales N(1, 0.02) (pix2pix's init). Images in [-1, 1].
"""

from __future__ import annotations

import torch
from torch import nn


class PatchDiscriminator(nn.Module):
    """`forward(x [N, 3, H, W]) -> logits [N, 1, h, w]`, one per overlapping patch."""

    def __init__(self, in_channels: int = 3, width: int = 64, n_layers: int = 3):
        super().__init__()
        self._config = {"in_channels": in_channels, "width": width, "n_layers": n_layers}
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        channels = width
        for n in range(1, n_layers + 1):
            out = width * min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(channels, out, 4, stride, 1, bias=False),
                nn.BatchNorm2d(out),
                nn.LeakyReLU(0.2),
            ]
            channels = out
        layers.append(nn.Conv2d(channels, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    @property
    def config(self) -> dict:
        return dict(self._config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)
