"""A BERT encoder in plain PyTorch with HF `BertModel`'s parameter names (BarcodeBERT's and BERT-small's under
`bert.`), so that their checkpoints load without `transformers`: absolute positions, one token type (0),
post-norm layers with exact GELU, attention to the tokens a boolean mask keeps (all when it is None).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError


@dataclass
class BertConfig:
    """HF `BertConfig`'s fields that shape the network (defaults: BarcodeBERT = bert-base, vocab 4^5 + 3)."""

    vocab_size: int = 1027
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1

    def __post_init__(self):
        if min(self.vocab_size, self.hidden_size, self.num_hidden_layers, self.num_attention_heads) < 1:
            raise UserError(f"BERT sizes must be positive, got {asdict(self)}")
        if self.hidden_size % self.num_attention_heads:
            raise UserError(
                f"BERT hidden size {self.hidden_size} is not divisible by {self.num_attention_heads} heads"
            )


class Embeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = (
            self.word_embeddings(ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings.weight[0]
        )
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)
        self.dropout = c.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        mask = None if keep is None else keep[:, None, None, :]  # attend to real tokens only
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                                             attn_mask=mask, dropout_p=p)  # fmt: skip
        return out.transpose(1, 2).reshape(b, n, d)


class DenseNorm(nn.Module):
    """HF's `BertSelfOutput` / `BertOutput`: dense, dropout, residual, LayerNorm."""

    def __init__(self, c: BertConfig, width: int):
        super().__init__()
        self.dense = nn.Linear(width, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.self = SelfAttention(c)
        self.output = DenseNorm(c, c.hidden_size)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, keep), x)


class Intermediate(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class Layer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = Attention(c)
        self.intermediate = Intermediate(c)
        self.output = DenseNorm(c, c.intermediate_size)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, keep)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, keep)
        return x


class Bert(nn.Module):
    """`forward(ids, mask) -> last hidden states [B, N, H]`; `mask` is True for real tokens."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:  # HF's initialiser: N(0, 0.02), zero biases, unit LayerNorms
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if ids.shape[1] > self.config.max_position_embeddings:
            raise UserError(
                f"{ids.shape[1]} tokens exceed BERT's {self.config.max_position_embeddings} positions"
            )
        return self.encoder(self.embeddings(ids), mask)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens where `mask` is True ([B, N, H], [B, N] -> [B, H])."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


def config_from_state(state: dict, base: BertConfig | None = None, head_dim: int = 64) -> BertConfig:
    """`base` with vocabulary, width, depth and positions read from a `Bert` state dict's shapes (tensors or
    anything with `.shape`). Heads are not in a state dict: width / `head_dim` (64 in BERT-base, BERT-small
    and BarcodeBERT) unless `base` says otherwise."""
    base = base or BertConfig()
    try:
        vocab, hidden = state["embeddings.word_embeddings.weight"].shape
        layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
        fields = {"vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
                  "intermediate_size": state["encoder.layer.0.intermediate.dense.weight"].shape[0],
                  "max_position_embeddings": state["embeddings.position_embeddings.weight"].shape[0],
                  "type_vocab_size": state["embeddings.token_type_embeddings.weight"].shape[0]}  # fmt: skip
    except (KeyError, ValueError, IndexError) as err:
        raise UserError(
            f"the BERT weights lack {err} (or it has another shape); is it a BERT checkpoint?"
        ) from None
    heads = base.num_attention_heads if base.hidden_size == hidden else max(1, hidden // head_dim)
    return BertConfig(**{**asdict(base), **fields, "num_attention_heads": heads})
