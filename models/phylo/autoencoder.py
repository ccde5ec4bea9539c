"""The Phylo-NN autoencoder: a conv encoder whose latent splits into per-level phylogenetic codes and a free part.

x -> conv encoder -> feature map [C, S, S] -> two 1x1 projections (phylo, free) -> LayerNorm, flatten, Linear
-> code vectors: `levels x codes_per_level` phylo codes (level 0 = coarsest) and `free_codes` free ones, all
quantised by one shared codebook. The decoder maps both parts back to feature maps (Linear), concatenates them
and upsamples to the image. Heads: the level-l head reads the quantised codes of levels 0..l and predicts the
species' group at level l (the last level is the species); the adversary reads the free codes and predicts the
species, while the encoder is trained to leave it uncertain. With `plain=True` the same network has no heads:
the plain VQ autoencoder of equal size the analysis compares against.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from core.errors import UserError
from models.blocks import down_path, up_path
from models.phylo.layout import CodeLayout, level_heads, species_adversary
from models.phylo.quantizer import VectorQuantizer


def _down_widths(image_size: int, latent_size: int, channels: int, max_channels: int) -> list[int]:
    if (
        latent_size > image_size
        or image_size % latent_size
        or (image_size // latent_size) & (image_size // latent_size - 1)
    ):
        raise UserError(
            f"--latent-size {latent_size} must divide --image-size {image_size} by a power of two"
        )
    steps = int(math.log2(image_size // latent_size))
    return [min(channels * 2**i, max_channels) for i in range(steps + 1)]


class _Branch(nn.Module):
    """Feature map -> `n_codes` code vectors of `embed_dim` (the paper's LayerNorm + flatten + Linear)."""

    def __init__(self, in_channels: int, channels: int, size: int, n_codes: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, channels, 1)
        self.norm = nn.LayerNorm([channels, size, size])
        self.to_codes = nn.Linear(channels * size * size, n_codes * embed_dim)
        self.from_codes = nn.Linear(n_codes * embed_dim, channels * size * size)
        self.n_codes, self.embed_dim, self.channels, self.size = n_codes, embed_dim, channels, size

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        return self.to_codes(self.norm(self.proj(h)).flatten(1)).view(-1, self.n_codes, self.embed_dim)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.from_codes(z_q.flatten(1)).view(-1, self.channels, self.size, self.size)


class PhyloAutoencoder(CodeLayout, nn.Module):
    """`forward(x) -> dict(recon, codes, vq_loss, level_logits, free)`; `encode_codes(x)`, `decode_codes(codes)`."""

    def __init__(
        self,
        image_size: int = 32,
        latent_size: int = 8,
        channels: int = 32,
        max_channels: int = 128,
        depth: int = 1,
        branch_channels: int = 32,
        embed_dim: int = 16,
        n_embed: int = 64,
        levels: int = 4,
        codes_per_level: int = 8,
        free_codes: int = 16,
        group_counts: list[int] | None = None,
        adversary_hidden: int = 128,
        plain: bool = False,
        vq_beta: float = 0.25,
    ):
        super().__init__()
        widths = _down_widths(image_size, latent_size, channels, max_channels)
        group_counts = list(group_counts or [])
        if not plain and len(group_counts) != levels:
            raise UserError(f"the tree gives {len(group_counts)} levels but the model has {levels}")
        self._config = dict(image_size=image_size, latent_size=latent_size, channels=channels,
                            max_channels=max_channels, depth=depth, branch_channels=branch_channels, embed_dim=embed_dim,
                            n_embed=n_embed, levels=levels, codes_per_level=codes_per_level, free_codes=free_codes,
                            group_counts=group_counts, adversary_hidden=adversary_hidden, plain=plain,
                            vq_beta=vq_beta)  # fmt: skip
        self.levels, self.codes_per_level, self.free_codes, self.plain = (
            levels,
            codes_per_level,
            free_codes,
            plain,
        )
        self.encoder = down_path(widths, depth)
        top = widths[-1]
        self.phylo = _Branch(top, branch_channels, latent_size, levels * codes_per_level, embed_dim)
        self.free = _Branch(top, branch_channels, latent_size, free_codes, embed_dim)
        self.quantizer = VectorQuantizer(n_embed, embed_dim, vq_beta)
        self.decoder = nn.Sequential(
            nn.Conv2d(2 * branch_channels, top, 3, 1, 1), nn.SiLU(), up_path(widths, depth)
        )
        if not plain:
            self.heads = level_heads(group_counts, codes_per_level, embed_dim)
            self.adversary = species_adversary(free_codes, embed_dim, adversary_hidden, group_counts[-1])

    @property
    def config(self) -> dict:
        return dict(self._config)

    def _quantised(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        z = torch.cat([self.phylo.encode(h), self.free.encode(h)], dim=1)
        return self.quantizer(z)

    def decode_quantised(self, z_q: torch.Tensor) -> torch.Tensor:
        maps = torch.cat(
            [self.phylo.decode(z_q[:, : self.n_phylo]), self.free.decode(z_q[:, self.n_phylo :])], 1
        )
        return self.decoder(maps)

    def forward(self, x: torch.Tensor) -> dict:
        z_q, codes, vq_loss = self._quantised(x)
        out = {"recon": self.decode_quantised(z_q), "codes": codes, "vq_loss": vq_loss}
        if not self.plain:
            phylo = z_q[:, : self.n_phylo].flatten(1)
            width = self.codes_per_level * z_q.shape[-1]
            out["level_logits"] = [head(phylo[:, : (lv + 1) * width]) for lv, head in enumerate(self.heads)]
            out["free"] = z_q[:, self.n_phylo :].flatten(1)
        return out

    @torch.no_grad()
    def encode_codes(self, x: torch.Tensor) -> torch.Tensor:
        """[N, sequence_length] codebook indices of images in [-1, 1]."""
        return self._quantised(x)[1]

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (unclamped) from [N, sequence_length] codebook indices."""
        return self.decode_quantised(self.quantizer.lookup(codes))
