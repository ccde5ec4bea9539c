"""Vector quantisation with one shared codebook, vectorised (no per-element Python loops)."""

from __future__ import annotations

import torch
from torch import nn

from core.distributed import all_reduce_sum


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
    codebook + beta * commitment (`codebook_commitment`); `quantize` also returns the two terms apart and `z`.
    `decay` > 0: the entries are not trained by gradient but follow exponential moving averages of the vectors
    assigned to them (van den Oord et al. 2017, appendix; VQ-VAE-2), updated in every training-mode forward
    (summed over the processes of a distributed run), which moves them as fast as the encoder; the codebook term
    is then a number without gradient. `restart_unused` moves entries no vector chose onto encoder outputs
    (Jukebox's restarts), so that a small codebook does not die young.
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, decay: float = 0.0):
        super().__init__()
        self.n_embed, self.embed_dim, self.beta, self.decay = n_embed, embed_dim, beta, decay
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)
        if decay:
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("ema_count", torch.ones(n_embed))
            self.register_buffer("ema_sum", self.embedding.weight.detach().clone())

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.reshape(-1, self.embed_dim).float()
        weight = self.embedding.weight.float()
        distances = flat.square().sum(1, keepdim=True) - 2 * flat @ weight.T + weight.square().sum(1)
        return distances.argmin(1).view(z.shape[:-1])

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)

    def quantize(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """`z_q` (straight-through: the entries forward, the identity backward), `indices`, the `codebook` and
        `commitment` terms, and `z` itself."""
        indices = self.indices(z)
        if self.decay and self.training:
            self._follow(z, indices)
        entries = self.lookup(indices).to(z.dtype)
        codebook, commitment = codebook_commitment(z, entries)
        return {"z_q": z + (entries - z).detach(), "indices": indices, "codebook": codebook,
                "commitment": commitment, "z": z}  # fmt: skip

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.quantize(z)
        return out["z_q"], out["indices"], out["codebook"] + self.beta * out["commitment"]

    @torch.no_grad()
    def _follow(self, z: torch.Tensor, indices: torch.Tensor) -> None:
        """One moving-average step of every entry towards the mean of the vectors assigned to it."""
        flat, index = z.detach().reshape(-1, self.embed_dim).float(), indices.flatten()
        counts = torch.bincount(index, minlength=self.n_embed).float()
        sums = torch.zeros_like(self.ema_sum).index_add_(0, index, flat)
        all_reduce_sum(counts)
        all_reduce_sum(sums)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + 1e-5) / (total + self.n_embed * 1e-5) * total  # Laplace: never 0
        self.embedding.weight.copy_(self.ema_sum / smoothed[:, None])

    @torch.no_grad()
    def restart_unused(self, counts: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Entries whose `counts` are 0 take the values of randomly drawn rows of `z` [M, D] (the global
        generator's draws); returns how many moved (a device tensor, no host sync). Under DDP, broadcast the
        quantizer from rank 0 afterwards: each rank drew from its own batch."""
        dead = counts == 0
        pick = torch.randint(z.shape[0], (self.n_embed,), device=z.device)
        new = z.detach().reshape(-1, self.embed_dim)[pick].to(self.embedding.weight.dtype)
        self.embedding.weight.copy_(torch.where(dead[:, None], new, self.embedding.weight))
        if self.decay:
            self.ema_sum.copy_(torch.where(dead[:, None], new, self.ema_sum))
            self.ema_count.copy_(torch.where(dead, torch.ones_like(self.ema_count), self.ema_count))
        return dead.sum()
