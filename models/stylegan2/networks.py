"""StyleGAN2 networks: mapping, synthesis ('skip' generator), Generator, and the residual Discriminator.

A clean pure-PyTorch re-implementation of NVlabs stylegan2-ada-pytorch `training/networks.py`, with the
same module tree and tensor names (`mapping.fc0.weight`, `synthesis.b16.conv0.noise_const`, `b4.fc.bias`...),
so NVlabs weights load with `load_state_dict(strict=True)`. Images are float NCHW RGB in about [-1, 1].

Precision: float32, or bf16 wherever `torch.autocast` (bf16) is on around the call: the convolutions and the
activations between them (all resolutions, where NVlabs uses fp16 for the top `num_fp16_res` only), with the
mapping network, styles, demodulation, the running RGB image and minibatch stddev kept in float32 (see `ops`).
`conv_clamp` (honoured) keeps the activations bounded. `num_fp16_res` and `fp16_channels_last` are accepted
so that NVlabs configs round-trip, but ignored. Memory layout: after `G.to(memory_format=torch.channels_last)`
the synthesis runs its activations channels-last (cuDNN's fast layout for bf16 convolutions).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from models.stylegan2.layers import (
    Conv2dLayer,
    FullyConnectedLayer,
    MinibatchStdLayer,
    SynthesisLayer,
    ToRGBLayer,
)
from models.stylegan2.ops import float32_region, normalize_2nd_moment, setup_filter, upsample2d


def _plain(value: Any) -> Any:
    """Config values as plain, YAML-friendly Python: dicts, lists, scalars."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class _Configured(nn.Module):
    """A network that keeps its constructor arguments as plain data: `type(net)(**net.config)` rebuilds it."""

    def _keep_config(self, init_locals: dict[str, Any]) -> None:
        """Keep the calling `__init__`'s arguments, passed as its `locals()` taken before it makes any other local
        (arguments it normalised are kept as normalised)."""
        self._config = _plain({k: v for k, v in init_locals.items() if k not in ("self", "__class__")})

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments as a plain dict (a copy)."""
        return copy.deepcopy(self._config)


def channels_per_resolution(
    resolutions: Sequence[int], channel_base: int, channel_max: int
) -> dict[int, int]:
    """NVlabs channel rule: min(channel_base // res, channel_max) feature maps at resolution `res`; every
    resolution must get at least one (the highest gets the fewest)."""
    channels = {res: min(channel_base // res, channel_max) for res in resolutions}
    if channels[max(resolutions)] < 1:
        raise ValueError(f"channel_base={channel_base} leaves no channels at {max(resolutions)} px")
    return channels


def _check_resolution(img_resolution: int) -> None:
    if img_resolution < 4 or img_resolution & (img_resolution - 1):
        raise ValueError(f"img_resolution must be a power of two >= 4, got {img_resolution}")


# ----------------------------------------------------------------------------
# Mapping network.


class MappingNetwork(nn.Module):
    """z (and optional label c) -> w through `num_layers` equalised-LR FC + lrelu, broadcast to `num_ws` copies.

    Keeps `w_avg`, a running mean of w updated in training mode only (decay `w_avg_beta`), which truncation
    pulls towards: w' = w_avg + psi * (w - w_avg) on the first `truncation_cutoff` ws (all if None).
    """

    def __init__(
        self,
        z_dim: int,
        c_dim: int,
        w_dim: int,
        num_ws: int | None,
        num_layers: int = 8,
        embed_features: int | None = None,
        layer_features: int | None = None,
        activation: str = "lrelu",
        lr_multiplier: float = 0.01,
        w_avg_beta: float | None = 0.995,
    ):
        super().__init__()
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.num_ws = num_ws
        self.num_layers = num_layers
        self.w_avg_beta = w_avg_beta

        if embed_features is None:
            embed_features = w_dim
        if c_dim == 0:
            embed_features = 0
        if layer_features is None:
            layer_features = w_dim
        features = [z_dim + embed_features] + [layer_features] * (num_layers - 1) + [w_dim]

        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        for idx in range(num_layers):
            layer = FullyConnectedLayer(
                features[idx], features[idx + 1], activation=activation, lr_multiplier=lr_multiplier
            )
            setattr(self, f"fc{idx}", layer)
        if num_ws is not None and w_avg_beta is not None:
            self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(
        self,
        z: torch.Tensor | None,
        c: torch.Tensor | None = None,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
        skip_w_avg_update: bool = False,
    ) -> torch.Tensor:
        """Return ws of shape [N, num_ws, w_dim] (or [N, w_dim] when num_ws is None), in float32 always."""
        with float32_region(z if z is not None else c):
            return self._forward(z, c, truncation_psi, truncation_cutoff, skip_w_avg_update)

    def _forward(self, z, c, truncation_psi, truncation_cutoff, skip_w_avg_update) -> torch.Tensor:
        x = None
        if self.z_dim > 0:
            if z is None or z.ndim != 2 or z.shape[1] != self.z_dim:
                raise ValueError(
                    f"z must have shape [N, {self.z_dim}], got {None if z is None else tuple(z.shape)}"
                )
            x = normalize_2nd_moment(z.to(torch.float32))
        if self.c_dim > 0:
            if c is None or c.ndim != 2 or c.shape[1] != self.c_dim:
                raise ValueError(
                    f"c must have shape [N, {self.c_dim}], got {None if c is None else tuple(c.shape)}"
                )
            y = normalize_2nd_moment(self.embed(c.to(torch.float32)))
            x = torch.cat([x, y], dim=1) if x is not None else y

        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x)

        if self.w_avg_beta is not None and self.training and not skip_w_avg_update:
            with torch.no_grad():
                self.w_avg.copy_(x.detach().float().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))

        if self.num_ws is not None:
            x = x.unsqueeze(1).repeat([1, self.num_ws, 1])

        if truncation_psi != 1:
            if self.w_avg_beta is None:
                raise ValueError("truncation needs the tracked w_avg, but this mapping has w_avg_beta=None")
            if self.num_ws is None or truncation_cutoff is None:
                x = self.w_avg.lerp(x, truncation_psi)
            else:
                x = x.clone()
                x[:, :truncation_cutoff] = self.w_avg.lerp(x[:, :truncation_cutoff], truncation_psi)
        return x


# ----------------------------------------------------------------------------
# Synthesis network.


class SynthesisBlock(nn.Module):
    """One resolution of the 'skip' generator: [const | conv0 (up x2)] -> conv1 -> ToRGB added to the image.

    The running RGB image from the previous block is up-sampled with the FIR filter and the block's ToRGB
    output is added to it. Uses num_conv + num_torgb consecutive ws; ToRGB shares its w with the next conv0.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        img_channels: int,
        is_last: bool,
        resample_filter: Sequence[float] = (1, 3, 3, 1),
        conv_clamp: float | None = None,
        **layer_kwargs: Any,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.w_dim = w_dim
        self.resolution = resolution
        self.img_channels = img_channels
        self.is_last = is_last
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.num_conv = 0
        self.num_torgb = 0

        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(
                in_channels,
                out_channels,
                w_dim=w_dim,
                resolution=resolution,
                up=2,
                resample_filter=resample_filter,
                conv_clamp=conv_clamp,
                **layer_kwargs,
            )
            self.num_conv += 1
        self.conv1 = SynthesisLayer(
            out_channels,
            out_channels,
            w_dim=w_dim,
            resolution=resolution,
            conv_clamp=conv_clamp,
            **layer_kwargs,
        )
        self.num_conv += 1
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim=w_dim, conv_clamp=conv_clamp)
        self.num_torgb += 1

    def forward(
        self,
        x: torch.Tensor | None,
        img: torch.Tensor | None,
        ws: torch.Tensor,
        noise_mode: str = "random",
        fused_modconv: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if fused_modconv is None:
            # Both forms compute the same function. NVlabs picks the grouped (fused) one for inference on GPU;
            # on CPU the per-sample grouped convolution is slower (bench/bench_stylegan2.py), so it is GPU-only.
            fused_modconv = not self.training and ws.device.type == "cuda"
        w_iter = iter(ws.unbind(dim=1))
        if self.in_channels == 0:
            x = self.const.unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])
            if torch.is_autocast_enabled(x.device.type):
                x = x.to(torch.get_autocast_dtype(x.device.type))
            x = self.conv1(x, next(w_iter), noise_mode=noise_mode, fused_modconv=fused_modconv)
        else:
            x = self.conv0(x, next(w_iter), noise_mode=noise_mode, fused_modconv=fused_modconv)
            x = self.conv1(x, next(w_iter), noise_mode=noise_mode, fused_modconv=fused_modconv)

        if img is not None:
            with float32_region(img):  # the running image stays float32, as NVlabs keeps it
                img = upsample2d(img, self.resample_filter)
        y = self.torgb(x, next(w_iter), fused_modconv=fused_modconv).to(torch.float32)
        img = img + y if img is not None else y
        return x, img


class SynthesisNetwork(nn.Module):
    """ws [N, num_ws, w_dim] -> image [N, img_channels, R, R]: blocks b4, b8, ..., bR of the 'skip' design."""

    def __init__(
        self,
        w_dim: int,
        img_resolution: int,
        img_channels: int,
        channel_base: int = 32768,
        channel_max: int = 512,
        num_fp16_res: int = 0,
        architecture: str = "skip",
        resample_filter: Sequence[float] = (1, 3, 3, 1),
        conv_clamp: float | None = None,
        fp16_channels_last: bool = False,
        use_noise: bool = True,
        activation: str = "lrelu",
    ):
        """`num_fp16_res` and `fp16_channels_last` are accepted for NVlabs config compatibility and ignored."""
        _check_resolution(img_resolution)
        if architecture != "skip":
            raise ValueError(f"only the 'skip' synthesis architecture is implemented, got {architecture!r}")
        super().__init__()
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.num_fp16_res = num_fp16_res
        self.block_resolutions = [2**i for i in range(2, int(math.log2(img_resolution)) + 1)]
        channels = channels_per_resolution(self.block_resolutions, channel_base, channel_max)

        self.num_ws = 0
        for res in self.block_resolutions:
            is_last = res == img_resolution
            block = SynthesisBlock(
                channels[res // 2] if res > 4 else 0,
                channels[res],
                w_dim=w_dim,
                resolution=res,
                img_channels=img_channels,
                is_last=is_last,
                resample_filter=resample_filter,
                conv_clamp=conv_clamp,
                use_noise=use_noise,
                activation=activation,
            )
            self.num_ws += block.num_conv + (block.num_torgb if is_last else 0)
            setattr(self, f"b{res}", block)

    def forward(
        self,
        ws: torch.Tensor,
        noise_mode: str = "random",
        fused_modconv: bool | None = None,
        force_fp32: bool = True,
    ) -> torch.Tensor:
        """Render images from ws (see `Generator.forward` for the options).

        `force_fp32` exists for NVlabs call compatibility and is ignored: `torch.autocast` is the switch.
        """
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"ws must have shape [N, {self.num_ws}, {self.w_dim}], got {tuple(ws.shape)}")
        ws = ws.to(torch.float32)
        x = img = None
        w_idx = 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            block_ws = ws.narrow(1, w_idx, block.num_conv + block.num_torgb)
            w_idx += block.num_conv
            x, img = block(x, img, block_ws, noise_mode=noise_mode, fused_modconv=fused_modconv)
        return img


class Generator(_Configured):
    """StyleGAN2 generator: `G(z, c)` -> images in about [-1, 1]; `G.mapping` and `G.synthesis` are public.

    `G.config` is the plain dict of constructor arguments: `Generator(**G.config)` rebuilds the architecture.
    """

    def __init__(
        self,
        z_dim: int,
        c_dim: int,
        w_dim: int,
        img_resolution: int,
        img_channels: int,
        mapping_kwargs: dict[str, Any] | None = None,
        synthesis_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        mapping_kwargs = dict(mapping_kwargs or {})
        synthesis_kwargs = dict(synthesis_kwargs or {})
        self._keep_config(locals())
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.synthesis = SynthesisNetwork(
            w_dim=w_dim, img_resolution=img_resolution, img_channels=img_channels, **synthesis_kwargs
        )
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(
            z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=self.num_ws, **mapping_kwargs
        )

    def forward(
        self,
        z: torch.Tensor,
        c: torch.Tensor | None = None,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
        noise_mode: str = "random",
        fused_modconv: bool | None = None,
    ) -> torch.Tensor:
        """z [N, z_dim] (and c [N, c_dim] if conditional) -> images [N, img_channels, R, R].

        `noise_mode`: 'random' (fresh per call), 'const' (the stored maps; deterministic) or 'none'.
        `fused_modconv`: None picks the faster form for the device; True/False force it (same function).
        """
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, noise_mode=noise_mode, fused_modconv=fused_modconv)


# ----------------------------------------------------------------------------
# Discriminator.


class DiscriminatorBlock(nn.Module):
    """One resolution of the residual D: [fromrgb] -> conv0 -> conv1 (down x2), plus a 1x1 down-sampled skip.

    Both branches are scaled by sqrt(0.5) before they are summed, so the sum keeps unit variance.
    """

    def __init__(
        self,
        in_channels: int,
        tmp_channels: int,
        out_channels: int,
        resolution: int,
        img_channels: int,
        activation: str = "lrelu",
        resample_filter: Sequence[float] = (1, 3, 3, 1),
        conv_clamp: float | None = None,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.resolution = resolution
        self.img_channels = img_channels
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        if in_channels == 0:
            self.fromrgb = Conv2dLayer(
                img_channels, tmp_channels, 1, activation=activation, conv_clamp=conv_clamp
            )
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, 3, activation=activation, conv_clamp=conv_clamp)
        self.conv1 = Conv2dLayer(
            tmp_channels,
            out_channels,
            3,
            activation=activation,
            down=2,
            resample_filter=resample_filter,
            conv_clamp=conv_clamp,
        )
        self.skip = Conv2dLayer(
            tmp_channels, out_channels, 1, bias=False, down=2, resample_filter=resample_filter
        )

    def forward(self, x: torch.Tensor | None, img: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 0:
            x = self.fromrgb(img.to(torch.float32))
        y = self.skip(x, gain=math.sqrt(0.5))
        x = self.conv0(x)
        x = self.conv1(x, gain=math.sqrt(0.5))
        return y + x


class DiscriminatorEpilogue(nn.Module):
    """The 4x4 head: minibatch stddev -> 3x3 conv -> FC -> output (projected onto the label map if c_dim > 0)."""

    def __init__(
        self,
        in_channels: int,
        cmap_dim: int,
        resolution: int,
        mbstd_group_size: int | None = 4,
        mbstd_num_channels: int = 1,
        activation: str = "lrelu",
        conv_clamp: float | None = None,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.cmap_dim = cmap_dim
        self.resolution = resolution
        self.mbstd = (
            MinibatchStdLayer(mbstd_group_size, mbstd_num_channels) if mbstd_num_channels > 0 else None
        )
        self.conv = Conv2dLayer(
            in_channels + mbstd_num_channels, in_channels, 3, activation=activation, conv_clamp=conv_clamp
        )
        self.fc = FullyConnectedLayer(in_channels * resolution**2, in_channels, activation=activation)
        self.out = FullyConnectedLayer(in_channels, 1 if cmap_dim == 0 else cmap_dim)

    def forward(self, x: torch.Tensor, cmap: torch.Tensor | None) -> torch.Tensor:
        if self.mbstd is not None:
            x = self.mbstd(x)
        x = self.conv(x)
        x = self.fc(x.flatten(1))
        x = self.out(x)
        if self.cmap_dim > 0:
            x = (x * cmap).sum(dim=1, keepdim=True) / math.sqrt(self.cmap_dim)
        return x


class Discriminator(_Configured):
    """StyleGAN2 residual discriminator: image [N, C, R, R] in [-1, 1] (and label c) -> logits [N, 1].

    `num_fp16_res` is accepted for NVlabs config compatibility and ignored (float32 throughout).
    """

    def __init__(
        self,
        c_dim: int,
        img_resolution: int,
        img_channels: int,
        channel_base: int = 32768,
        channel_max: int = 512,
        mbstd_group_size: int | None = 4,
        mbstd_num_channels: int = 1,
        architecture: str = "resnet",
        num_fp16_res: int = 0,
        conv_clamp: float | None = None,
        cmap_dim: int | None = None,
        mapping_kwargs: dict[str, Any] | None = None,
    ):
        _check_resolution(img_resolution)
        if img_resolution < 8:
            raise ValueError(f"the discriminator needs img_resolution >= 8, got {img_resolution}")
        if architecture != "resnet":
            raise ValueError(
                f"only the 'resnet' discriminator architecture is implemented, got {architecture!r}"
            )
        super().__init__()
        mapping_kwargs = dict(mapping_kwargs or {})
        self._keep_config(locals())
        self.c_dim = c_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.block_resolutions = [2**i for i in range(int(math.log2(img_resolution)), 2, -1)]
        channels = channels_per_resolution(self.block_resolutions + [4], channel_base, channel_max)
        if cmap_dim is None:
            cmap_dim = channels[4]
        if c_dim == 0:
            cmap_dim = 0

        for res in self.block_resolutions:
            block = DiscriminatorBlock(
                channels[res] if res < img_resolution else 0,
                channels[res],
                channels[res // 2],
                resolution=res,
                img_channels=img_channels,
                conv_clamp=conv_clamp,
            )
            setattr(self, f"b{res}", block)
        if c_dim > 0:
            self.mapping = MappingNetwork(
                z_dim=0, c_dim=c_dim, w_dim=cmap_dim, num_ws=None, w_avg_beta=None, **mapping_kwargs
            )
        self.b4 = DiscriminatorEpilogue(
            channels[4],
            cmap_dim=cmap_dim,
            resolution=4,
            mbstd_group_size=mbstd_group_size,
            mbstd_num_channels=mbstd_num_channels,
            conv_clamp=conv_clamp,
        )

    def forward(self, img: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        expected = (self.img_channels, self.img_resolution, self.img_resolution)
        if img.ndim != 4 or img.shape[1:] != expected:
            raise ValueError(
                f"img must have shape [N, {', '.join(map(str, expected))}], got {tuple(img.shape)}"
            )
        x = None
        for res in self.block_resolutions:
            x = getattr(self, f"b{res}")(x, img)
        cmap = self.mapping(None, c) if self.c_dim > 0 else None
        return self.b4(x, cmap)
