"""Frozen feature extractors for Visual DNA: images in [-1, 1] -> ``{layer: Tensor[B, C, H, W]}``.

A neuron is one channel of a hooked layer (ViT: one token dimension, tokens as ``[B, D, N, 1]`` with the
CLS token included), as in the `vdna` package. Each extractor converts the project's [-1, 1] pixels to what
its network expects inside itself (ImageNet mean/std for ResNet, VGG, ViT and the project's classifiers;
Inception's Google weights take [-1, 1] as is). The forward pass is explicit and stops at the last hooked
layer, so no head is computed.

Names (``--extractor``):
- ``resnet50``, ``vgg16``, ``inception_v3``, ``vit_b_16``: torchvision's ImageNet weights (torch hub cache,
  downloaded when online), or the state dict in ``weights=PATH``;
- ``rand_<arch>`` / ``rand_<arch>-seed<k>``: random initialisation under a fixed seed (default 0);
- ``classifier:PATH`` (stages layer2..4) or ``classifier:PATH:blocks`` (every residual block): a classifier
  checkpoint of this toolkit.

Every extractor has a stable `name` (recorded in the VDNA; distances refuse different names) and an
`identity` (weights content hash or file hash) that keys cached calibrations.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from core.config import saved_settings
from core.errors import UserError

ARCHS = ("resnet50", "vgg16", "inception_v3", "vit_b_16")
ALIASES = {"inception": "inception_v3", "vit": "vit_b_16"}
NATIVE_SIZE = {"resnet50": 224, "vgg16": 224, "inception_v3": 299, "vit_b_16": 224}
MIN_SIZE = {"resnet50": 32, "vgg16": 16, "inception_v3": 75, "vit_b_16": 16}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Keys of classification heads, which no extractor runs: a weights file may lack them.
HEAD_PREFIXES = ("fc.", "classifier.", "heads.", "AuxLogits.")
RAND_PATTERN = re.compile(r"^rand_(?P<arch>[a-z0-9_]+?)(?:-seed(?P<seed>\d+))?$")

Steps = list[tuple[str | None, nn.Module]]


class FeatureExtractor(nn.Module):
    """Runs `steps` in order on normalised pixels and returns the outputs of the tapped (named) steps.

    `name` is recorded in VDNAs; `spec` is what `build_extractor` was given (to rebuild it). `neurons` is the ordered ``{layer: channels}`` (the VDNA's neurons_list); `image_size` the default input
    size; `min_size` the smallest input the network accepts; `fixed_size` is True when only `image_size`
    works (ViT's position embedding). `identity` is computed on first use (hashing random weights costs
    a fraction of a second).
    """

    def __init__(
        self,
        name: str,
        steps: Steps,
        neurons: dict[str, int],
        image_size: int,
        imagenet_normalise: bool = True,
        identity: str | Callable[[], str] | None = None,
        min_size: int = 16,
        fixed_size: bool = False,
        tokens: bool = False,
    ):
        super().__init__()
        self.name = name
        self.spec = name
        self.steps = nn.ModuleList(module for _, module in steps)
        self.taps = [tap for tap, _ in steps]
        self.neurons = dict(neurons)
        self.image_size = image_size
        self.min_size = min_size
        self.fixed_size = fixed_size
        self.tokens = tokens
        self._identity = identity
        if imagenet_normalise:
            mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
            # ((x + 1) / 2 - mean) / std = x * scale + shift
            scale, shift = 0.5 / std, (0.5 - mean) / std
        else:
            scale, shift = torch.ones(1, 3, 1, 1), torch.zeros(1, 3, 1, 1)
        self.register_buffer("in_scale", scale, persistent=False)
        self.register_buffer("in_shift", shift, persistent=False)
        self.eval().requires_grad_(False)

    @property
    def identity(self) -> str:
        """What the outputs depend on: weights file hash, or the content hash of random weights."""
        if callable(self._identity) or self._identity is None:
            self._identity = (self._identity or (lambda: state_hash(self)))()
        return self._identity

    def check_size(self, size: int) -> None:
        """Raise a UserError if the network cannot take `size` x `size` inputs."""
        if self.fixed_size and size != self.image_size:
            raise UserError(f"{self.name} takes {self.image_size} px images only, got --image-size {size}")
        if size < self.min_size:
            raise UserError(f"{self.name} needs images of at least {self.min_size} px, got {size}")

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x * self.in_scale + self.in_shift
        out = {}
        for tap, step in zip(self.taps, self.steps, strict=True):
            x = step(x)
            if tap is not None:
                out[tap] = x.transpose(1, 2).unsqueeze(-1) if self.tokens else x
        return out


def state_hash(module: nn.Module, length: int = 16) -> str:
    """sha256 prefix of a module's state dict (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for key, value in module.state_dict().items():
        t = value.detach().cpu().contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:length]


# ----- architectures: (steps, neurons) from a torchvision network -----


class _ChannelsLastPool(nn.Module):
    """Runs a max-pool in channels-last layout and returns the input's layout. A maximum does not depend
    on the order it is taken in, so the result is bit-identical; on the CPU PyTorch's channels-last pool
    is ~4x faster than its NCHW one (ResNet-50's stem pool: 18 ms -> 4 ms for 4 images at 224 px)."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_contiguous(memory_format=torch.channels_last):
            return self.pool(x)
        return self.pool(x.contiguous(memory_format=torch.channels_last)).contiguous()


def _pooled(module: nn.Module) -> nn.Module:
    """`module`, with max-pools run channels-last (same values, faster)."""
    return _ChannelsLastPool(module) if isinstance(module, nn.MaxPool2d) else module


def _resnet_steps(net: nn.Module, blocks: bool = True) -> tuple[Steps, dict[str, int]]:
    """Stem, then every residual block tapped as ``layer<s>_<i>`` (or only stages 2-4 as ``layer<s>``)."""
    steps: Steps = [(None, nn.Sequential(net.conv1, net.bn1, net.relu, _pooled(net.maxpool)))]
    neurons = {}
    for stage in range(1, 5):
        layer = getattr(net, f"layer{stage}")
        if blocks:
            for i, block in enumerate(layer):
                steps.append((f"layer{stage}_{i}", block))
                neurons[f"layer{stage}_{i}"] = _block_width(block)
        else:
            tap = f"layer{stage}" if stage > 1 else None
            steps.append((tap, layer))
            if tap:
                neurons[tap] = _block_width(layer[-1])
    return steps, neurons


def _block_width(block: nn.Module) -> int:
    """Output channels of a torchvision Bottleneck or BasicBlock."""
    return (block.conv3 if hasattr(block, "conv3") else block.conv2).out_channels


def _vgg_steps(net: nn.Module) -> tuple[Steps, dict[str, int]]:
    """The 13 ReLU outputs ``relu_<block>_<conv>``; the last max-pool and the classifier are not run."""
    steps: Steps = []
    neurons = {}
    block, conv, width = 1, 0, 0
    for module in net.features:
        if isinstance(module, nn.MaxPool2d):
            block, conv = block + 1, 0
        if isinstance(module, nn.Conv2d):
            conv, width = conv + 1, module.out_channels
        tap = f"relu_{block}_{conv}" if isinstance(module, nn.ReLU) else None
        steps.append((tap, _pooled(module)))
        if tap:
            neurons[tap] = width
    while steps[-1][0] is None:
        steps.pop()
    return steps, neurons


def _inception_steps(net: nn.Module) -> tuple[Steps, dict[str, int]]:
    """vdna's Inception blocks: max-pool 1 (64), max-pool 2 (192), Mixed_6e (768), pool features (2048)."""
    order = [
        ("Conv2d_1a_3x3", None), ("Conv2d_2a_3x3", None), ("Conv2d_2b_3x3", None), ("maxpool1", "block_0"),
        ("Conv2d_3b_1x1", None), ("Conv2d_4a_3x3", None), ("maxpool2", "block_1"), ("Mixed_5b", None),
        ("Mixed_5c", None), ("Mixed_5d", None), ("Mixed_6a", None), ("Mixed_6b", None), ("Mixed_6c", None),
        ("Mixed_6d", None), ("Mixed_6e", "block_2"), ("Mixed_7a", None), ("Mixed_7b", None),
        ("Mixed_7c", None), ("avgpool", "block_3"),
    ]  # fmt: skip
    steps: Steps = [(tap, _pooled(getattr(net, attr))) for attr, tap in order]
    return steps, {"block_0": 64, "block_1": 192, "block_2": 768, "block_3": 2048}


class _VitEmbed(nn.Module):
    """Patch embedding, CLS token and position embedding of a torchvision ViT: pixels -> tokens [B, N, D]."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x = vit._process_input(x)
        x = torch.cat([vit.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return vit.encoder.dropout(x + vit.encoder.pos_embedding)


def _vit_steps(net: nn.Module) -> tuple[Steps, dict[str, int]]:
    """Every encoder block's tokens ``block_<i>`` and the final LayerNorm ``last_norm`` (CLS included)."""
    steps: Steps = [(None, _VitEmbed(net))]
    steps += [(f"block_{i}", layer) for i, layer in enumerate(net.encoder.layers)]
    steps.append(("last_norm", net.encoder.ln))
    return steps, {tap: net.hidden_dim for tap, _ in steps if tap}


def _torchvision_net(arch: str, image_size: int | None) -> nn.Module:
    """The torchvision network without weights (default init under the caller's RNG)."""
    import torchvision

    if arch == "inception_v3":
        return torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=True)
    if arch == "vit_b_16":
        return torchvision.models.vit_b_16(weights=None, image_size=image_size or NATIVE_SIZE[arch])
    return getattr(torchvision.models, arch)(weights=None)


def _extractor_for(
    arch: str, net: nn.Module, name: str, identity: str | Callable[[], str] | None, image_size: int
) -> FeatureExtractor:
    builders = {"resnet50": _resnet_steps, "vgg16": _vgg_steps, "inception_v3": _inception_steps}
    steps, neurons = builders[arch](net) if arch in builders else _vit_steps(net)
    return FeatureExtractor(
        name,
        steps,
        neurons,
        image_size=image_size,
        imagenet_normalise=arch != "inception_v3",
        identity=identity,
        min_size=MIN_SIZE[arch],
        fixed_size=arch == "vit_b_16",
        tokens=arch == "vit_b_16",
    )


# ----- weights -----


def _clean_state(state: dict, source: str) -> dict:
    """Unwrap ``{"model_state_dict": ...}`` (vdna's files) and strip ``net.`` / ``module.`` prefixes."""
    if "model_state_dict" in state and isinstance(state["model_state_dict"], dict):
        state = state["model_state_dict"]
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{source} does not hold a flat state dict of tensors")
    return {k.removeprefix("module.").removeprefix("net."): v for k, v in state.items()}


def _load_backbone(net: nn.Module, state: dict, source: str) -> None:
    """Load every non-head parameter strictly; head keys may be absent (they are never run)."""
    from core.checkpoint import load_state_dict_checked

    own = net.state_dict()
    heads = {k: v for k, v in own.items() if k.startswith(HEAD_PREFIXES) and k not in state}
    state = {k: v for k, v in state.items() if k in own or not k.startswith(HEAD_PREFIXES)}
    load_state_dict_checked(net, {**heads, **state}, source)


def _pretrained_state(arch: str) -> tuple[dict, str]:
    """torchvision's ImageNet weights (hub cache or download) and their file name."""
    import torchvision

    from models.classifiers import imagenet_state_dict

    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    try:
        return imagenet_state_dict(arch), os.path.basename(url)
    except UserError as err:
        raise UserError(f"{err.message}, or use the random-weight extractor rand_{arch}") from None


def _torchvision_hash_prefix(arch: str) -> str:
    """The sha256 prefix in torchvision's weights file name, e.g. '11ad3fa6' for resnet50-11ad3fa6.pth."""
    import torchvision

    stem = Path(torchvision.models.get_model_weights(arch).DEFAULT.url).stem
    return stem.rsplit("-", 1)[-1]


def _classifier_extractor(spec: str) -> FeatureExtractor:
    """``classifier:PATH[:blocks]``: a checkpoint of this toolkit (run folder or .safetensors)."""
    from core.checkpoint import file_hash
    from models.classifiers import load_classifier

    rest = spec.removeprefix("classifier:")
    blocks = rest.endswith(":blocks")
    path = Path(rest.removesuffix(":blocks")).expanduser()
    model, meta = load_classifier(path)
    weights_file = path / "best.safetensors" if path.is_dir() else path
    digest = file_hash(weights_file, 32)
    steps, neurons = _resnet_steps(model.net, blocks=blocks)
    size = int(meta.get("image_size") or saved_settings(meta.get("config")).get("image_size") or 224)
    extractor = FeatureExtractor(
        f"classifier-{digest[:12]}" + ("-blocks" if blocks else ""),
        steps,
        neurons,
        image_size=size,
        identity=f"file-{digest}",
        min_size=16 if model.arch == "tiny" else 32,
    )
    extractor.in_scale.copy_(model.in_scale)
    extractor.in_shift.copy_(model.in_shift)
    return extractor


def build_extractor(
    spec: str = "rand_resnet50",
    weights: str | os.PathLike | None = None,
    image_size: int | None = None,
    name: str | None = None,
) -> FeatureExtractor:
    """The extractor named by `spec` (see the module docstring), in eval mode on the CPU.

    `weights` is a local state dict for a torchvision architecture (safetensors or a weights-only
    .pt/.pth; vdna's ``{"model_state_dict": ...}`` files work too). `image_size` matters only for a random
    ViT (its position embedding). `name` overrides the recorded name (e.g. to match a vdna VDNA).
    """
    spec = spec.strip()
    if spec.startswith("classifier:"):
        if weights is not None:
            raise UserError("--weights applies to torchvision architectures, not to classifier:PATH")
        extractor = _classifier_extractor(spec)
    else:
        extractor = _torchvision_extractor(spec, weights, image_size)
    if name:
        extractor.name = name
    extractor.spec = spec
    return extractor


def _torchvision_extractor(spec: str, weights: str | os.PathLike | None, image_size: int | None):
    from core.checkpoint import file_hash, load_foreign_state_dict

    match = RAND_PATTERN.match(spec)
    arch = ALIASES.get(match["arch"] if match else spec, match["arch"] if match else spec)
    if arch not in ARCHS:
        choices = ", ".join([*ARCHS, *(f"rand_{a}" for a in ARCHS), "classifier:PATH[:blocks]"])
        raise UserError(f"unknown extractor {spec!r}; choices: {choices}")
    size = image_size if arch == "vit_b_16" and image_size and match else NATIVE_SIZE[arch]
    if arch == "vit_b_16" and size % 16:
        raise UserError(f"vit_b_16 needs an image size divisible by 16, got {size}")
    if match:
        if weights is not None:
            raise UserError(f"{spec} is randomly initialised; drop --weights or use --extractor {arch}")
        seed = int(match["seed"] or 0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = _torchvision_net(arch, size)
        name = f"rand_{arch}" + (f"-seed{seed}" if seed else "")
        return _extractor_for(arch, net, name, None, size)
    prefix = _torchvision_hash_prefix(arch)
    if weights is not None:
        path = Path(weights).expanduser()
        source = str(path)
        state = load_foreign_state_dict(path)
        digest = file_hash(path, 32)
        # The very file torchvision downloads keeps the plain name and identity.
        same = digest.startswith(prefix)
        name, identity = (arch, f"weights-{prefix}") if same else (f"{arch}-{digest[:8]}", f"file-{digest}")
    else:
        state, source = _pretrained_state(arch)  # first, so that offline fails before building
        name, identity = arch, f"weights-{prefix}"
    net = _torchvision_net(arch, size)
    _load_backbone(net, _clean_state(state, source), source)
    return _extractor_for(arch, net, name, identity, size)
