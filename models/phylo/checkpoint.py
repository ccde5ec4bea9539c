"""Phylo-NN checkpoints: autoencoder and prior weights in one `.safetensors` file (`autoencoder.*`, `prior.*`),
the sidecar holding both configs, the phylogeny record (Newick text, cuts, class names) and provenance.
The plain VQ baseline is a file of its own kind."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from core.checkpoint import load_state_dict_checked, save_weights
from core.errors import UserError
from models.artifacts import load_kind, resolve_weights
from models.phylo.autoencoder import PhyloAutoencoder
from models.phylo.prior import CodePrior

KIND = "phylo-nn"
PLAIN_KIND = "vq-autoencoder"
RUN_FILE = "phylo.safetensors"  # what a `train phylo` run directory holds
PLAIN_RUN_FILE = "baseline/vq.safetensors"


@dataclass
class PhyloModel:
    autoencoder: PhyloAutoencoder
    prior: CodePrior
    meta: dict
    path: Path


def save_phylo(path: str | os.PathLike, autoencoder: PhyloAutoencoder, prior: CodePrior, meta: dict) -> Path:
    state = {**{f"autoencoder.{k}": v for k, v in autoencoder.state_dict().items()},
             **{f"prior.{k}": v for k, v in prior.state_dict().items()}}  # fmt: skip
    meta = {**meta, "kind": KIND, "autoencoder": autoencoder.config, "prior": prior.config}
    return save_weights(path, state, meta)


def save_plain(path: str | os.PathLike, autoencoder: PhyloAutoencoder, meta: dict) -> Path:
    return save_weights(
        path, autoencoder.state_dict(), {**meta, "kind": PLAIN_KIND, "autoencoder": autoencoder.config}
    )


def _build(cls, config, source: Path):
    try:
        return cls(**config)
    except (TypeError, ValueError) as err:
        raise UserError(f"{source}: the sidecar's {cls.__name__} config cannot be built: {err}") from None


def load_phylo(path: str | os.PathLike, device: str | torch.device = "cpu") -> PhyloModel:
    """Autoencoder and prior (eval mode, no gradients) from a `phylo.safetensors` or a `train phylo` run."""
    weights = resolve_weights(path, RUN_FILE)
    state, meta = load_kind(weights, KIND, "Phylo-NN")
    autoencoder = _build(PhyloAutoencoder, meta.get("autoencoder") or {}, weights)
    prior = _build(CodePrior, meta.get("prior") or {}, weights)
    for prefix, module in (("autoencoder.", autoencoder), ("prior.", prior)):
        part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        load_state_dict_checked(module, part, f"{weights} [{prefix.rstrip('.')}]")
    autoencoder = autoencoder.eval().requires_grad_(False).to(device)
    return PhyloModel(autoencoder, prior.eval().requires_grad_(False).to(device), meta, weights)


def load_plain(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[PhyloAutoencoder, dict, Path]:
    """The plain VQ autoencoder baseline from its `.safetensors` or the `train phylo` run holding it."""
    weights = resolve_weights(path, PLAIN_RUN_FILE)
    state, meta = load_kind(weights, PLAIN_KIND, "plain VQ autoencoder")
    autoencoder = _build(PhyloAutoencoder, meta.get("autoencoder") or {}, weights)
    load_state_dict_checked(autoencoder, state, str(weights))
    return autoencoder.eval().requires_grad_(False).to(device), meta, weights
