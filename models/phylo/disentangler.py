"""Stage 2 of Phylo-NN: the phylogenetic disentangler on a frozen stage-1 VQGAN's features, and the two as one model.

h [C, S, S] -> `conv_in` (1x1, C -> `channels`, SiLU; the kernel the orthogonality loss keeps orthogonal) ->
channel split into a phylo part (`phylo_channels`) and a free part -> per part LayerNorm, flatten, Linear ->
code vectors: `levels x codes_per_level` phylo codes, level-ordered (level 0, the coarsest, first), and
`free_codes` free ones, all quantised by one shared codebook -> per part Linear back to maps, concatenated,
SiLU, `conv_out` (1x1) -> h' ~ h, which the frozen VQGAN snaps onto its own codebook and decodes. Heads: the
level-l head reads the quantised codes of levels 0..l and predicts the species' group at level l (the last
level is the species); the adversary reads the free codes and predicts the species, and the disentangler is
trained to leave it uncertain (training/phylo/losses.py), so the free part carries what the tree does not.
"""

from __future__ import annotations

import torch
from torch import nn

from core.errors import UserError
from models.phylo.layout import CodeLayout, level_heads, species_adversary
from models.phylo.quantizer import VectorQuantizer
from models.phylo.vqgan import VQGAN


class _Part(nn.Module):
    """Maps of `channels` -> `n_codes` code vectors of `embed_dim`, and back (the paper's MLP in and out)."""

    def __init__(self, channels: int, size: int, n_codes: int, embed_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm([channels, size, size])
        self.to_codes = nn.Linear(channels * size * size, n_codes * embed_dim)
        self.from_codes = nn.Linear(n_codes * embed_dim, channels * size * size)
        self.shape = (channels, size, size)
        self.n_codes, self.embed_dim = n_codes, embed_dim

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        return self.to_codes(self.norm(h).flatten(1)).view(-1, self.n_codes, self.embed_dim)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.from_codes(z_q.flatten(1)).view(-1, *self.shape)


class PhyloDisentangler(CodeLayout, nn.Module):
    """`forward(h) -> dict(features, codes, codebook, commitment, vq_loss, level_logits, free)`; `encode_codes(h)`
    and `decode_codes(codes)` map features to [N, T] code indices and back."""

    def __init__(
        self,
        in_channels: int,
        size: int,
        group_counts: list[int],
        channels: int = 64,
        phylo_channels: int = 32,
        embed_dim: int = 16,
        n_embed: int = 64,
        codes_per_level: int = 8,
        free_codes: int = 8,
        adversary_hidden: int = 128,
        vq_beta: float = 0.25,
        codebook_decay: float = 0.0,
    ):
        super().__init__()
        if not 0 < phylo_channels < channels:
            raise UserError(
                f"phylo_channels must lie in 1..{channels - 1} (channels {channels}), got {phylo_channels}"
            )
        if len(group_counts) < 1:
            raise UserError("the disentangler needs at least one level (the species)")
        self._config = dict(in_channels=in_channels, size=size, group_counts=list(group_counts), channels=channels,
                            phylo_channels=phylo_channels, embed_dim=embed_dim, n_embed=n_embed,
                            codes_per_level=codes_per_level, free_codes=free_codes,
                            adversary_hidden=adversary_hidden, vq_beta=vq_beta, codebook_decay=codebook_decay)  # fmt: skip
        self.levels, self.codes_per_level, self.free_codes = len(group_counts), codes_per_level, free_codes
        self.split = (phylo_channels, channels - phylo_channels)
        self.conv_in = nn.Conv2d(in_channels, channels, 1)
        self.phylo = _Part(phylo_channels, size, self.levels * codes_per_level, embed_dim)
        self.free = _Part(channels - phylo_channels, size, free_codes, embed_dim)
        self.quantizer = VectorQuantizer(n_embed, embed_dim, vq_beta, codebook_decay)
        self.conv_out = nn.Sequential(nn.SiLU(), nn.Conv2d(channels, in_channels, 1))
        self.heads = level_heads(group_counts, codes_per_level, embed_dim)
        self.adversary = species_adversary(free_codes, embed_dim, adversary_hidden, group_counts[-1])

    @property
    def config(self) -> dict:
        return dict(self._config)

    @property
    def n_species(self) -> int:
        return self.adversary[-1].out_features

    def _vectors(self, h: torch.Tensor) -> torch.Tensor:
        phylo, free = torch.split(nn.functional.silu(self.conv_in(h)), self.split, dim=1)
        return torch.cat([self.phylo.encode(phylo), self.free.encode(free)], dim=1)

    def decode_vectors(self, z_q: torch.Tensor) -> torch.Tensor:
        """Features h' [N, C, S, S] from quantised code vectors [N, T, D]."""
        maps = torch.cat(
            [self.phylo.decode(z_q[:, : self.n_phylo]), self.free.decode(z_q[:, self.n_phylo :])], 1
        )
        return self.conv_out(maps)

    def level_logits(self, z_q: torch.Tensor) -> list[torch.Tensor]:
        """Each level's head on the codes of levels 0..l."""
        phylo = z_q[:, : self.n_phylo].flatten(1)
        width = self.codes_per_level * z_q.shape[-1]
        return [head(phylo[:, : (lv + 1) * width]) for lv, head in enumerate(self.heads)]

    def forward(self, h: torch.Tensor) -> dict:
        q = self.quantizer.quantize(self._vectors(h))
        z_q = q["z_q"]
        return {"features": self.decode_vectors(z_q), "codes": q["indices"], "z": q["z"], "codebook": q["codebook"],
                "commitment": q["commitment"], "vq_loss": q["codebook"] + self.quantizer.beta * q["commitment"],
                "level_logits": self.level_logits(z_q), "free": z_q[:, self.n_phylo :].flatten(1)}  # fmt: skip

    @torch.no_grad()
    def encode_codes(self, h: torch.Tensor) -> torch.Tensor:
        return self.quantizer.indices(self._vectors(h))

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decode_vectors(self.quantizer.lookup(codes))


class PhyloNN(CodeLayout, nn.Module):
    """A frozen stage-1 VQGAN and a disentangler as one model with the autoencoder interface that generation
    and the analysis use: `encode_codes(x)`, `decode_codes(codes)`, `level_positions`, `free_positions`,
    `quantizer`, `config["image_size"]`. `forward(x)` gives the disentangler's outputs and `target`, the frozen
    features it reconstructs."""

    def __init__(self, stage1: VQGAN, disentangler: PhyloDisentangler):
        super().__init__()
        if (disentangler.config["in_channels"], disentangler.config["size"]) != (
            stage1.z_channels,
            stage1.latent_size,
        ):
            raise UserError(
                f"the disentangler reads {disentangler.config['in_channels']} x {disentangler.config['size']}^2 "
                f"features, the stage-1 VQGAN gives {stage1.z_channels} x {stage1.latent_size}^2"
            )
        self.stage1 = stage1.eval().requires_grad_(False)
        self.disentangler = disentangler
        self.levels, self.codes_per_level = disentangler.levels, disentangler.codes_per_level
        self.free_codes, self.quantizer = disentangler.free_codes, disentangler.quantizer

    def train(self, mode: bool = True) -> PhyloNN:
        super().train(mode)
        self.stage1.eval()  # frozen: its batch statistics and dropout never change
        return self

    @property
    def config(self) -> dict:
        return {"image_size": self.stage1.config["image_size"], "stage1": self.stage1.config,
                "disentangler": self.disentangler.config}  # fmt: skip

    def forward(self, x: torch.Tensor) -> dict:
        with torch.no_grad():
            target = self.stage1.encode_features(x)
        return {**self.disentangler(target), "target": target}

    @torch.no_grad()
    def encode_codes(self, x: torch.Tensor) -> torch.Tensor:
        """[N, sequence_length] disentangler code indices of images in [-1, 1]."""
        return self.disentangler.encode_codes(self.stage1.encode_features(x))

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (unclamped) from [N, sequence_length] code indices, through the frozen VQGAN."""
        return self.stage1.decode_features(self.disentangler.decode_codes(codes))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The round trip of images through codes: what a sample's image shows for the codes of a real image."""
        return self.decode_codes(self.encode_codes(x))
