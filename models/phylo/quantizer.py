"""Vector quantisation with one shared codebook, vectorised (no per-element Python loops)."""

from __future__ import annotations

import torch
from torch import nn


def codebook_commitment(z: torch.Tensor, z_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VQ-VAE terms (van den Oord et al. 2017), each a mean over elements:
    codebook ||sg(z) - e||^2 moves the entries to the encoder outputs, commitment ||z - sg(e)||^2 the
    encoder outputs to their entries. `z_q` is the looked-up entry (not the straight-through tensor)."""
    codebook = (z_q.float() - z.detach().float()).square().mean()
    commitment = (z.float() - z_q.detach().float()).square().mean()
    return codebook, commitment


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantisation with a straight-through gradient.

    `forward(z [..., D]) -> (z_q [..., D], indices [...], loss)` with the VQ-VAE loss
    codebook + beta * commitment (`codebook_commitment`); `quantize` also returns the two terms apart.
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25):
        super().__init__()
        self.n_embed, self.embed_dim, self.beta = n_embed, embed_dim, beta
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.reshape(-1, self.embed_dim).float()
        weight = self.embedding.weight.float()
        distances = flat.square().sum(1, keepdim=True) - 2 * flat @ weight.T + weight.square().sum(1)
        return distances.argmin(1).view(z.shape[:-1])

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)

    def quantize(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """`z_q` (straight-through: the entries forward, the identity backward), `indices`, and the
        `codebook` and `commitment` terms."""
        indices = self.indices(z)
        entries = self.lookup(indices).to(z.dtype)
        codebook, commitment = codebook_commitment(z, entries)
        return {"z_q": z + (entries - z).detach(), "indices": indices, "codebook": codebook,
                "commitment": commitment}  # fmt: skip

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.quantize(z)
        return out["z_q"], out["indices"], out["codebook"] + self.beta * out["commitment"]
