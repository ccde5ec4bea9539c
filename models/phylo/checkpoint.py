"""Phylo-NN checkpoints. A stage-1 VQGAN is a file of its own kind (`vqgan`, weights under `vqgan.`, the
discriminator's under `discriminator.` when kept), so a trained stage 1 can be passed to later runs. A Phylo-NN
file holds the model and its prior in one `.safetensors`: the two-stage model as `stage1.*`, `disentangler.*`,
`prior.*` (sidecar `architecture: vqgan+disentangler`), or the single autoencoder of earlier runs as
`autoencoder.*`, `prior.*`; the sidecar holds the configs, the phylogeny record (Newick text, cuts, class
names) and provenance. The plain VQ baseline of earlier runs is a file of its own kind."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from core.checkpoint import load_state_dict_checked, save_weights
from core.errors import UserError
from models.artifacts import load_kind, resolve_weights
from models.phylo.autoencoder import PhyloAutoencoder
from models.phylo.discriminator import PatchDiscriminator
from models.phylo.disentangler import PhyloDisentangler, PhyloNN
from models.phylo.prior import CodePrior
from models.phylo.vqgan import VQGAN

KIND = "phylo-nn"
PLAIN_KIND = "vq-autoencoder"
VQGAN_KIND = "vqgan"
TWO_STAGE = "vqgan+disentangler"
RUN_FILE = "phylo.safetensors"  # what a `train phylo` run directory holds
PLAIN_RUN_FILE = "baseline/vq.safetensors"
VQGAN_RUN_FILE = "stage1/vqgan.safetensors"


@dataclass
class PhyloModel:
    autoencoder: PhyloAutoencoder | PhyloNN
    prior: CodePrior
    meta: dict
    path: Path


def _prefixed(**modules: nn.Module) -> dict:
    return {f"{name}.{k}": v for name, module in modules.items() for k, v in module.state_dict().items()}


def _part(state: dict, prefix: str) -> dict:
    return {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}


def save_phylo(
    path: str | os.PathLike, autoencoder: PhyloAutoencoder | PhyloNN, prior: CodePrior, meta: dict
) -> Path:
    if isinstance(autoencoder, PhyloNN):
        state = _prefixed(stage1=autoencoder.stage1, disentangler=autoencoder.disentangler, prior=prior)
        meta = {**meta, "kind": KIND, "architecture": TWO_STAGE, "stage1": autoencoder.stage1.config,
                "disentangler": autoencoder.disentangler.config, "prior": prior.config}  # fmt: skip
        return save_weights(path, state, meta)
    state = _prefixed(autoencoder=autoencoder, prior=prior)
    meta = {**meta, "kind": KIND, "autoencoder": autoencoder.config, "prior": prior.config}
    return save_weights(path, state, meta)


def save_plain(path: str | os.PathLike, autoencoder: PhyloAutoencoder, meta: dict) -> Path:
    return save_weights(
        path, autoencoder.state_dict(), {**meta, "kind": PLAIN_KIND, "autoencoder": autoencoder.config}
    )


def save_vqgan(
    path: str | os.PathLike, model: VQGAN, meta: dict, discriminator: PatchDiscriminator | None = None
) -> Path:
    """A stage-1 VQGAN (and its discriminator, to go on training it) as a `vqgan` checkpoint."""
    modules = {"vqgan": model} if discriminator is None else {"vqgan": model, "discriminator": discriminator}
    extra = {"discriminator": discriminator.config} if discriminator is not None else {}
    return save_weights(
        path, _prefixed(**modules), {**meta, "kind": VQGAN_KIND, "vqgan": model.config, **extra}
    )


def _build(cls, config, source: Path):
    try:
        return cls(**config)
    except (TypeError, ValueError) as err:
        raise UserError(f"{source}: the sidecar's {cls.__name__} config cannot be built: {err}") from None


def _loaded(cls, meta: dict, key: str, state: dict, weights: Path, device) -> nn.Module:
    module = _build(cls, meta.get(key) or {}, weights)
    load_state_dict_checked(module, _part(state, key), f"{weights} [{key}]")
    return module.eval().requires_grad_(False).to(device)


def load_vqgan(
    path: str | os.PathLike, device: str | torch.device = "cpu", discriminator: bool = False
) -> tuple[VQGAN, PatchDiscriminator | None, dict, Path]:
    """(VQGAN, its discriminator or None, meta, weights path), frozen, from a `vqgan` checkpoint or a run holding
    one (`stage1/vqgan.safetensors`)."""
    path = Path(path)
    weights = resolve_weights(
        path, "vqgan.safetensors" if (path / "vqgan.safetensors").is_file() else VQGAN_RUN_FILE
    )
    state, meta = load_kind(weights, VQGAN_KIND, "stage-1 VQGAN")
    model = _loaded(VQGAN, meta, "vqgan", state, weights, device)
    disc = None
    if discriminator and meta.get("discriminator"):
        disc = _loaded(PatchDiscriminator, meta, "discriminator", state, weights, device)
    return model, disc, meta, weights


def load_phylo(path: str | os.PathLike, device: str | torch.device = "cpu") -> PhyloModel:
    """Model and prior (eval mode, no gradients) from a `phylo.safetensors` or a `train phylo` run."""
    weights = resolve_weights(path, RUN_FILE)
    state, meta = load_kind(weights, KIND, "Phylo-NN")
    if meta.get("architecture") == TWO_STAGE:
        stage1 = _loaded(VQGAN, meta, "stage1", state, weights, device)
        disentangler = _loaded(PhyloDisentangler, meta, "disentangler", state, weights, device)
        autoencoder = PhyloNN(stage1, disentangler).eval()
    else:
        autoencoder = _loaded(PhyloAutoencoder, meta, "autoencoder", state, weights, device)
    prior = _loaded(CodePrior, meta, "prior", state, weights, device)
    return PhyloModel(autoencoder, prior, meta, weights)


def load_plain(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[PhyloAutoencoder, dict, Path]:
    """The plain VQ autoencoder baseline from its `.safetensors` or the `train phylo` run holding it."""
    weights = resolve_weights(path, PLAIN_RUN_FILE)
    state, meta = load_kind(weights, PLAIN_KIND, "plain VQ autoencoder")
    autoencoder = _build(PhyloAutoencoder, meta.get("autoencoder") or {}, weights)
    load_state_dict_checked(autoencoder, state, str(weights))
    return autoencoder.eval().requires_grad_(False).to(device), meta, weights
