"""Slow, literal reference versions of the FIR resampling ops, for tests only.

Each step of the upfirdn definition is written out on its own (zero insertion by index assignment, padding
by copying into a zero canvas, convolution as an explicit sum over filter taps), sharing no code with
`ops.upfirdn2d`, so that a test comparing the two checks the fast code against the definition.
"""

from __future__ import annotations

import torch


def naive_upfirdn2d(
    x: torch.Tensor,
    f: torch.Tensor,
    up: int = 1,
    down: int = 1,
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    gain: float = 1.0,
) -> torch.Tensor:
    """Zero-insert by `up`, pad (x0, x1, y0, y1; negative crops), true-convolve with `f` (valid), decimate."""
    n, c, h, w = x.shape
    f2 = torch.outer(f, f) if f.ndim == 1 else f
    k = f2.shape[0]

    stuffed = x.new_zeros(n, c, h * up, w * up)
    stuffed[:, :, ::up, ::up] = x

    x0, x1, y0, y1 = padding
    big_h, big_w = h * up + y0 + y1, w * up + x0 + x1
    canvas = x.new_zeros(n, c, big_h, big_w)
    for i in range(big_h):
        si = i - y0
        if not 0 <= si < h * up:
            continue
        for j in range(big_w):
            sj = j - x0
            if 0 <= sj < w * up:
                canvas[:, :, i, j] = stuffed[:, :, si, sj]

    out_h, out_w = big_h - k + 1, big_w - k + 1
    out = x.new_zeros(n, c, out_h, out_w)
    for a in range(k):
        for b in range(k):
            # out[i, j] += f[a, b] * canvas[i + (k - 1 - a), j + (k - 1 - b)]  (convolution, not correlation)
            out += (
                f2[a, b] * gain * canvas[:, :, k - 1 - a : k - 1 - a + out_h, k - 1 - b : k - 1 - b + out_w]
            )
    return out[:, :, ::down, ::down]


def naive_upsample2d(x: torch.Tensor, f: torch.Tensor, up: int = 2) -> torch.Tensor:
    """Reference `upsample2d`: zero insertion, centred padding, convolution with `f * up**2`."""
    k = (torch.outer(f, f) if f.ndim == 1 else f).shape[0]
    p0, p1 = (k + up - 1) // 2, (k - up) // 2
    return naive_upfirdn2d(x, f, up=up, padding=(p0, p1, p0, p1), gain=up * up)


def naive_downsample2d(x: torch.Tensor, f: torch.Tensor, down: int = 2) -> torch.Tensor:
    """Reference `downsample2d`: centred padding, convolution with `f`, keep every `down`th pixel."""
    k = (torch.outer(f, f) if f.ndim == 1 else f).shape[0]
    p0, p1 = (k - down + 1) // 2, (k - down) // 2
    return naive_upfirdn2d(x, f, down=down, padding=(p0, p1, p0, p1))
