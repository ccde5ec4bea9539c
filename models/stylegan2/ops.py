"""StyleGAN2 low-level operations in plain PyTorch: FIR resampling, bias + activation, modulated convolution.

They reproduce the semantics of the NVlabs stylegan2-ada-pytorch ops (`upfirdn2d`, `bias_act`,
`conv2d_resample`, `modulated_conv2d`) so that weights trained with the NVlabs code give the same images here,
without compiled CUDA extensions: every op is padding plus `torch.nn.functional` convolutions.

Precision follows the caller: float32, or bf16 under `torch.autocast` for the convolutions and what runs
between them, with the numerically delicate parts kept in float32 by `float32_region` (styles, demodulation
coefficients, the running RGB image, the mapping network, minibatch stddev), as NVlabs keeps them in float32
around its fp16 layers. NVlabs' fp16 tricks (pre-normalising weights against fp16 overflow) are left out:
bf16 has float32's range, and demodulation cancels the scale they remove.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Padding = int | Sequence[int]


def float32_region(like: torch.Tensor | None):
    """A region run in float32 even inside `torch.autocast` on `like`'s device (a no-op context otherwise)."""
    if like is not None and torch.is_autocast_enabled(like.device.type):
        return torch.autocast(like.device.type, enabled=False)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------
# FIR filters and upfirdn2d.


def setup_filter(f: Sequence[float] | torch.Tensor = (1, 3, 3, 1), normalize: bool = True) -> torch.Tensor:
    """Build the FIR filter buffer NVlabs stores as `resample_filter`.

    A 1-D list of fewer than 8 taps becomes its 2-D outer product (shape [k, k], as NVlabs stores it, so the
    buffer loads 1:1); longer 1-D filters stay separable ([k]). Normalised to unit DC gain by default.
    """
    f = torch.as_tensor(f, dtype=torch.float32)
    if f.ndim == 0:
        f = f[None]
    if f.ndim == 1 and f.numel() < 8:
        f = torch.outer(f, f)
    if normalize:
        f = f / f.sum()
    return f


def _parse_padding(padding: Padding) -> tuple[int, int, int, int]:
    """Padding as (x_before, x_after, y_before, y_after) from an int, (x, y) or the 4-tuple itself."""
    if isinstance(padding, int):
        return padding, padding, padding, padding
    padding = [int(p) for p in padding]
    if len(padding) == 2:
        return padding[0], padding[0], padding[1], padding[1]
    if len(padding) == 4:
        return padding[0], padding[1], padding[2], padding[3]
    raise ValueError(f"padding must be an int, (x, y) or (x0, x1, y0, y1); got {padding}")


def _filter_2d(f: torch.Tensor | None) -> torch.Tensor | None:
    """A separable 1-D filter as the equivalent 2-D kernel (outer product); 2-D filters unchanged."""
    if f is not None and f.ndim == 1:
        return torch.outer(f, f)
    return f


def _filter_size(f: torch.Tensor | None) -> int:
    """Width of a (square) filter; 1 for the identity (None)."""
    return 1 if f is None else int(f.shape[-1])


def upfirdn2d(
    x: torch.Tensor,
    f: torch.Tensor | None,
    up: int = 1,
    down: int = 1,
    padding: Padding = 0,
    flip_filter: bool = False,
    gain: float = 1.0,
) -> torch.Tensor:
    """Upsample by zero insertion, pad (negative = crop), convolve with the FIR filter `f`, keep every `down`th.

    Same definition as NVlabs `upfirdn2d` and `scipy.signal.upfirdn`: `padding` is in upsampled pixels,
    the filter is applied as a true convolution (`flip_filter=True` for correlation) over the "valid" region,
    and `gain` scales the result. Implemented as reshape-pad for the zeros and one depthwise `conv2d`.
    """
    if x.ndim != 4:
        raise ValueError(f"upfirdn2d expects NCHW input, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    px0, px1, py0, py1 = _parse_padding(padding)

    if up > 1:
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(n, c, h * up, w * up)

    f = _filter_2d(f)
    conv_padding = (0, 0)
    if f is not None and px0 == px1 >= 0 and py0 == py1 >= 0:
        conv_padding = (py0, px0)  # symmetric: let the convolution pad, saving a copy of x
    else:
        x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
        x = x[:, :, max(-py0, 0) : x.shape[2] - max(-py1, 0), max(-px0, 0) : x.shape[3] - max(-px1, 0)]

    if f is None:
        x = x * gain if gain != 1 else x
        return x[:, :, ::down, ::down]
    f = (f * gain).to(dtype=x.dtype, device=x.device)
    if not flip_filter:
        f = f.flip([0, 1])
    weight = f[None, None].repeat(c, 1, 1, 1)
    return F.conv2d(x, weight, stride=down, padding=conv_padding, groups=c)


def upsample2d(
    x: torch.Tensor, f: torch.Tensor, up: int = 2, padding: Padding = 0, gain: float = 1.0
) -> torch.Tensor:
    """Upsample by `up` with the FIR filter, padded so that the output is exactly `up` times the input."""
    fw = _filter_size(f)
    px0, px1, py0, py1 = _parse_padding(padding)
    p = [px0 + (fw + up - 1) // 2, px1 + (fw - up) // 2, py0 + (fw + up - 1) // 2, py1 + (fw - up) // 2]
    return upfirdn2d(x, f, up=up, padding=p, gain=gain * up * up)


def downsample2d(
    x: torch.Tensor, f: torch.Tensor, down: int = 2, padding: Padding = 0, gain: float = 1.0
) -> torch.Tensor:
    """Low-pass with the FIR filter and keep every `down`th pixel; the output is the input size / `down`."""
    fw = _filter_size(f)
    px0, px1, py0, py1 = _parse_padding(padding)
    p = [
        px0 + (fw - down + 1) // 2,
        px1 + (fw - down) // 2,
        py0 + (fw - down + 1) // 2,
        py1 + (fw - down) // 2,
    ]
    return upfirdn2d(x, f, down=down, padding=p, gain=gain)


# ----------------------------------------------------------------------------
# Bias + activation.

_SQRT2 = math.sqrt(2.0)

# name -> (function, default gain). The gain keeps the signal's second moment roughly constant.
ACTIVATIONS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], float]] = {
    "linear": (lambda x: x, 1.0),
    "relu": (F.relu, _SQRT2),
    "lrelu": (lambda x: F.leaky_relu(x, 0.2), _SQRT2),
}


_ACTIVATIONS_INPLACE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "linear": lambda x: x,
    "relu": torch.relu_,
    "lrelu": lambda x: F.leaky_relu_(x, 0.2),
}


def activation_gain(act: str) -> float:
    """The default gain NVlabs multiplies after activation `act` (sqrt(2) for relu/lrelu, 1 for linear)."""
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[act][1]


def bias_act(
    x: torch.Tensor,
    b: torch.Tensor | None = None,
    act: str = "linear",
    gain: float | None = None,
    clamp: float | None = None,
) -> torch.Tensor:
    """Add a per-channel bias (dim 1), apply `act`, multiply by `gain` (default: the activation's), clamp to ±clamp."""
    gain = activation_gain(act) if gain is None else gain
    clamp = clamp if clamp is not None and clamp >= 0 else None
    if b is not None:
        x = x + b.to(x.dtype).reshape([1, -1] + [1] * (x.ndim - 2))
        if not (torch.is_grad_enabled() and x.requires_grad):
            # x is our own fresh tensor and no graph is recorded: finish in place (less memory traffic).
            _ACTIVATIONS_INPLACE[act](x)
            if gain != 1:
                x.mul_(gain)
            return x.clamp_(-clamp, clamp) if clamp is not None else x
    x = ACTIVATIONS[act][0](x)
    if gain != 1:
        x = x * gain
    return x.clamp(-clamp, clamp) if clamp is not None else x


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """Scale each sample to unit mean square along `dim` (StyleGAN's pixel norm for latents)."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


# ----------------------------------------------------------------------------
# Convolution with up/down-sampling.


def _conv(
    x: torch.Tensor,
    w: torch.Tensor,
    stride: int = 1,
    padding: int | tuple[int, int] = 0,
    groups: int = 1,
    transpose: bool = False,
    flip_weight: bool = True,
) -> torch.Tensor:
    """conv2d (correlation) or conv_transpose2d; `flip_weight=False` flips the kernel to get a true convolution."""
    if not flip_weight and (w.shape[2] > 1 or w.shape[3] > 1):
        w = w.flip([2, 3])
    if transpose:
        return F.conv_transpose2d(x, w, stride=stride, padding=padding, groups=groups)
    return F.conv2d(x, w, stride=stride, padding=padding, groups=groups)


def conv2d_resample(
    x: torch.Tensor,
    w: torch.Tensor,
    f: torch.Tensor | None = None,
    up: int = 1,
    down: int = 1,
    padding: Padding = 0,
    groups: int = 1,
    flip_weight: bool = True,
    fast: bool = True,
) -> torch.Tensor:
    """2-D convolution with optional FIR up/down-sampling; padding is given w.r.t. the upsampled image.

    `fast=False` is the plain definition: upfirdn2d(up, pad) -> conv2d -> upfirdn2d(down).
    `fast=True` (default) uses the equivalent cheaper forms NVlabs uses: a strided transposed convolution
    followed by the FIR filter for up-sampling (4x fewer multiply-adds than convolving a zero-stuffed image),
    a strided convolution after the FIR filter for down-sampling, and resampling on the cheaper side of 1x1
    convolutions. Both paths agree to float rounding (tests check it).
    """
    if up < 1 or down < 1:
        raise ValueError(f"up and down must be >= 1, got up={up}, down={down}")
    out_channels, in_per_group, kh, kw = w.shape
    fw = _filter_size(f)
    px0, px1, py0, py1 = _parse_padding(padding)
    if up > 1:
        px0, px1 = px0 + (fw + up - 1) // 2, px1 + (fw - up) // 2
        py0, py1 = py0 + (fw + up - 1) // 2, py1 + (fw - up) // 2
    if down > 1:
        px0, px1 = px0 + (fw - down + 1) // 2, px1 + (fw - down) // 2
        py0, py1 = py0 + (fw - down + 1) // 2, py1 + (fw - down) // 2

    if fast:
        if kw == 1 and kh == 1 and down > 1 and up == 1:
            x = upfirdn2d(x, f, down=down, padding=[px0, px1, py0, py1])
            return _conv(x, w, groups=groups, flip_weight=flip_weight)
        if kw == 1 and kh == 1 and up > 1 and down == 1:
            x = _conv(x, w, groups=groups, flip_weight=flip_weight)
            return upfirdn2d(x, f, up=up, padding=[px0, px1, py0, py1], gain=up**2)
        if down > 1 and up == 1:
            x = upfirdn2d(x, f, padding=[px0, px1, py0, py1])
            return _conv(x, w, stride=down, groups=groups, flip_weight=flip_weight)
        if up > 1:
            # conv_transpose2d wants [in, out/groups, kh, kw]: regroup the weight per group.
            if groups == 1:
                w = w.transpose(0, 1)
            else:
                w = w.reshape(groups, out_channels // groups, in_per_group, kh, kw).transpose(1, 2)
                w = w.reshape(groups * in_per_group, out_channels // groups, kh, kw)
            px0, px1, py0, py1 = px0 - (kw - 1), px1 - (kw - up), py0 - (kh - 1), py1 - (kh - up)
            pxt, pyt = max(min(-px0, -px1), 0), max(min(-py0, -py1), 0)
            x = _conv(
                x,
                w,
                stride=up,
                padding=(pyt, pxt),
                groups=groups,
                transpose=True,
                flip_weight=not flip_weight,
            )
            x = upfirdn2d(x, f, padding=[px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt], gain=up**2)
            return upfirdn2d(x, f, down=down) if down > 1 else x
        if px0 == px1 and py0 == py1 and px0 >= 0 and py0 >= 0:
            return _conv(x, w, padding=(py0, px0), groups=groups, flip_weight=flip_weight)

    x = upfirdn2d(x, f if up > 1 else None, up=up, padding=[px0, px1, py0, py1], gain=up**2)
    x = _conv(x, w, groups=groups, flip_weight=flip_weight)
    return upfirdn2d(x, f, down=down) if down > 1 else x


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    noise: torch.Tensor | None = None,
    up: int = 1,
    down: int = 1,
    padding: int = 0,
    resample_filter: torch.Tensor | None = None,
    demodulate: bool = True,
    flip_weight: bool = True,
    fused_modconv: bool = True,
    fast: bool = True,
) -> torch.Tensor:
    """StyleGAN2 modulated convolution: scale input channels by per-sample `styles`, convolve, demodulate.

    Demodulation divides each output channel by the norm of its per-sample modulated kernel, so features keep
    unit variance whatever the style magnitude. `fused_modconv=True` builds one kernel per sample and runs a
    grouped convolution; `False` scales the activations before and after a shared convolution instead.
    Both compute the same function. `noise` (broadcastable to the output) is added after demodulation.
    """
    batch_size = x.shape[0]
    out_channels, in_channels, kh, kw = weight.shape
    if styles.shape != (batch_size, in_channels):
        raise ValueError(f"styles must have shape {(batch_size, in_channels)}, got {tuple(styles.shape)}")

    w = None
    dcoefs = None
    if demodulate or fused_modconv:
        w = weight.unsqueeze(0) * styles.reshape(batch_size, 1, -1, 1, 1)  # [N, O, I, kh, kw]
    if demodulate:
        dcoefs = (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()  # [N, O]

    # Both forms run one conv2d_resample: the unfused one on the style-scaled activations with the shared
    # weight, the fused one as a grouped convolution of the batch as channels with one kernel per sample.
    if fused_modconv:
        if demodulate:
            w = w * dcoefs.reshape(batch_size, -1, 1, 1, 1)
        x = x.reshape(1, -1, *x.shape[2:])
        w = w.reshape(-1, in_channels, kh, kw)
    else:
        x = x * styles.to(x.dtype).reshape(batch_size, -1, 1, 1)
        w = weight
    x = conv2d_resample(
        x,
        w.to(x.dtype),
        f=resample_filter,
        up=up,
        down=down,
        padding=padding,
        groups=batch_size if fused_modconv else 1,
        flip_weight=flip_weight,
        fast=fast,
    )
    if fused_modconv:
        x = x.reshape(batch_size, -1, *x.shape[2:])
    elif demodulate and noise is not None:
        return torch.addcmul(noise.to(x.dtype), x, dcoefs.to(x.dtype).reshape(batch_size, -1, 1, 1))
    elif demodulate:
        x = x * dcoefs.to(x.dtype).reshape(batch_size, -1, 1, 1)
    if noise is not None:
        x = x + noise.to(x.dtype)
    return x
