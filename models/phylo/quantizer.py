"""Vector quantisation with one shared codebook, vectorised (no per-element Python loops)."""

from __future__ import annotations

import torch
from torch import nn


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantisation with a straight-through gradient.

    `forward(z [..., D]) -> (z_q [..., D], indices [...], loss)` with the VQ-VAE loss
    ||sg(z) - e||^2 + beta ||z - sg(e)||^2 (codebook term, commitment term), averaged over elements.
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

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        indices = self.indices(z)
        z_q = self.lookup(indices).to(z.dtype)
        loss = (z_q - z.detach()).float().square().mean() + self.beta * (
            z - z_q.detach()
        ).float().square().mean()
        return z + (z_q - z).detach(), indices, loss
