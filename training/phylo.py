"""Phylo-NN training: one function over (config, run directory), in the paper's stages, each resumable on its own.

1. Stage 1, the VQGAN (`vqgan_steps`, into `stage1/`; skipped when `stage1` names a trained one): L1 (+ LPIPS
   when VGG-16 weights are at hand) + codebook and commitment terms + a PatchGAN hinge loss from `disc_start`
   on, scaled by the adaptive weight (training/losses_phylo.py). `vqgan_only` stops after it: a stage 1 to
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
    saved_settings,
    to_dict,
)
from core.device import autocast
from core.errors import UserError
from core.seeding import derive_seed, seed_everything
from datasets.gpu_transforms import mirror
from datasets.phylogeny import Levels, Tree, build_levels, phylogeny_record
from datasets.registry import DataConfig, DataSpec, build_dataset, collate_skipping, resolve_meta
from datasets.transforms import square_transform
from models.phylo import (
    VQGAN,
    CodePrior,
    PatchDiscriminator,
    PhyloDisentangler,
    PhyloModel,
    PhyloNN,
    load_vqgan,
    save_phylo,
    save_vqgan,
)
from models.phylo.checkpoint import RUN_FILE, VQGAN_RUN_FILE
from testing.generation import TOP_K
from testing.phylo import evaluate as phylo_evaluate
from testing.sampling import save_grid
from training.lifecycle import ShuffledSteps, TrainerConfig, TrainingRun
from training.losses_phylo import (
    adversary_loss,
    cosine_warm_restarts,
    disentangler_losses,
    vqgan_discriminator_losses,
    vqgan_generator_losses,
)
from training.optim import optimiser_step

DEFAULT_CUTS = [0.5, 0.8, 0.95]  # a Newick tree without --cuts: the world's orders, families and genera
ADAM_BETAS = (0.5, 0.9)  # taming-transformers' and Phylo-NN's
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


# ----------------------------------------------------------------------------
# Models.


def build_vqgan(cfg: PhyloConfig) -> VQGAN:
    return VQGAN(image_size=cfg.data.image_size, latent_size=cfg.latent_size, channels=cfg.channels,
                 channel_mult=cfg.channel_mult, res_blocks=cfg.res_blocks, attention=cfg.attention,
                 z_channels=cfg.z_channels, embed_dim=cfg.vq_embed_dim, n_embed=cfg.vq_n_embed,
                 codebook_decay=cfg.vq_decay)  # fmt: skip


def build_disentangler(cfg: PhyloConfig, stage1: VQGAN, levels: Levels) -> PhyloDisentangler:
    return PhyloDisentangler(stage1.z_channels, stage1.latent_size, [len(g) for g in levels.groups],
                             channels=cfg.disentangler_channels, phylo_channels=cfg.phylo_channels,
                             embed_dim=cfg.embed_dim, n_embed=cfg.n_embed, codes_per_level=cfg.codes_per_level,
                             free_codes=cfg.free_codes, adversary_hidden=cfg.adversary_hidden,
                             vq_beta=cfg.vq_beta, codebook_decay=cfg.codebook_decay)  # fmt: skip


def build_prior(cfg: PhyloConfig, length: int, levels: Levels) -> CodePrior:
    n_conditions = sum(len(g) for g in levels.groups)
    return CodePrior(cfg.n_embed, length, n_conditions, cfg.prior_width, cfg.prior_layers, cfg.prior_heads,
                     cfg.prior_dropout)  # fmt: skip


def perceptual_network(
    cfg: PhyloConfig, device, resumed: str | None = None
) -> tuple[torch.nn.Module | None, str]:
    """(LPIPS or None, what was used): `auto` takes torchvision's VGG-16 when it is cached, else none; a resumed
    stage keeps the choice it started with (`resumed`), so weights cached meanwhile do not change its loss."""
    choice = resumed or cfg.perceptual
    if choice == "auto":
        from core.weights import hub_dir
        from models.classifiers import imagenet_url

        cached = (hub_dir() / Path(imagenet_url("vgg16")).name).is_file()
        choice = "imagenet" if cached else "none"
    if choice == "none" or cfg.perceptual_weight == 0:
        return None, "none"
    from models.lpips import LPIPS

    return LPIPS(choice, option="--perceptual").to(device), choice


# ----------------------------------------------------------------------------
# One step of each stage (device tensors in and out, no host sync).


def vqgan_step(model: VQGAN, disc: PatchDiscriminator, opt_g, opt_d, x: torch.Tensor, step: int, cfg: PhyloConfig,
               lpips, world: int) -> dict[str, torch.Tensor]:  # fmt: skip
    """The VQGAN's step, then the discriminator's (from `disc_start` on): detached losses, and the step's codes
    `indices` and pre-quantisation vectors `z` for the codebook's restarts."""
    with autocast(x.device, cfg.hardware.amp):
        g = vqgan_generator_losses(model, disc, x, step, lpips, cfg.perceptual_weight, 1.0, cfg.disc_weight,
                                   cfg.disc_start)  # fmt: skip
    optimiser_step(opt_g, model, g["loss"], world)
    with autocast(x.device, cfg.hardware.amp):
        d = vqgan_discriminator_losses(disc, x, g["recon"], step, cfg.disc_start)
    if step >= cfg.disc_start:
        optimiser_step(opt_d, disc, d["loss"], world)
    keys = ("l1", "perceptual", "codebook", "commitment", "g_loss", "d_weight", "indices", "z")
    return {**{k: g[k].detach() for k in keys}, "d_loss": d["loss"].detach()}


def disentangler_step(model: PhyloDisentangler, opt, opt_adv, h: torch.Tensor, groups: torch.Tensor,
                      cfg: PhyloConfig, world: int) -> dict[str, torch.Tensor]:  # fmt: skip
    """The disentangler's step against the frozen adversary, then the adversary's on the detached free codes:
    detached losses, and the step's `codes` and pre-quantisation vectors `z` for the codebook's restarts."""
    with autocast(h.device, cfg.hardware.amp):
        losses = disentangler_losses(model, h, groups, cfg.level_beta, cfg.phylo_weight, cfg.adv_weight,
                                     cfg.ortho_weight)  # fmt: skip
    optimiser_step(opt, model, losses["loss"], world)
    adv = adversary_loss(model.adversary, losses["free"], groups[-1])
    optimiser_step(opt_adv, model.adversary, adv, world)
    opt_adv.zero_grad(set_to_none=True)
    keys = ("rec", "vq", "ortho", "phylo", "confusion", "codes", "z")
    return {**{k: losses[k].detach() for k in keys}, "adversary_ce": adv.detach()}


def prior_step(
    prior: CodePrior, opt, codes, labels, assignment, offsets, n_levels: int, batch: int, world: int
):
    """Codes of `batch` random training images, each conditioned on its group at a random level."""
    idx = torch.randint(codes.shape[0], (batch,), device=codes.device)
    level = torch.randint(n_levels, (batch,), device=codes.device)
    cond = offsets[level] + assignment[level, labels[idx]]
    loss = prior.loss(cond, codes[idx])
    optimiser_step(opt, prior, loss, world)
    return loss.detach()


def codebook_restarts(run: TrainingRun, quantizer, usage: torch.Tensor, codes: torch.Tensor, z: torch.Tensor,
                      step: int, every: int, total: int) -> dict | None:  # fmt: skip
    """Count the step's codes of every rank in `usage`; every `every` steps (not at the last) restart the entries
    no rank chose on this step's vectors `z` and start counting anew. The restart count for the log, or None."""
    usage += run.all_reduce(torch.bincount(codes.flatten(), minlength=usage.numel()))
    if not every or step % every or step >= total:
        return None
    moved = quantizer.restart_unused(usage, z)
    run.broadcast(quantizer)  # under DDP every rank drew from its own batch: rank 0's entries for all
    usage.zero_()
    return {"codes_restarted": moved}


# ----------------------------------------------------------------------------
# Evaluations during training.


@torch.no_grad()
def evaluate_vqgan(model: VQGAN, images: torch.Tensor) -> dict:
    """Held-out L1 and codebook use (entries used, perplexity) of the stage-1 VQGAN."""
    model.eval()
    l1, counts = 0.0, torch.zeros(model.quantizer.n_embed, device=images.device)
    for x in images.split(128):
        out = model(x)
        l1 += float((out["recon"].float().clamp(-1, 1) - x).abs().mean((1, 2, 3)).sum())
        counts += torch.bincount(out["indices"].flatten(), minlength=counts.numel()).float()
    model.train()
    return {"l1": l1 / len(images), **phylo_evaluate.code_usage(counts)}


@torch.no_grad()
def evaluate_disentangler(model: PhyloDisentangler, features: torch.Tensor, labels: torch.Tensor,
                          assignment: torch.Tensor) -> dict:  # fmt: skip
    """Held-out feature L1, code use, each level head's accuracy and the adversary's (beside its chance)."""
    model.eval()
    n, l1 = len(features), 0.0
    hits = torch.zeros(model.levels, device=features.device)
    adv_hits = torch.zeros((), device=features.device)
    counts = torch.zeros(model.quantizer.n_embed, device=features.device)
    for h, y in zip(features.split(128), labels.split(128), strict=True):
        out = model(h)
        l1 += float((out["features"].float() - h).abs().mean((1, 2, 3)).sum())
        counts += torch.bincount(out["codes"].flatten(), minlength=counts.numel()).float()
        groups = assignment[:, y]
        for level, logits in enumerate(out["level_logits"]):
            hits[level] += (logits.argmax(1) == groups[level]).sum()
        adv_hits += (model.adversary(out["free"]).argmax(1) == y).sum()
    model.train()
    result = {"feature_l1": l1 / n, **phylo_evaluate.code_usage(counts)}
    result.update({f"acc_level{lv}": float(h) / n for lv, h in enumerate(hits)})
    result["adversary_acc"], result["adversary_chance"] = float(adv_hits) / n, 1.0 / model.n_species
    return result


@torch.no_grad()
def reconstruction_grid(reconstruct, images: torch.Tensor, path: Path) -> None:
    """Top row 8 fixed validation images, bottom row their reconstructions."""
    picks = torch.linspace(0, len(images) - 1, min(8, len(images))).round().long()
    x = images[picks]
    save_grid(torch.cat([x, reconstruct(x).float().clamp(-1, 1)]), path, columns=len(picks))


# ----------------------------------------------------------------------------
# Stages.


def _weights_meta(cfg: PhyloConfig, ctx: dict, steps: dict, metrics: dict) -> dict:
    return {
        "source": "train phylo",
        "dataset": {
            "name": cfg.data.dataset,
            "root": str(ctx["meta"].root),
            "world": cfg.data.world if cfg.data.dataset == "world" else None,
            "data_dir": cfg.data.data_dir,
            "image_size": cfg.data.image_size,
        },  # fmt: skip
        "phylogeny": ctx["record"],
        "steps": steps,
        "metrics": metrics,
        "config": to_dict(cfg),
    }


def stage1_from_file(cfg: PhyloConfig, device) -> VQGAN:
    """The trained stage 1 of `--stage1`, checked against this run's resolution and, where its checkpoint says
    (one `train phylo` wrote), its data and splits: a stage 1 trained on other images, other crops or another
    split seed would have seen this run's validation images."""
    model, _, meta, weights = load_vqgan(cfg.stage1, device)
    if model.config["image_size"] != cfg.data.image_size:
        raise UserError(f"--stage1 {weights} was trained at {model.config['image_size']} px, this run uses "
                        f"--image-size {cfg.data.image_size}")  # fmt: skip
    dataset, trained = meta.get("dataset") or {}, saved_settings(meta.get("config") or {})
    theirs = {"dataset": dataset.get("name"), "world": dataset.get("world"), "bbox_crop": trained.get("bbox_crop"),
              "val_fraction": trained.get("val_fraction"), "seed": trained.get("seed")}  # fmt: skip
    ours = {"dataset": cfg.data.dataset, "world": cfg.data.world if cfg.data.dataset == "world" else None,
            "bbox_crop": cfg.data.bbox_crop, "val_fraction": cfg.data.val_fraction, "seed": cfg.seed}  # fmt: skip
    differ = [k for k, v in theirs.items() if v is not None and v != ours[k]]
    if differ:
        said = ", ".join(f"{k} {theirs[k]} (this run: {ours[k]})" for k in differ)
        raise UserError(f"--stage1 {weights} was trained with {said}: give this run the same data and seed, or "
                        "train its own stage 1")  # fmt: skip
    return model


def train_vqgan_stage(run: TrainingRun, ctx: dict) -> VQGAN:
    """Stage 1: the VQGAN and its discriminator; `stage1/vqgan.safetensors` and `stage1/last_vqgan.pt` at every
    evaluation."""
    cfg, device, world = run.cfg, run.device, run.world
    stage_dir = run.run_dir / Path(VQGAN_RUN_FILE).parent
    stage_dir.mkdir(exist_ok=True)
    seed_everything(derive_seed(cfg.seed, "vqgan"))
    model = build_vqgan(cfg).to(device)
    disc = PatchDiscriminator(3, cfg.disc_channels, cfg.disc_layers).to(device)
    opt_g = torch.optim.Adam(model.parameters(), lr=cfg.vqgan_lr, betas=ADAM_BETAS)
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.vqgan_lr, betas=ADAM_BETAS)
    state_name = Path(VQGAN_RUN_FILE).parent / "last_vqgan.pt"
    state, step = run.load_state(state_name), 0
    # how often each entry was chosen since the last restart
    usage = torch.zeros(cfg.vq_n_embed, device=device)
    if state is not None:
        run.restore(state, state_name, model=model, discriminator=disc, opt_g=opt_g, opt_d=opt_d)
        step, usage = state["step"], state["usage"].to(device)
    run.broadcast(model, disc)
    lpips, used = perceptual_network(cfg, device, state.get("perceptual") if state is not None else None)
    ctx["perceptual"] = used
    train = ctx["splits"]["train"]
    sampler = ShuffledSteps(train, cfg.vqgan_batch_size // world, run.rank, world, cfg.seed, step)
    stream = iter(run.loader(train, batch_sampler=sampler, collate_fn=collate_skipping))
    val = ctx["val_images"]

    def save_resume() -> None:
        run.save_state({"model": model.state_dict(), "discriminator": disc.state_dict(), "opt_g": opt_g.state_dict(),
                        "opt_d": opt_d.state_dict(), "usage": usage, "step": loop.step, "perceptual": used,
                        "config": to_dict(cfg)},
                       state_name)  # fmt: skip

    loop = run.steps(cfg.vqgan_steps, step, name="train phylo: stage 1 (VQGAN)", log_every=cfg.log_every,
                     samples_per_step=cfg.vqgan_batch_size, save=save_resume, seed_key="vqgan", stage="vqgan",
                     state=state, hint="lower --vqgan-lr")  # fmt: skip
    for index in loop:
        batch = next(stream)
        if "image" not in batch:
            raise UserError(f"step {loop.step - 1}: a whole batch of unreadable images")
        x = batch["image"].to(device, non_blocking=True)
        x = mirror(x) if cfg.mirror else x
        out = vqgan_step(model, disc, opt_g, opt_d, x, index, cfg, lpips, world)
        restarted = codebook_restarts(run, model.quantizer, usage, out.pop("indices"), out.pop("z"), loop.step,
                                      cfg.vq_restart_every, cfg.vqgan_steps)  # fmt: skip
        loop.log(out, latest=restarted, show=("l1", "g_loss"))
        if loop.due(cfg.eval_every):
            with loop.paused():
                if run.main:
                    metrics = evaluate_vqgan(model, val)
                    run.log.write(loop.step, "val", stage="vqgan", **metrics)
                    model.eval()
                    reconstruction_grid(
                        lambda x: model(x)["recon"], val, stage_dir / f"reconstructions_{loop.step:07d}.png"
                    )
                    model.train()
                    meta = _weights_meta(cfg, ctx, {"vqgan": loop.step}, {**metrics, "perceptual": used})
                    save_vqgan(stage_dir / Path(VQGAN_RUN_FILE).name, model, meta, disc)
                    save_resume()
                run.barrier()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def cached_features(
    stage1: VQGAN, loader, mirrored: bool, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(frozen stage-1 features [N, C, S, S], labels [N]) of every image of `loader`, on the device; with
    `mirrored`, those of their mirror images follow in the same order."""
    device = next(stage1.parameters()).device
    plain, flipped, labels = [], [], []
    for batch in loader:
        if "image" in batch:
            x = batch["image"].to(device)
            plain.append(stage1.encode_features(x).to(dtype))
            if mirrored:
                flipped.append(stage1.encode_features(x.flip(3)).to(dtype))
            labels.append(batch["label"].to(device))
    if not plain:
        raise UserError("every image of the split is unreadable")
    labels = torch.cat(labels)
    return torch.cat(plain + flipped), labels.repeat(2) if mirrored else labels


def train_disentangler_stage(run: TrainingRun, ctx: dict, stage1: VQGAN) -> PhyloNN:
    """Stage 2 on the cached stage-1 features; `last_disentangler.pt` at every evaluation."""
    cfg, device, world = run.cfg, run.device, run.world
    seed_everything(derive_seed(cfg.seed, "disentangler"))
    model = build_disentangler(cfg, stage1, ctx["levels"]).to(device)
    trainable = [p for n, p in model.named_parameters() if not n.startswith("adversary.")]
    opt = torch.optim.Adam(trainable, lr=cfg.lr, betas=ADAM_BETAS)
    opt_adv = torch.optim.Adam(model.adversary.parameters(), lr=cfg.adversary_lr, betas=ADAM_BETAS)
    schedule = cosine_warm_restarts(opt, cfg.lr_cycle, cfg.lr_floor) if cfg.lr_cycle else None
    state_name = "last_disentangler.pt"
    state, step = run.load_state(state_name), 0
    usage = torch.zeros(cfg.n_embed, device=device)
    if state is not None:
        run.restore(state, state_name, model=model, opt=opt, opt_adv=opt_adv, schedule=schedule)
        step, usage = state["step"], state["usage"].to(device)
    run.broadcast(model)
    features, labels = ctx["train_features"], ctx["train_feature_labels"]
    val_features = torch.cat([stage1.encode_features(x) for x in ctx["val_images"].split(128)])
    assignment = ctx["assignment"]
    batch = cfg.batch_size // world
    full = PhyloNN(stage1, model)

    def save_resume() -> None:
        state = {"model": model.state_dict(), "opt": opt.state_dict(), "opt_adv": opt_adv.state_dict(),
                 "usage": usage, "step": loop.step, "config": to_dict(cfg)}  # fmt: skip
        if schedule is not None:
            state["schedule"] = schedule.state_dict()
        run.save_state(state, state_name)

    loop = run.steps(cfg.steps, step, name="train phylo: stage 2 (disentangler)", log_every=cfg.log_every,
                     samples_per_step=cfg.batch_size, save=save_resume, seed_key="disentangler",
                     stage="disentangler", state=state,
                     fields=lambda: {"lr": opt.param_groups[0]["lr"]})  # fmt: skip
    for _ in loop:
        idx = torch.randint(len(features), (batch,), device=device)
        out = disentangler_step(model, opt, opt_adv, features[idx], assignment[:, labels[idx]], cfg, world)
        if schedule is not None:
            schedule.step()
        restarted = codebook_restarts(run, model.quantizer, usage, out.pop("codes"), out.pop("z"), loop.step,
                                      cfg.codebook_restart_every, cfg.steps)  # fmt: skip
        loop.log(out, latest=restarted, show=("rec", "phylo", "confusion"))
        if loop.due(cfg.eval_every):
            with loop.paused():
                if run.main:
                    metrics = evaluate_disentangler(model, val_features, ctx["val_labels"], assignment)
                    run.log.write(loop.step, "val", stage="disentangler", **metrics)
                    full.eval()
                    reconstruction_grid(full.reconstruct, ctx["val_images"],
                                        run.run_dir / "samples" / f"disentangler_{loop.step:07d}.png")  # fmt: skip
                    full.train()  # back to training mode: the codebook's moving averages go on
                    save_resume()
                run.barrier()
    return full.eval().requires_grad_(False)


def train_prior_stage(run: TrainingRun, ctx: dict, autoencoder: PhyloNN) -> CodePrior:
    """Stage 3 on the codes of the cached features; the prior of lowest held-out NLL is kept and saved with
    the model as `phylo.safetensors`."""
    cfg, device, world = run.cfg, run.device, run.world
    levels = ctx["levels"]
    seed_everything(derive_seed(cfg.seed, "prior"))
    prior = build_prior(cfg, autoencoder.sequence_length, levels).to(device)
    opt = torch.optim.AdamW(prior.parameters(), lr=cfg.prior_lr, betas=(0.9, 0.95), weight_decay=0.01)
    state_name = "last_prior.pt"
    state, step, best = run.load_state(state_name), 0, {"nll": None, "step": None, "model": None}
    if state is not None:
        run.restore(state, state_name, model=prior, opt=opt)
        step, best = state["step"], state["best"]
    run.broadcast(prior)
    dis = autoencoder.disentangler
    codes = torch.cat([dis.encode_codes(h.float()) for h in ctx["train_features"].split(256)])
    ctx["train_codes"] = codes  # the final evaluation's too: the autoencoder is frozen from here on
    labels = ctx["train_feature_labels"]
    val_codes = torch.cat([autoencoder.encode_codes(x) for x in ctx["val_images"].split(128)])
    assignment = ctx["assignment"]
    offsets = torch.tensor(levels.condition_offsets, device=device)
    species_cond = offsets[-1] + ctx["val_labels"]

    def save_resume() -> None:
        run.save_state({"model": prior.state_dict(), "opt": opt.state_dict(), "step": loop.step, "best": best,
                        "config": to_dict(cfg)}, state_name)  # fmt: skip

    loop = run.steps(cfg.prior_steps, step, name="train phylo: stage 3 (prior)", log_every=cfg.log_every,
                     samples_per_step=cfg.prior_batch_size, save=save_resume, seed_key="prior", stage="prior",
                     rate_key="sequences_per_s", state=state, hint="lower --prior-lr")  # fmt: skip
    for _ in loop:
        prior.train()
        loss = prior_step(prior, opt, codes, labels, assignment, offsets, levels.n_levels, cfg.prior_batch_size // world,
                          world)  # fmt: skip
        loop.log({"prior_nll": loss}, show=("prior_nll",))
        if loop.due(cfg.prior_eval_every):
            with loop.paused():
                if run.main:
                    prior.eval()
                    with torch.no_grad():
                        nll = float(prior.loss(species_cond, val_codes))
                    improved = best["nll"] is None or nll < best["nll"]
                    run.log.write(loop.step, "val", stage="prior", prior_nll=nll, best=improved)
                    if improved:  # keep the prior that predicts held-out images' codes best
                        weights = {k: v.detach().clone() for k, v in prior.state_dict().items()}
                        best = {"nll": nll, "step": loop.step, "model": weights}
                        steps = {"vqgan": cfg.vqgan_steps if not cfg.stage1 else 0, "disentangler": cfg.steps,
                                 "prior": loop.step}  # fmt: skip
                        meta = _weights_meta(cfg, ctx, steps, {"prior_val_nll": nll})
                        if cfg.stage1:
                            meta["stage1_source"] = str(cfg.stage1)
                        save_phylo(run.run_dir / RUN_FILE, autoencoder, prior, meta)
                    save_resume()
                run.barrier()
    if best["model"] is not None:
        prior.load_state_dict(best["model"])
    return prior.eval().requires_grad_(False)


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
