"""Image classifiers returning logits and the last three stage feature maps (what VisCoIN's Psi reads).

Inputs follow the project's pixel convention ([-1, 1] RGB); ImageNet normalisation happens inside.
`resnet18/34/50` are torchvision's networks (same state-dict keys under `net.`); `tiny` is a four-stage
residual network with 16..128 channels for tests and CPU demos.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from core.errors import UserError

ARCHS = ("tiny", "resnet18", "resnet34", "resnet50")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _tiny_resnet(num_classes: int) -> nn.Module:
    """ResNet layout (conv1/bn1/layer1..4/fc) with one BasicBlock per stage and 16..128 channels."""
    from torchvision.models.resnet import BasicBlock, ResNet

    net = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
    widths = (16, 32, 64, 128)
    net.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
    net.bn1 = nn.BatchNorm2d(widths[0])
    net.maxpool = nn.Identity()
    inplanes = widths[0]
    for i, width in enumerate(widths):
        stride = 1 if i == 0 else 2
        downsample = None
        if stride != 1 or inplanes != width:
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, width, 1, stride, bias=False), nn.BatchNorm2d(width)
            )
        setattr(net, f"layer{i + 1}", nn.Sequential(BasicBlock(inplanes, width, stride, downsample)))
        inplanes = width
    net.fc = nn.Linear(widths[-1], num_classes)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


def _torchvision_resnet(arch: str, num_classes: int) -> nn.Module:
    import torchvision

    return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)


class Classifier(nn.Module):
    """`forward(x) -> (logits, [stage2, stage3, stage4])` for x in [-1, 1]."""

    def __init__(self, arch: str = "resnet50", num_classes: int = 200):
        super().__init__()
        if arch not in ARCHS:
            raise UserError(f"unknown classifier architecture {arch!r}; choices: {', '.join(ARCHS)}")
        self.arch = arch
        self.num_classes = num_classes
        self.net = _tiny_resnet(num_classes) if arch == "tiny" else _torchvision_resnet(arch, num_classes)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        # x_imagenet = ((x + 1) / 2 - mean) / std = x * scale + shift
        self.register_buffer("in_scale", 0.5 / std, persistent=False)
        self.register_buffer("in_shift", (0.5 - mean) / std, persistent=False)

    @property
    def config(self) -> dict:
        return {"arch": self.arch, "num_classes": self.num_classes}

    @property
    def feature_channels(self) -> tuple[int, int, int]:
        return tuple(self._out_channels(i) for i in (2, 3, 4))

    def _out_channels(self, stage: int) -> int:
        block = getattr(self.net, f"layer{stage}")[-1]
        last = block.conv3 if hasattr(block, "conv3") else block.conv2
        return last.out_channels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        net = self.net
        x = x * self.in_scale + self.in_shift
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        x = net.layer1(x)
        f2 = net.layer2(x)
        f3 = net.layer3(f2)
        f4 = net.layer4(f3)
        logits = net.fc(torch.flatten(net.avgpool(f4), 1))
        return logits, [f2, f3, f4]


def imagenet_url(arch: str) -> str:
    """The URL of torchvision's default ImageNet weights for `arch`."""
    import torchvision

    if arch == "tiny":
        raise UserError("the tiny classifier has no pretrained weights; use --weights none")
    try:
        return torchvision.models.get_model_weights(arch).DEFAULT.url
    except ValueError:
        raise UserError(f"torchvision has no model {arch!r} with ImageNet weights") from None


def imagenet_state_dict(arch: str, option: str = "--weights") -> dict:
    """torchvision's ImageNet weights for `arch`: from the torch hub cache (downloading when online), the
    file's sha256 checked against the prefix in its name and read with `weights_only=True`."""
    from core.weights import load_url_state_dict

    hint = f"run `python main.py prefetch weights {arch}` on a machine with internet, or pass {option} PATH"
    return load_url_state_dict(imagenet_url(arch), f"ImageNet weights for {arch}", hint)


def load_backbone_weights(model: Classifier, state: dict, source: str) -> None:
    """Load ImageNet-style backbone weights (torchvision keys, with or without `net.`), keeping our head."""
    from core.checkpoint import load_state_dict_checked

    state = {k.removeprefix("net."): v for k, v in state.items()}
    own = model.net.state_dict()
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    head = {k: own[k] for k in own if k.startswith("fc.")}
    if state.get("fc.weight") is not None and tuple(state["fc.weight"].shape) == tuple(
        own["fc.weight"].shape
    ):
        head = {k: state[k] for k in head}
    load_state_dict_checked(model.net, {**backbone, **head}, source)


def build_classifier(arch: str, num_classes: int, weights: str = "none") -> Classifier:
    """A classifier with `weights` = `none` (random), `imagenet` (torchvision) or a path to a weights file."""
    model = Classifier(arch, num_classes)
    if weights == "none":
        return model
    if weights == "imagenet":
        load_backbone_weights(model, imagenet_state_dict(arch), f"torchvision {arch} weights")
        return model
    from core.checkpoint import load_foreign_state_dict

    path = Path(os.path.expanduser(weights))
    load_backbone_weights(model, load_foreign_state_dict(path), str(path))
    return model


def load_classifier(path: str | os.PathLike, device: str = "cpu") -> tuple[Classifier, dict]:
    """A trained classifier from `.safetensors` + sidecar (or a run directory holding best.safetensors)."""
    from core.checkpoint import load_state_dict_checked, load_weights

    path = Path(path)
    if path.is_dir():
        path = path / "best.safetensors"
    state, meta = load_weights(path, device=device)
    model_cfg = meta.get("model") or {}
    if meta.get("kind") != "classifier" or "arch" not in model_cfg:
        raise UserError(f"{path} is not a classifier checkpoint (kind: {meta.get('kind')!r})")
    model = Classifier(model_cfg["arch"], int(model_cfg["num_classes"]))
    load_state_dict_checked(model, state, str(path))
    return model.to(device), meta
