"""Image tower: a torchvision ResNet or ViT-B/16 (or the project's tiny ResNet) whose head is a linear map to
the embedding, or CLIBD's timm `vit_base_patch16_224` (models/retrieval/vit.py). Inputs are the project's
[-1, 1] pixels; each network converts them inside to what its weights expect: ImageNet mean/std for the
torchvision ones, unnormalised [0, 1] pixels for CLIBD's ViT (as it was trained).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from core.errors import UserError
from models.classifiers import IMAGENET_MEAN, IMAGENET_STD, Classifier, build_classifier, imagenet_state_dict
from models.retrieval.vit import TimmViT, ViTConfig

ARCHS = ("tiny", "resnet18", "resnet34", "resnet50", "vit_b_16", "vit_base_patch16_224")


def _vit(embed_dim: int, image_size: int, weights: str) -> nn.Module:
    import torchvision

    from core.checkpoint import load_foreign_state_dict, load_state_dict_checked

    if image_size % 16:
        raise UserError(f"vit_b_16 needs an image size divisible by 16, got {image_size}")
    net = torchvision.models.vit_b_16(weights=None, image_size=image_size)
    if weights != "none":
        if weights == "imagenet":
            state, source = imagenet_state_dict("vit_b_16"), "torchvision vit_b_16 weights"
        else:
            source = str(Path(os.path.expanduser(weights)))
            state = load_foreign_state_dict(source)
        state = {
            k.removeprefix("net."): v
            for k, v in state.items()
            if not k.removeprefix("net.").startswith("heads.")
        }
        if state["encoder.pos_embedding"].shape != net.encoder.pos_embedding.shape:
            raise UserError(f"{source} was trained at another image size than {image_size} px; use 224")
        load_state_dict_checked(net, {**state, **{k: v for k, v in net.state_dict().items() if k.startswith("heads.")}},
                                source)  # fmt: skip
    net.heads = nn.Linear(net.hidden_dim, embed_dim)
    return net


class ImageEncoder(nn.Module):
    """`forward(x in [-1, 1]) -> [B, embed_dim]` (not normalised)."""

    def __init__(
        self, arch: str, embed_dim: int, image_size: int, weights: str = "none", vit: dict | None = None
    ):
        super().__init__()
        if arch not in ARCHS:
            raise UserError(f"unknown image encoder {arch!r}; choices: {', '.join(ARCHS)}")
        self.arch = arch
        if arch == "vit_base_patch16_224":
            if weights != "none":
                raise UserError("vit_base_patch16_224 (CLIBD's image tower) takes its weights from a CLIBD "
                                "checkpoint only; pass --weights none, or --image-arch vit_b_16 for ImageNet weights")  # fmt: skip
            self.net = TimmViT(ViTConfig(**{"image_size": image_size, **(vit or {})}), embed_dim)
        elif arch == "vit_b_16":
            self.net = _vit(embed_dim, image_size, weights)
            mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
            self.register_buffer("in_scale", 0.5 / std, persistent=False)
            self.register_buffer("in_shift", (0.5 - mean) / std, persistent=False)
        else:  # the classifier's ResNet with `embed_dim` outputs: normalises inside, loads ImageNet backbones
            self.net = build_classifier(arch, embed_dim, weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.net, Classifier):
            return self.net(x)[0]
        if isinstance(self.net, TimmViT):
            return self.net((x + 1) / 2)
        return self.net(x * self.in_scale + self.in_shift)
