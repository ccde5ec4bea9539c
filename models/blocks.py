"""Conv paths shared by the generative models: halving and doubling the resolution with SiLU activations.

Doubling uses stride-2 4x4 transposed convolutions: 3-5x faster on CPU than nearest upsampling + 3x3 conv
(measured at 32 px, batch 64, on two cores)."""

from __future__ import annotations

from torch import nn


def down_path(widths: list[int], depth: int, in_channels: int = 3) -> nn.Sequential:
    """3x3 stem to widths[0], then per halving a stride-2 4x4 conv and `depth - 1` 3x3 convs."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, 1, 1), nn.SiLU()]
    for cin, cout in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Conv2d(cin, cout, 4, 2, 1), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Conv2d(cout, cout, 3, 1, 1), nn.SiLU()]
    return nn.Sequential(*layers)


def up_path(widths: list[int], depth: int, out_channels: int = 3) -> nn.Sequential:
    """Mirror of `down_path` for `widths` given from the finest resolution: per doubling a stride-2 4x4
    transposed conv and `depth - 1` 3x3 convs, then a 3x3 conv to `out_channels` (no activation)."""
    widths = widths[::-1]
    layers: list[nn.Module] = []
    for cin, cout in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.ConvTranspose2d(cin, cout, 4, 2, 1), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Conv2d(cout, cout, 3, 1, 1), nn.SiLU()]
    layers.append(nn.Conv2d(widths[-1], out_channels, 3, 1, 1))
    return nn.Sequential(*layers)
