"""timm's `vit_base_patch16_224` (CLIBD's image tower) in plain PyTorch, with timm's parameter names, so that
CLIBD checkpoints load without timm: patch embedding, class token, learned positions, pre-norm blocks (fused
qkv, exact GELU MLP), a final LayerNorm and a linear head on the class token (`global_pool='token'`).
Sizes other than ViT-B/16 at 224 px (width, depth, heads, patch, image size) serve the tests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError


@dataclass
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_width: int = 3072
    eps: float = 1e-6

    def __post_init__(self):
        if min(self.image_size, self.patch_size, self.width, self.depth, self.heads, self.mlp_width) < 1:
            raise UserError(f"ViT sizes must be positive, got {asdict(self)}")
        if self.image_size % self.patch_size or self.width % self.heads:
            raise UserError(f"ViT: the image size must be a multiple of the patch size and the width of the "
                            f"heads, got {asdict(self)}")  # fmt: skip


class PatchEmbed(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, c.width, c.patch_size, c.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.heads = c.heads
        self.qkv = nn.Linear(c.width, 3 * c.width)
        self.proj = nn.Linear(c.width, c.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.width, c.mlp_width)
        self.fc2 = nn.Linear(c.mlp_width, c.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.width, eps=c.eps)
        self.attn = Attention(c)
        self.norm2 = nn.LayerNorm(c.width, eps=c.eps)
        self.mlp = Mlp(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimmViT(nn.Module):
    """`forward(x) -> [B, out_dim]` for pixels in [0, 1] (CLIBD feeds them unnormalised)."""

    def __init__(self, config: ViTConfig, out_dim: int):
        super().__init__()
        self.config = config
        c = config
        self.patch_embed = PatchEmbed(c)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.width))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (c.image_size // c.patch_size) ** 2, c.width) * 0.02)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width, eps=c.eps)
        self.head = nn.Linear(c.width, out_dim)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.config.image_size or x.shape[-2] != self.config.image_size:
            raise UserError(f"this ViT takes {self.config.image_size} px images, got {tuple(x.shape[-2:])}")
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def vit_config_from_state(state: dict, head_dim: int = 64) -> tuple[ViTConfig, int]:
    """(config, head outputs) from a timm ViT state dict's shapes; heads are width / `head_dim` (64 in every
    timm ViT-Ti/S/B/L)."""
    try:
        width = state["cls_token"].shape[-1]
        patch = state["patch_embed.proj.weight"].shape[-1]
        grid = round((state["pos_embed"].shape[1] - 1) ** 0.5)
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        mlp = state["blocks.0.mlp.fc1.weight"].shape[0]
        out = state["head.weight"].shape[0]
    except (KeyError, ValueError, IndexError) as err:
        raise UserError(f"the ViT weights lack {err}; is it a timm vit_base_patch16_224?") from None
    config = ViTConfig(grid * patch, patch, width, depth, max(1, width // head_dim), mlp)
    return config, out
