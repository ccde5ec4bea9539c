"""StyleGAN2 layers: equalised-LR fully connected and conv layers, the synthesis layer, ToRGB, minibatch stddev.

Attribute names, parameter/buffer split and initialisation follow NVlabs stylegan2-ada-pytorch
(`training/networks.py`), so that an NVlabs state dict loads 1:1 into these modules.
Equalised learning rate: weights are stored as N(0, 1) / lr_multiplier and scaled at run time by
lr_multiplier / sqrt(fan_in), so every layer learns at the same speed whatever its fan-in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from models.stylegan2.ops import (
    activation_gain,
    bias_act,
    conv2d_resample,
    float32_region,
    modulated_conv2d,
    setup_filter,
)

NOISE_MODES = ("random", "const", "none")


class FullyConnectedLayer(nn.Module):
    """Linear layer with equalised learning rate and optional bias + activation (gain sqrt(2) for lrelu)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str = "linear",
        lr_multiplier: float = 1.0,
        bias_init: float = 0.0,
    ):
        super().__init__()
        activation_gain(activation)  # validates the name
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.weight = nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = None if self.bias is None else self.bias.to(x.dtype) * self.bias_gain
        if self.activation == "linear":
            return torch.nn.functional.linear(x, w, b)
        return bias_act(x.matmul(w.t()), b, act=self.activation)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}"
        )


class _ResamplingConv(nn.Module):
    """What `Conv2dLayer` and `SynthesisLayer` share: NVlabs' FIR `resample_filter` buffer, 'same' padding for
    `kernel_size`, and the closing bias + activation, whose gain and clamp scale with the caller's `gain`."""

    def __init__(
        self,
        kernel_size: int,
        activation: str,
        up: int,
        resample_filter: Sequence[float],
        conv_clamp: float | None,
    ):
        super().__init__()
        self.activation = activation
        self.up = up
        self.conv_clamp = conv_clamp
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.act_gain = activation_gain(activation)

    def _bias_act(self, x: torch.Tensor, gain: float) -> torch.Tensor:
        act_clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias, act=self.activation, gain=self.act_gain * gain, clamp=act_clamp)


class Conv2dLayer(_ResamplingConv):
    """Equalised-LR convolution with optional FIR up/down-sampling, bias, activation and clamp (used by D)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        bias: bool = True,
        activation: str = "linear",
        up: int = 1,
        down: int = 1,
        resample_filter: Sequence[float] = (1, 3, 3, 1),
        conv_clamp: float | None = None,
    ):
        super().__init__(kernel_size, activation, up, resample_filter, conv_clamp)
        self.down = down
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = nn.Parameter(torch.zeros([out_channels])) if bias else None

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        w = (self.weight * self.weight_gain).to(x.dtype)
        x = conv2d_resample(
            x,
            w,
            f=self.resample_filter,
            up=self.up,
            down=self.down,
            padding=self.padding,
            flip_weight=self.up == 1,
        )
        return self._bias_act(x, gain)


class SynthesisLayer(_ResamplingConv):
    """Style-modulated 3x3 convolution (optionally 2x up-sampling) + per-pixel noise + bias + lrelu + clamp.

    `affine` maps w to one style per input channel (bias initialised to 1, so styles start near identity).
    Noise: `noise_const` is a fixed map (buffer) used with noise_mode='const'; 'random' draws a fresh map;
    either is scaled by the learned scalar `noise_strength`; 'none' adds nothing.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        kernel_size: int = 3,
        up: int = 1,
        use_noise: bool = True,
        activation: str = "lrelu",
        resample_filter: Sequence[float] = (1, 3, 3, 1),
        conv_clamp: float | None = None,
    ):
        super().__init__(kernel_size, activation, up, resample_filter, conv_clamp)
        self.resolution = resolution
        self.use_noise = use_noise
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))

    def forward(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        noise_mode: str = "random",
        fused_modconv: bool = True,
        gain: float = 1.0,
    ) -> torch.Tensor:
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        in_resolution = self.resolution // self.up
        if x.shape[1:] != (self.weight.shape[1], in_resolution, in_resolution):
            raise ValueError(
                f"expected input [N, {self.weight.shape[1]}, {in_resolution}, {in_resolution}], got {tuple(x.shape)}"
            )
        with float32_region(w):  # styles and demodulation in float32 under autocast, as NVlabs has them
            styles = self.affine(w.float())
        if self.weight.dim() == 4 and self.weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)  # the layout the caller gave the weights

        noise = None
        if self.use_noise and noise_mode == "random":
            noise = (
                torch.randn([x.shape[0], 1, self.resolution, self.resolution], device=x.device)
                * self.noise_strength
            )
        elif self.use_noise and noise_mode == "const":
            noise = self.noise_const * self.noise_strength

        x = modulated_conv2d(
            x,
            self.weight,
            styles,
            noise=noise,
            up=self.up,
            padding=self.padding,
            resample_filter=self.resample_filter,
            flip_weight=self.up == 1,
            fused_modconv=fused_modconv,
        )
        return self._bias_act(x, gain)


class ToRGBLayer(nn.Module):
    """1x1 modulated convolution to image channels, without demodulation (style scaled by 1/sqrt(fan_in))."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        kernel_size: int = 1,
        conv_clamp: float | None = None,
    ):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)

    def forward(self, x: torch.Tensor, w: torch.Tensor, fused_modconv: bool = True) -> torch.Tensor:
        with float32_region(w):
            styles = self.affine(w.float()) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, fused_modconv=fused_modconv)
        return bias_act(x, self.bias, clamp=self.conv_clamp)


class MinibatchStdLayer(nn.Module):
    """Append the average per-group standard deviation of the features as extra channels (D's diversity cue)."""

    def __init__(self, group_size: int | None, num_channels: int = 1):
        super().__init__()
        self.group_size = group_size
        self.num_channels = num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = min(self.group_size, n) if self.group_size is not None else n
        if n % g != 0:
            raise ValueError(f"batch size {n} is not divisible by the minibatch-stddev group size {g}")
        f = self.num_channels
        # [G, n, F, c, H, W]: groups of G samples, F channel groups; a standard deviation in float32 always
        y = x.float().reshape(g, -1, f, c // f, h, w)
        y = y - y.mean(dim=0)
        y = (y.square().mean(dim=0) + 1e-8).sqrt()  # stddev over each group
        y = y.mean(dim=[2, 3, 4]).reshape(-1, f, 1, 1)  # [n, F, 1, 1]
        y = y.repeat(g, 1, h, w)  # [N, F, H, W]
        return torch.cat([x, y.to(x.dtype)], dim=1)
