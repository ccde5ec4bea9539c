"""Taxonomy-text towers. This project's: one hashed token per rank (datasets.bioscan.taxonomy) plus a rank
embedding, a small transformer encoder with the unclassified ranks masked out of attention, and a masked mean.
CLIBD's: BERT-small over WordPiece tokens (`BertTextEncoder`)."""

from __future__ import annotations

import torch
from torch import nn

from models.retrieval.bert import Bert, masked_mean


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


class BertTextEncoder(nn.Module):
    """CLIBD's text tower: BERT-small over WordPiece ids of "order family genus species" (20 tokens), the mean
    of the last hidden states over every position (padding included, as the reference), linear to embed_dim.
    `forward(ids, mask) -> [B, embed_dim]` (not normalised); the mask is used in attention only."""

    def __init__(self, config, embed_dim: int):
        super().__init__()
        self.bert = Bert(config)
        self.proj = nn.Linear(config.hidden_size, embed_dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.proj(self.bert(ids, mask).mean(1))
