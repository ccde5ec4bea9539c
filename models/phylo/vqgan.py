"""Stage 1 of Phylo-NN: a VQGAN autoencoder (Esser et al. 2021, taming-transformers' layout at small sizes).

x -> encoder (residual blocks with group norm, halving per level, attention at the bottom) -> features
h [z_channels, S, S] -> 1x1 `quant_conv` -> one codebook (n_embed x embed_dim) -> 1x1 `post_quant_conv` ->
decoder (mirror, nearest-neighbour doubling) -> image. Trained alone with L1 + LPIPS + a patch discriminator
(training/phylo/losses.py); with `codebook_decay` its entries follow moving averages instead of gradients
(models.phylo.quantizer). Then frozen: stage 2 reads `encode_features(x)` and hands its own reconstruction
of those features back through `decode_features`, which snaps them onto this codebook before decoding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from models.phylo.quantizer import VectorQuantizer


def _norm(channels: int) -> nn.GroupNorm:
    """Group norm with groups of at least 8 channels (at most 32 groups): taming's 32 groups of its 128-512
    channels would leave a narrow network one channel per group, an instance norm that erases every map's mean,
    the colour of a region (measured: a 16-channel VQGAN reconstructed grey backgrounds after 300 steps)."""
    groups = max(1, min(32, channels // 8))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """norm, SiLU, 3x3 conv, twice, plus the input (1x1-projected when the width changes)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(_norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, 1, 1), _norm(cout), nn.SiLU(),
                                  nn.Conv2d(cout, cout, 3, 1, 1))  # fmt: skip
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class Attention(nn.Module):
    """Single-head self-attention over the positions of a feature map, added to it."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=2)
        y = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.out(y.transpose(1, 2).reshape(n, c, h, w))


def _levels(image_size: int, latent_size: int) -> int:
    ratio = image_size // latent_size
    if latent_size > image_size or image_size % latent_size or ratio & (ratio - 1):
        raise UserError(
            f"--latent-size {latent_size} must divide --image-size {image_size} by a power of two"
        )
    return int(math.log2(ratio))


class Encoder(nn.Module):
    def __init__(self, widths: list[int], res_blocks: int, attention: bool, z_channels: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, 1, 1)]
        for i, width in enumerate(widths):
            cin = widths[max(i - 1, 0)]
            for b in range(res_blocks):
                layers.append(ResBlock(cin if b == 0 else width, width))
            if i < len(widths) - 1:
                layers.append(nn.Conv2d(width, width, 4, 2, 1))
        top = widths[-1]
        layers += [ResBlock(top, top), Attention(top) if attention else nn.Identity(), ResBlock(top, top)]
        layers += [_norm(top), nn.SiLU(), nn.Conv2d(top, z_channels, 3, 1, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Decoder(nn.Module):
    def __init__(self, widths: list[int], res_blocks: int, attention: bool, z_channels: int):
        super().__init__()
        top = widths[-1]
        layers: list[nn.Module] = [nn.Conv2d(z_channels, top, 3, 1, 1), ResBlock(top, top)]
        layers += [Attention(top) if attention else nn.Identity(), ResBlock(top, top)]
        widths = widths[::-1]
        for i, width in enumerate(widths):
            cin = widths[max(i - 1, 0)]
            for b in range(res_blocks + 1):
                layers.append(ResBlock(cin if b == 0 else width, width))
            if i < len(widths) - 1:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, width, 3, 1, 1)]
        layers += [_norm(widths[-1]), nn.SiLU()]
        self.layers = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(widths[-1], 3, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.layers(z))


class VQGAN(nn.Module):
    """`forward(x) -> dict(recon, features, indices, codebook, commitment, vq_loss)`; `encode_codes`,
    `decode_codes` over [N, S*S] code indices (row-major positions); `last_layer` for the adaptive weight."""

    def __init__(
        self,
        image_size: int = 32,
        latent_size: int = 8,
        channels: int = 32,
        channel_mult: list[int] | None = None,
        res_blocks: int = 1,
        attention: bool = True,
        z_channels: int = 64,
        embed_dim: int = 32,
        n_embed: int = 256,
        vq_beta: float = 0.25,
        codebook_decay: float = 0.0,
    ):
        super().__init__()
        levels = _levels(image_size, latent_size)
        channel_mult = list(channel_mult or [min(2**i, 4) for i in range(levels + 1)])
        if len(channel_mult) != levels + 1:
            raise UserError(f"channel_mult needs {levels + 1} entries for {image_size} -> {latent_size} px, "
                            f"got {channel_mult}")  # fmt: skip
        self._config = dict(image_size=image_size, latent_size=latent_size, channels=channels,
                            channel_mult=channel_mult, res_blocks=res_blocks, attention=attention,
                            z_channels=z_channels, embed_dim=embed_dim, n_embed=n_embed, vq_beta=vq_beta,
                            codebook_decay=codebook_decay)  # fmt: skip
        widths = [channels * m for m in channel_mult]
        self.latent_size, self.z_channels = latent_size, z_channels
        self.encoder = Encoder(widths, res_blocks, attention, z_channels)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.quantizer = VectorQuantizer(n_embed, embed_dim, vq_beta, codebook_decay)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.decoder = Decoder(widths, res_blocks, attention, z_channels)

    @property
    def config(self) -> dict:
        return dict(self._config)

    @property
    def sequence_length(self) -> int:
        return self.latent_size**2

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output convolution weight, where the adaptive weight compares gradient norms."""
        return self.decoder.conv_out.weight

    def encode_features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder output h [N, z_channels, S, S] for images in [-1, 1] (what stage 2 disentangles)."""
        return self.encoder(x)

    def quantize_features(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """`quant_conv`, then the codebook: z_q [N, S, S, D] (straight-through), indices [N, S, S] and the
        codebook and commitment terms."""
        return self.quantizer.quantize(self.quant_conv(h).permute(0, 2, 3, 1))

    def decode_quantized(self, z_q: torch.Tensor) -> torch.Tensor:
        """Images (unclamped) from quantised vectors [N, S, S, D]."""
        return self.decoder(self.post_quant_conv(z_q.permute(0, 3, 1, 2)))

    def decode_features(self, h: torch.Tensor) -> torch.Tensor:
        """Images from (possibly reconstructed) features: quantised onto this codebook, then decoded."""
        return self.decode_quantized(self.quantize_features(h)["z_q"])

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.encode_features(x)
        q = self.quantize_features(h)
        vq = q["codebook"] + self.quantizer.beta * q["commitment"]
        return {"recon": self.decode_quantized(q["z_q"]), "features": h, "indices": q["indices"], "z": q["z"],
                "codebook": q["codebook"], "commitment": q["commitment"], "vq_loss": vq}  # fmt: skip

    @torch.no_grad()
    def encode_codes(self, x: torch.Tensor) -> torch.Tensor:
        """[N, S*S] codebook indices of images in [-1, 1]."""
        return self.quantize_features(self.encode_features(x))["indices"].flatten(1)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (unclamped) from [N, S*S] codebook indices."""
        s = self.latent_size
        return self.decode_quantized(self.quantizer.lookup(codes.view(-1, s, s)))
