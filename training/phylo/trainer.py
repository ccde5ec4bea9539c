"""Phylo-NN training: its config, its data and tree, and `train_phylo` over (config, run directory), which runs
the paper's stages (training.phylo.stages), each resumable on its own.

1. Stage 1, the VQGAN (`vqgan_steps`, into `stage1/`; skipped when `stage1` names a trained one): L1 (+ LPIPS
   when VGG-16 weights are at hand) + codebook and commitment terms + a PatchGAN hinge loss from `disc_start`
   on, scaled by the adaptive weight (training.phylo.losses). `vqgan_only` stops after it: a stage 1 to
   pass to later runs. It is also the plain VQ baseline the analysis compares against.
2. Stage 2, the disentangler (`steps`) on the frozen stage-1 features, computed once for every training image
   (and its mirror image with `mirror`): L1 between features and their reconstruction, its own VQ loss, the
   kernel orthogonality of `conv_in`, the level heads (the species inside the beta-weighted sum), and the
   adversary on the free codes: trained on detached codes with its own optimiser, while the disentangler
   minimises log C - H(adversary(free codes)) through the frozen adversary, so that gradient reaches the
   encoder (the public code's adversary ran under no_grad and never did). Cosine annealing with warm restarts.
3. Stage 3, the prior (`prior_steps`): every code of the training images' sequences, each sequence
   conditioned on its group at a random level (species included); the prior kept is the one of lowest
   held-out NLL.
Then the analysis of testing.phylo.evaluate on the test split: code-tree correlations, the world's trait
probe, and with `classifier` the fidelity of samples. Each stage saves its own resume state (at evaluations,
and between two steps when a preemption signal comes, see core.preemption), logs its own `stage`, and draws
its randomness from (seed, stage, step, rank), so a resumed run reaches the same weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from core.atomic import write_text
from core.config import (
    require_per_process,
    require_positive,
)
from core.errors import UserError
from datasets.phylogeny import Tree, build_levels, phylogeny_record
from datasets.registry import DataConfig, DataSpec, build_dataset, collate_skipping, resolve_meta
from datasets.transforms import square_transform
from models.phylo import (
    PhyloModel,
)
from models.phylo.checkpoint import RUN_FILE
from testing.generation import TOP_K
from testing.phylo import evaluate as phylo_evaluate
from training.lifecycle import TrainerConfig, TrainingRun
from training.phylo.stages import (
    cached_features,
    stage1_from_file,
    train_disentangler_stage,
    train_prior_stage,
    train_vqgan_stage,
)

DEFAULT_CUTS = [0.5, 0.8, 0.95]  # a Newick tree without --cuts: the world's orders, families and genera
PERCEPTUAL = ("auto", "imagenet", "none")  # or a path to VGG-16 weights


@dataclass
class PhyloConfig(TrainerConfig):
    PRESETS: ClassVar[str] = "phylo"

    # data and tree
    data: DataConfig = field(default_factory=lambda: DataConfig(image_size=32))
    mirror: bool = True  # flip training images left-right (the world's birds face both ways; fish do not)
    tree: str | None = None  # Newick or taxonomy table; the world's tree.nwk by default
    cuts: list[float] | None = None  # None: DEFAULT_CUTS for a Newick tree, one level per rank for a table
    # stage 1: the VQGAN
    stage1: str | None = (
        None  # a trained stage 1 (vqgan.safetensors or a train phylo run) instead of training one
    )
    vqgan_only: bool = False  # train stage 1 alone
    latent_size: int = 8
    channels: int = 16
    channel_mult: list[int] | None = None  # per resolution; None: 1, 2, 4, 4 ... (as many as halvings + 1)
    res_blocks: int = 1
    attention: bool = True
    z_channels: int = 32
    vq_embed_dim: int = 16
    vq_n_embed: int = 256
    vq_decay: float = (
        0.99  # stage 1's entries follow moving averages of their vectors (0: trained by gradient)
    )
    vq_restart_every: int = 20  # steps between restarts of the entries no vector chose (0: never)
    perceptual: str = (
        "auto"  # LPIPS: auto (imagenet when VGG-16 weights are cached), imagenet, none or a path
    )
    perceptual_weight: float = 1.0
    disc_channels: int = 16
    disc_layers: int = 2
    disc_weight: float = 0.8
    disc_start: int = 300
    vqgan_steps: int = 1000
    vqgan_batch_size: int = 32
    vqgan_lr: float = 1e-3
    # stage 2: the disentangler
    disentangler_channels: int = 64
    phylo_channels: int = 32
    embed_dim: int = 16
    n_embed: int = 64
    codes_per_level: int = 4
    free_codes: int = 8
    adversary_hidden: int = 128
    codebook_decay: float = 0.99  # as vq_decay, for the disentangler's codebook
    codebook_restart_every: int = 0  # as vq_restart_every, for the disentangler's codebook
    vq_beta: float = 0.25
    phylo_weight: float = 0.1
    level_beta: float = 0.5
    adv_weight: float = 0.1
    ortho_weight: float = 1.0
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    adversary_lr: float = 1e-3
    lr_cycle: int = 0  # steps per cosine cycle with warm restarts (the paper's 150); 0: a constant lr
    lr_floor: float = 0.01  # the cosine's floor, a share of lr
    # stage 3: the prior
    prior_width: int = 64
    prior_layers: int = 2
    prior_heads: int = 4
    prior_steps: int = 1500
    prior_batch_size: int = 64
    prior_lr: float = 1e-3
    prior_dropout: float = 0.1
    prior_eval_every: int = 100
    # evaluation and bookkeeping
    classifier: str | None = None  # an independent classifier (train classifier run) that judges the samples
    fidelity_samples: int = 10  # per species and per node
    top_k: int = TOP_K
    eval_every: int = 500
    # a config.yaml of the one-stage design (a pixel autoencoder trained end to end) names these: such a run
    # cannot be resumed, while its weights still load in generate phylo and test phylo
    RETIRED: ClassVar[dict[str, str]] = dict.fromkeys(
        ("baseline", "branch_channels", "depth", "max_channels"),
        "written by the one-stage Phylo-NN of before the two-stage design (stage 1 VQGAN, stage 2 disentangler); "
        "its weights still load in generate phylo and test phylo, but it cannot be resumed: start a new run",
    )

    LEARNING_RATES: ClassVar[tuple[str, ...]] = ("vqgan_lr", "lr", "adversary_lr", "prior_lr")

    def check(self) -> None:
        require_positive(self, "latent_size", "channels", "res_blocks", "z_channels", "vq_embed_dim", "vq_n_embed",
                         "disc_channels", "disc_layers", "vqgan_steps", "vqgan_batch_size",
                         "disentangler_channels", "phylo_channels", "embed_dim", "n_embed", "codes_per_level",
                         "free_codes", "adversary_hidden", "steps", "batch_size", "prior_width", "prior_layers",
                         "prior_heads", "prior_steps", "prior_batch_size", "prior_eval_every", "fidelity_samples",
                         "eval_every")  # fmt: skip
        if self.cuts is not None and (
            not self.cuts or any(not 0 < c < 1 for c in self.cuts) or len(set(self.cuts)) != len(self.cuts)
        ):
            raise UserError(
                f"--cuts must be distinct relative depths strictly between 0 and 1, got {self.cuts}"
            )
        for name in ("phylo_weight", "adv_weight", "vq_beta", "ortho_weight", "perceptual_weight", "disc_weight",
                     "disc_start", "lr_cycle", "top_k", "vq_restart_every", "codebook_restart_every"):  # fmt: skip
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not self.phylo_channels < self.disentangler_channels:
            raise UserError(f"--phylo-channels {self.phylo_channels} must be below --disentangler-channels "
                            f"{self.disentangler_channels} (the rest is the free part's)")  # fmt: skip
        for name in ("vq_decay", "codebook_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        if not 0 < self.lr_floor <= 1:
            raise UserError(f"--lr-floor must be in (0, 1], got {self.lr_floor}")
        if not 0 <= self.prior_dropout < 1:
            raise UserError(f"--prior-dropout must be in [0, 1), got {self.prior_dropout}")
        if not 0 <= self.level_beta <= 1:
            raise UserError(f"--level-beta must be in [0, 1], got {self.level_beta}")
        if self.prior_width % self.prior_heads:
            raise UserError(
                f"--prior-width {self.prior_width} must be a multiple of --prior-heads {self.prior_heads}"
            )
        if self.stage1 and self.vqgan_only:
            raise UserError("--vqgan-only trains stage 1; --stage1 passes a trained one: give one of them")
        if self.perceptual not in PERCEPTUAL and not Path(self.perceptual).is_file():
            raise UserError(f"--perceptual must be auto, imagenet, none or a VGG-16 weights file, got "
                            f"{self.perceptual!r}")  # fmt: skip
        require_per_process(self, "batch_size", "vqgan_batch_size", "prior_batch_size")

    def data_spec(self) -> DataSpec:
        return self.data.spec(self.seed)


# ----------------------------------------------------------------------------
# Data and tree.


def tree_path(cfg: PhyloConfig, meta) -> Path:
    """`--tree`, else the world's own `tree.nwk`; CUB and folders need one."""
    if cfg.tree:
        return Path(cfg.tree)
    if cfg.data.dataset == "world":
        return Path(meta.root) / "tree.nwk"
    raise UserError(f"--dataset {cfg.data.dataset} needs --tree: a Newick file or a taxonomy table (CSV with "
                    "rank columns) whose leaves are the class names")  # fmt: skip


def level_cuts(cfg: PhyloConfig, tree: Tree) -> list[float] | None:
    """The cuts to use: the given ones; else one level per rank of a taxonomy table, DEFAULT_CUTS of a Newick."""
    if cfg.cuts is not None:
        return list(cfg.cuts)
    return None if tree.ranks else list(DEFAULT_CUTS)


def build_data(cfg: PhyloConfig, quiet: bool):
    spec = cfg.data_spec()
    meta = resolve_meta(spec, quiet=quiet)
    path = tree_path(cfg, meta)
    tree = Tree.read(path)
    cuts = level_cuts(cfg, tree)
    levels = build_levels(tree, meta.class_names, cuts)
    transform = square_transform(cfg.data.image_size)
    splits = {
        s: build_dataset(spec, s, False, meta=meta, transform=transform) for s in ("train", "val", "test")
    }
    if len(splits["train"]) == 0 or len(splits["val"]) == 0:
        raise UserError(f"dataset {cfg.data.dataset}: the train or val split is empty (check --val-fraction)")
    return meta, path, cuts, levels, splits


def eval_loader(dataset, run: TrainingRun):
    return run.loader(dataset, persistent=False, batch_size=run.cfg.batch_size, shuffle=False,
                      collate_fn=collate_skipping)  # fmt: skip


@torch.no_grad()
def images_of(dataset, run: TrainingRun) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 3, S, S], labels [N]) of a small split (validation), on the device."""
    images, labels = [], []
    for batch in eval_loader(dataset, run):
        if "image" in batch:
            images.append(batch["image"].to(run.device))
            labels.append(batch["label"].to(run.device))
    if not images:
        raise UserError("every image of the validation split is unreadable")
    return torch.cat(images), torch.cat(labels)


def train_phylo(cfg: PhyloConfig, run_dir: Path, resume: bool = False, quiet: bool = False) -> dict:
    """The stages in sequence, then the evaluation; returns the summary (summary.json)."""
    run = TrainingRun(cfg, run_dir, resume, quiet, tune=False)

    def prepare(quiet: bool):  # the data, and a given stage 1 checked against it before the run starts
        return *build_data(cfg, quiet), stage1_from_file(cfg, run.device) if cfg.stage1 else None

    meta, path, cuts, levels, splits, given_stage1 = run.prepare(prepare)
    ctx = {"meta": meta, "levels": levels, "splits": splits, "record": phylogeny_record(path, cuts, meta.class_names),
           "assignment": torch.as_tensor(levels.assignment, device=run.device)}  # fmt: skip
    ctx["val_images"], ctx["val_labels"] = images_of(splits["val"], run)
    judge = (
        phylo_evaluate.load_judge(cfg.classifier, len(levels.species), run.device) if cfg.classifier else None
    )
    run.begin()
    if run.main:
        write_text(run.run_dir / "levels.json", json.dumps(levels.summary(), indent=1))
        if not quiet:
            counts = ", ".join(f"level {lv}: {len(g)}" for lv, g in enumerate(levels.groups))
            print(f"tree {path}: groups per level {counts}", flush=True)
    if given_stage1 is not None:
        stage1 = given_stage1
        ctx["perceptual"] = "given stage 1"
    else:
        stage1 = train_vqgan_stage(run, ctx)
    summary = {"run_dir": str(run_dir), "perceptual": ctx["perceptual"],
               "steps": {"vqgan": 0 if cfg.stage1 else cfg.vqgan_steps}}  # fmt: skip
    test = eval_loader(splits["test"], run)
    if cfg.vqgan_only:
        if run.main:
            summary["stage1"] = phylo_evaluate.evaluate_stage1(
                stage1, test, run.device, judge, run.run_dir / "analysis"
            )
        run.finish(summary)
        run.barrier()
        return summary
    dtype = torch.bfloat16 if run.cuda and cfg.hardware.amp else torch.float32
    features, labels = cached_features(stage1, eval_loader(splits["train"], run), cfg.mirror, dtype)
    ctx["train_features"], ctx["train_feature_labels"] = features, labels
    autoencoder = train_disentangler_stage(run, ctx, stage1)
    prior = train_prior_stage(run, ctx, autoencoder)
    summary["steps"].update({"disentangler": cfg.steps, "prior": cfg.prior_steps})
    if run.main:
        model = PhyloModel(autoencoder, prior, {"phylogeny": ctx["record"]}, run.run_dir / RUN_FILE)
        n_train = len(labels) // (2 if cfg.mirror else 1)  # the training images themselves, not their mirrors
        train = (ctx["train_codes"][:n_train].cpu(), labels[:n_train].cpu().numpy())
        summary.update(phylo_evaluate.evaluate_run(
            model, levels, test, run.device, run.run_dir / "analysis", train=train,
            world_root=ctx["meta"].root if cfg.data.dataset == "world" else None, judge=judge,
            judge_name=cfg.classifier, samples=cfg.fidelity_samples, top_k=cfg.top_k, seed=cfg.seed,
            quiet=quiet))  # fmt: skip
    run.finish(summary)
    run.barrier()
    return summary
