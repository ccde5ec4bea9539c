"""An autoregressive prior over all code positions, conditioned on one tree node (a species or an ancestor).

A small GPT: the input is [condition, code_0, ..., code_{T-2}] and position t predicts code_t, so training
covers every one of the T tokens that sampling generates. Conditions are the groups of every level (the last
level is the species), numbered level by level; the embedding of the condition is the first token.
Sampling is inverse-CDF on given uniforms, so an image depends only on its own random numbers: a seed gives
the same codes whatever the batch it is drawn in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP, with dropout on attention weights and both residual branches."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout
        self.drop = nn.Dropout(dropout)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        x = x + self.drop(self.proj(attn.transpose(1, 2).reshape(n, t, c)))
        return x + self.drop(self.mlp(self.norm2(x)))


class CodePrior(nn.Module):
    """`forward(cond [N], codes [N, T]) -> logits [N, T, vocab]` for next-code prediction of every position."""

    def __init__(
        self,
        vocab: int,
        length: int,
        n_conditions: int,
        width: int = 64,
        layers: int = 2,
        heads: int = 4,
        dropout: float = 0.0,
    ):
        super().__init__()
        self._config = dict(vocab=vocab, length=length, n_conditions=n_conditions, width=width, layers=layers,
                            heads=heads, dropout=dropout)  # fmt: skip
        self.vocab, self.length = vocab, length
        self.condition = nn.Embedding(n_conditions, width)
        self.token = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(1, length, width) * 0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(Block(width, heads, dropout) for _ in range(layers)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    @property
    def config(self) -> dict:
        return dict(self._config)

    def forward(self, cond: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Logits for positions 0..t where t = codes.shape[1] (codes may be a prefix, even empty)."""
        x = torch.cat([self.condition(cond)[:, None], self.token(codes[:, : self.length - 1])], dim=1)
        x = self.drop(x + self.position[:, : x.shape[1]])
        return self.head(self.norm(self.blocks(x)))

    def loss(self, cond: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over all T positions."""
        logits = self(cond, codes[:, :-1])
        return F.cross_entropy(logits.float().reshape(-1, self.vocab), codes.reshape(-1))

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        uniforms: torch.Tensor,
        prefix: torch.Tensor | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
    ) -> torch.Tensor:
        """[N, T] codes: `prefix` [N, P] kept, positions P..T-1 drawn with `uniforms` [N, T] (column t used
        for position t), at `temperature`, from the `top_k` most likely codes (0 = all)."""
        n = cond.shape[0]
        codes = prefix if prefix is not None else torch.zeros(n, 0, dtype=torch.long, device=cond.device)
        for t in range(codes.shape[1], self.length):
            logits = self(cond, codes)[:, -1].float() / max(temperature, 1e-6)
            if top_k and top_k < self.vocab:
                kth = logits.topk(top_k, dim=1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            cdf = logits.softmax(1).cumsum(1)
            u = uniforms[:, t : t + 1].to(cdf) * cdf[:, -1:]
            nxt = torch.searchsorted(cdf, u, side="right").clamp(max=self.vocab - 1)
            codes = torch.cat([codes, nxt], dim=1)
        return codes
