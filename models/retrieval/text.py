"""Taxonomy-text tower: one hashed token per rank (datasets.bioscan.taxonomy) plus a rank embedding, a small
transformer encoder with the unclassified ranks masked out of attention, and a masked mean."""

from __future__ import annotations

import torch
from torch import nn

from models.retrieval.bert import masked_mean


class TextEncoder(nn.Module):
    """`forward(ids [B, 4], mask [B, 4]) -> [B, embed_dim]` (not normalised)."""

    def __init__(self, vocab_size: int, embed_dim: int, width: int = 256, layers: int = 2, heads: int = 4):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, width)
        self.ranks = nn.Parameter(torch.randn(4, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim)
        nn.init.normal_(self.tokens.weight, std=0.02)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # A record with no classified rank at all keeps its first token, so attention is never empty.
        mask = mask.clone()
        mask[:, 0] |= ~mask.any(1)
        x = self.tokens(ids) + self.ranks[: ids.shape[1]]
        x = self.encoder(x, src_key_padding_mask=~mask)
        return self.proj(masked_mean(self.norm(x), mask))
