"""Phylo-NN training: one function over (config, run directory), in three stages.

1. Autoencoder (`steps`): L1 reconstruction + VQ loss; the level heads' cross-entropy on the cumulative code
   prefixes (beta * sum over ancestor levels + (1 - beta) * species); and the adversary: a species classifier
   on the free codes, trained on detached codes with its own optimiser, while the encoder minimises
   log(C) - H(adversary(free codes)) through the frozen adversary, so the gradient reaches the free branch of
   the encoder (the reference's adversary ran under no_grad and never did).
2. Prior (`prior_steps`): the code sequences of the training images (mirrored too) under the frozen
   autoencoder; each sample is conditioned on its group at a random level (species included), and the loss
   covers every one of the sequence's tokens, exactly what sampling generates. The prior kept is the one with
   the lowest held-out NLL (checked every `prior_eval_every` steps): it overfits the few training sequences.
3. Baseline (`baseline`): the same autoencoder without heads or adversary, into `baseline/`.
Then the correlation analysis of `testing.phylo` on the test split. Each stage saves its own resume state (at
evaluations, and between two steps when a preemption signal comes, see core.preemption) and draws its
randomness from (seed, stage, step, rank), so a resumed run reaches the same weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from core import checkpoint
from core.atomic import write_text
from core.config import MAX_LR, require_per_process, require_positive, require_range, to_dict, validate_blocks
from core.device import HardwareConfig, autocast
from core.errors import UserError
from core.seeding import derive_seed, seed_everything
from datasets.gpu_transforms import mirror
from datasets.phylogeny import Levels, Tree, build_levels, phylogeny_record
from datasets.registry import DataConfig, DataSpec, build_dataset, collate_skipping, resolve_meta
from datasets.transforms import square_transform
from models.phylo import CodePrior, PhyloAutoencoder, save_phylo, save_plain
from models.phylo.checkpoint import PLAIN_RUN_FILE, RUN_FILE
from testing import phylo as analysis
from testing.sampling import save_grid
from training.lifecycle import ShuffledSteps, TrainingRun
from training.optim import optimiser_step

PRESETS = Path(__file__).parent / "presets" / "phylo.yaml"
DEFAULT_PRESET = {"world": "tiny", "cub": "cub", "folder": "cub"}
ADAM_BETAS = (0.5, 0.9)  # the reference's autoencoder optimiser


@dataclass
class PhyloConfig:
    # data and tree
    data: DataConfig = field(default_factory=lambda: DataConfig(image_size=32))
    mirror: bool = True
    tree: str | None = None
    cuts: list[float] = field(default_factory=lambda: [0.5, 0.8, 0.95])
    # autoencoder
    latent_size: int = 8
    channels: int = 16
    max_channels: int = 128
    depth: int = 1
    branch_channels: int = 16
    embed_dim: int = 16
    n_embed: int = 64
    codes_per_level: int = 4
    free_codes: int = 8
    adversary_hidden: int = 128
    # losses
    vq_beta: float = 0.25
    phylo_weight: float = 0.1
    level_beta: float = 0.5
    adv_weight: float = 0.1
    # optimisation (batch sizes count samples per step over all processes)
    batch_size: int = 32
    steps: int = 3000
    lr: float = 1e-3
    adversary_lr: float = 1e-3
    # prior
    prior_width: int = 64
    prior_layers: int = 2
    prior_heads: int = 4
    prior_steps: int = 1500
    prior_batch_size: int = 64
    prior_lr: float = 1e-3
    prior_dropout: float = 0.1
    prior_eval_every: int = 100
    # baseline and bookkeeping
    baseline: bool = True
    eval_every: int = 500
    log_every: int = 50
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    seed: int = 0

    def validate(self) -> None:
        validate_blocks(self)
        require_positive(self, "latent_size", "channels", "max_channels", "depth", "branch_channels")
        require_range(self, "lr", 0, MAX_LR)
        require_range(self, "adversary_lr", 0, MAX_LR)
        require_range(self, "prior_lr", 0, MAX_LR)
        require_positive(self, "embed_dim", "n_embed", "codes_per_level", "free_codes", "adversary_hidden")
        require_positive(self, "batch_size", "steps", "lr", "adversary_lr", "prior_width", "prior_layers")
        require_positive(
            self,
            "prior_heads",
            "prior_steps",
            "prior_eval_every",
            "prior_batch_size",
            "prior_lr",
            "eval_every",
            "log_every",
        )
        if not self.cuts or any(not 0 < c < 1 for c in self.cuts) or len(set(self.cuts)) != len(self.cuts):
            raise UserError(
                f"--cuts must be distinct relative depths strictly between 0 and 1, got {self.cuts}"
            )
        for name in ("phylo_weight", "adv_weight", "vq_beta"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.prior_dropout < 1:
            raise UserError(f"--prior-dropout must be in [0, 1), got {self.prior_dropout}")
        if not 0 <= self.level_beta <= 1:
            raise UserError(f"--level-beta must be in [0, 1], got {self.level_beta}")
        if self.prior_width % self.prior_heads:
            raise UserError(
                f"--prior-width {self.prior_width} must be a multiple of --prior-heads {self.prior_heads}"
            )
        require_per_process(self, "batch_size", "prior_batch_size")

    @property
    def levels(self) -> int:
        return len(self.cuts) + 1

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
    raise UserError(
        f"--dataset {cfg.data.dataset} needs --tree: a Newick file whose leaves are the class names"
    )


def build_data(cfg: PhyloConfig, quiet: bool):
    spec = cfg.data_spec()
    meta = resolve_meta(spec, quiet=quiet)
    path = tree_path(cfg, meta)
    levels = build_levels(Tree.read(path), meta.class_names, cfg.cuts)
    transform = square_transform(cfg.data.image_size)
    splits = {
        s: build_dataset(spec, s, False, meta=meta, transform=transform) for s in ("train", "val", "test")
    }
    if len(splits["train"]) == 0 or len(splits["val"]) == 0:
        raise UserError(f"dataset {cfg.data.dataset}: the train or val split is empty (check --val-fraction)")
    return meta, path, levels, splits


def eval_loader(dataset, run: TrainingRun):
    return run.loader(dataset, persistent=False, batch_size=run.cfg.batch_size, shuffle=False,
                      collate_fn=collate_skipping)  # fmt: skip


# ----------------------------------------------------------------------------
# Models and steps.


def build_autoencoder(cfg: PhyloConfig, levels: Levels, plain: bool) -> PhyloAutoencoder:
    return PhyloAutoencoder(
        image_size=cfg.data.image_size, latent_size=cfg.latent_size, channels=cfg.channels, max_channels=cfg.max_channels, depth=cfg.depth,
        branch_channels=cfg.branch_channels, embed_dim=cfg.embed_dim, n_embed=cfg.n_embed, levels=cfg.levels,
        codes_per_level=cfg.codes_per_level, free_codes=cfg.free_codes,
        group_counts=[len(g) for g in levels.groups], adversary_hidden=cfg.adversary_hidden, plain=plain,
        vq_beta=cfg.vq_beta,
    )  # fmt: skip


def build_prior(cfg: PhyloConfig, autoencoder: PhyloAutoencoder, levels: Levels) -> CodePrior:
    n_conditions = sum(len(g) for g in levels.groups)
    return CodePrior(cfg.n_embed, autoencoder.sequence_length, n_conditions, cfg.prior_width, cfg.prior_layers,
                     cfg.prior_heads, cfg.prior_dropout)  # fmt: skip


def entropy(logits: torch.Tensor) -> torch.Tensor:
    log_p = logits.float().log_softmax(1)
    return -(log_p.exp() * log_p).sum(1)


def phylo_loss(level_logits: list[torch.Tensor], groups: torch.Tensor, beta: float) -> torch.Tensor:
    """beta * sum of the ancestor levels' cross-entropies + (1 - beta) * the species'; [L, N] group targets."""
    ce = [F.cross_entropy(logits.float(), groups[level]) for level, logits in enumerate(level_logits)]
    if len(ce) == 1:
        return ce[0]
    return beta * torch.stack(ce[:-1]).sum() + (1 - beta) * ce[-1]


def autoencoder_losses(
    model: PhyloAutoencoder, x: torch.Tensor, groups: torch.Tensor, cfg: PhyloConfig
) -> dict:
    """The encoder-side losses with the adversary frozen: rec (L1), vq, phylo (level heads) and confusion
    (log C - entropy of the adversary on the free codes; its gradient reaches the encoder through the frozen
    adversary), their weighted sum `loss`, and the free codes `free` for the adversary's own step."""
    zero = torch.zeros((), device=x.device)
    if not model.plain:
        model.adversary.requires_grad_(False)
    with autocast(x.device, cfg.hardware.amp):
        out = model(x)
    losses = {
        "rec": (out["recon"].float() - x).abs().mean(),
        "vq": out["vq_loss"],
        "phylo": zero,
        "confusion": zero,
    }
    if not model.plain:
        losses["phylo"] = phylo_loss(out["level_logits"], groups, cfg.level_beta)
        n_species = model.adversary[-1].out_features
        losses["confusion"] = (math.log(n_species) - entropy(model.adversary(out["free"]))).mean()
        losses["free"] = out["free"]
    losses["loss"] = (
        losses["rec"]
        + losses["vq"]
        + cfg.phylo_weight * losses["phylo"]
        + cfg.adv_weight * losses["confusion"]
    )
    return losses


def autoencoder_step(
    model: PhyloAutoencoder, opt_ae, opt_adv, x, groups, cfg: PhyloConfig, world: int
) -> dict:
    """One step of both players; returns detached device tensors [rec, vq, phylo, confusion, adversary CE]."""
    losses = autoencoder_losses(model, x, groups, cfg)
    optimiser_step(opt_ae, model, losses["loss"], world)
    adv = torch.zeros((), device=x.device)
    if not model.plain:
        model.adversary.requires_grad_(True)
        adv = F.cross_entropy(model.adversary(losses["free"].detach()).float(), groups[-1])
        optimiser_step(opt_adv, model.adversary, adv, world)
        opt_adv.zero_grad(set_to_none=True)
    parts = [losses[k].detach() for k in ("rec", "vq", "phylo", "confusion")]
    return {"window": torch.stack([*parts, adv.detach()]).double()}


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


# ----------------------------------------------------------------------------
# Evaluation.


@torch.no_grad()
def evaluate_autoencoder(model: PhyloAutoencoder, loader, assignment: torch.Tensor, device) -> dict:
    """Held-out L1, code usage (perplexity of the codebook), level-head and adversary accuracies."""
    model.eval()
    n, l1, hits, adv_hits = 0, 0.0, torch.zeros(model.levels), 0.0
    usage = torch.zeros(model.quantizer.n_embed)
    for batch in loader:
        if "image" not in batch:
            continue
        x, labels = batch["image"].to(device), batch["label"].to(device)
        out = model(x)
        l1 += float((out["recon"].float() - x).abs().mean((1, 2, 3)).sum())
        usage += torch.bincount(out["codes"].flatten().cpu(), minlength=usage.numel()).float()
        if not model.plain:
            groups = assignment[:, labels]
            for level, logits in enumerate(out["level_logits"]):
                hits[level] += float((logits.argmax(1) == groups[level]).sum())
            adv_hits += float((model.adversary(out["free"]).argmax(1) == labels).sum())
        n += x.shape[0]
    model.train()
    p = usage / usage.sum().clamp(min=1)
    result = {"l1": l1 / max(n, 1), "codes_used": int((usage > 0).sum()),
              "perplexity": float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))}  # fmt: skip
    if not model.plain:
        result.update({f"acc_level{lv}": float(h) / max(n, 1) for lv, h in enumerate(hits)})
        result["adversary_acc"] = adv_hits / max(n, 1)
        result["adversary_chance"] = 1.0 / model.adversary[-1].out_features
    return result


def reconstruction_grid(model: PhyloAutoencoder, dataset, path: Path, device) -> None:
    """Top row real images, bottom row reconstructions (8 fixed validation images)."""
    picks = torch.linspace(0, len(dataset) - 1, min(8, len(dataset))).round().long().tolist()
    x = torch.stack([dataset[i]["image"] for i in picks]).to(device)
    with torch.no_grad():
        model.eval()
        recon = model.decode_codes(model.encode_codes(x))
        model.train()
    save_grid(torch.cat([x, recon.clamp(-1, 1)]), path, columns=len(picks))


# ----------------------------------------------------------------------------
# Stages.


def _weights_meta(cfg: PhyloConfig, meta, record: dict, step: dict, metrics: dict) -> dict:
    return {
        "source": "train phylo",
        "dataset": {
            "name": cfg.data.dataset,
            "root": str(meta.root),
            "world": cfg.data.world if cfg.data.dataset == "world" else None,
            "data_dir": cfg.data.data_dir,
            "image_size": cfg.data.image_size,
        },  # fmt: skip
        "phylogeny": record,
        "steps": step,
        "metrics": metrics,
        "config": to_dict(cfg),
    }


def train_autoencoder_stage(run: TrainingRun, ctx, plain: bool, stage_dir: Path, log) -> PhyloAutoencoder:
    """Stage 1 (or the baseline): train the autoencoder, evaluating and saving resume state every `eval_every`;
    `log` is the run's log (the baseline's has its own, `TrainingRun.open_log`)."""
    cfg, device, world = run.cfg, run.device, run.world
    name = "baseline" if plain else "autoencoder"
    seed_everything(derive_seed(cfg.seed, name))
    model = build_autoencoder(cfg, ctx["levels"], plain).to(device)
    trainable = [p for n, p in model.named_parameters() if not n.startswith("adversary.")]
    opt_ae = torch.optim.Adam(trainable, lr=cfg.lr, betas=ADAM_BETAS)
    opt_adv = (
        None
        if plain
        else torch.optim.Adam(model.adversary.parameters(), lr=cfg.adversary_lr, betas=ADAM_BETAS)
    )
    state_name = stage_dir.relative_to(run.run_dir) / f"last_{name}.pt"
    state, step = run.load_state(state_name), 0
    if state is not None:
        checkpoint.load_state_dict_checked(model, state["model"], str(run.run_dir / state_name))
        opt_ae.load_state_dict(state["opt_ae"])
        if opt_adv is not None:
            opt_adv.load_state_dict(state["opt_adv"])
        step = state["step"]
    run.broadcast(model)
    train = ctx["splits"]["train"]
    sampler = ShuffledSteps(train, cfg.batch_size // world, run.rank, world, cfg.seed, step)
    stream = iter(run.loader(train, batch_sampler=sampler, collate_fn=collate_skipping))
    val_loader = eval_loader(ctx["splits"]["val"], run)
    assignment = ctx["assignment"]
    names = ("rec", "vq", "phylo", "confusion", "adversary_ce")

    def save_resume() -> None:
        state = {
            "model": model.state_dict(),
            "opt_ae": opt_ae.state_dict(),
            "step": loop.step,
            "config": to_dict(cfg),
        }
        if opt_adv is not None:
            state["opt_adv"] = opt_adv.state_dict()
        run.save_state(state, state_name)

    loop = run.steps(cfg.steps, step, name=f"train phylo: {name}", log_every=cfg.log_every, samples_per_step=cfg.batch_size,
                     save=save_resume, seed_key=name, stage=name, log=log, state=state)  # fmt: skip
    for _ in loop:
        batch = next(stream)
        if "image" not in batch:
            raise UserError(f"step {loop.step - 1}: a whole batch of unreadable images")
        x = batch["image"].to(device, non_blocking=True)
        x = mirror(x) if cfg.mirror else x
        groups = assignment[:, batch["label"].to(device, non_blocking=True)]
        out = autoencoder_step(model, opt_ae, opt_adv, x, groups, cfg, world)
        parts = dict(zip(names, out["window"], strict=True))
        loop.log({k: parts[k] for k in (("rec", "vq") if plain else names)}, show=("rec",))
        if loop.due(cfg.eval_every):
            with loop.paused():
                if run.main:
                    metrics = evaluate_autoencoder(model, val_loader, assignment, device)
                    log.write(loop.step, "val", stage=name, **metrics)
                    reconstruction_grid(
                        model,
                        ctx["splits"]["val"],
                        stage_dir / "samples" / f"{name}_{loop.step:07d}.png",
                        device,
                    )
                    save_resume()
                    if plain:
                        save_plain(stage_dir / Path(PLAIN_RUN_FILE).name, model,
                                   _weights_meta(cfg, ctx["meta"], ctx["record"], {"autoencoder": loop.step}, metrics))  # fmt: skip
                run.barrier()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def training_codes(model: PhyloAutoencoder, run: TrainingRun, ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of every training image (and of its mirror image when `mirror`), on the device."""
    codes, labels = [], []
    for batch in eval_loader(ctx["splits"]["train"], run):
        if "image" in batch:
            x = batch["image"].to(run.device)
            for view in (x, x.flip(3)) if run.cfg.mirror else (x,):
                codes.append(model.encode_codes(view))
                labels.append(batch["label"].to(run.device))
    return torch.cat(codes), torch.cat(labels)


def train_prior_stage(run: TrainingRun, ctx, autoencoder: PhyloAutoencoder) -> CodePrior:
    cfg, device, world = run.cfg, run.device, run.world
    levels = ctx["levels"]
    seed_everything(derive_seed(cfg.seed, "prior"))
    prior = build_prior(cfg, autoencoder, levels).to(device)
    opt = torch.optim.AdamW(prior.parameters(), lr=cfg.prior_lr, betas=(0.9, 0.95), weight_decay=0.01)
    state, step, best = run.load_state("last_prior.pt"), 0, {"nll": None, "step": None, "model": None}
    if state is not None:
        checkpoint.load_state_dict_checked(prior, state["model"], str(run.run_dir / "last_prior.pt"))
        opt.load_state_dict(state["opt"])
        step, best = state["step"], state["best"]
    run.broadcast(prior)
    codes, labels = training_codes(autoencoder, run, ctx)
    val_codes, val_labels = analysis.encode_dataset(
        autoencoder, eval_loader(ctx["splits"]["val"], run), device
    )
    val_codes, val_labels = val_codes.to(device), val_labels.to(device)
    assignment = ctx["assignment"]
    offsets = torch.tensor(levels.condition_offsets, device=device)
    species_cond = offsets[-1] + val_labels

    def save_resume() -> None:
        state = {
            "model": prior.state_dict(),
            "opt": opt.state_dict(),
            "step": loop.step,
            "best": best,
            "config": to_dict(cfg),
        }
        run.save_state(state, "last_prior.pt")

    loop = run.steps(cfg.prior_steps, step, name="train phylo: prior", log_every=cfg.log_every,
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
                        steps = {"autoencoder": cfg.steps, "prior": loop.step}
                        meta = _weights_meta(cfg, ctx["meta"], ctx["record"], steps, {"prior_val_nll": nll})
                        save_phylo(run.run_dir / RUN_FILE, autoencoder, prior, meta)
                    save_resume()
                run.barrier()
    if best["model"] is not None:
        prior.load_state_dict(best["model"])
    return prior.eval().requires_grad_(False)


def train_phylo(cfg: PhyloConfig, run_dir: Path, resume: bool = False, quiet: bool = False) -> dict:
    """The three stages, then the code-tree correlation analysis; returns the summary (summary.json)."""
    run = TrainingRun(cfg, run_dir, resume, quiet, tune=False)
    meta, path, levels, splits = run.prepare(lambda quiet: build_data(cfg, quiet))
    record = phylogeny_record(path, cfg.cuts, meta.class_names)
    ctx = {"meta": meta, "levels": levels, "splits": splits, "record": record,
           "assignment": torch.as_tensor(levels.assignment, device=run.device)}  # fmt: skip
    log = run.begin()
    if run.main:
        write_text(run.run_dir / "levels.json", json.dumps(levels.summary(), indent=1))
        if not quiet:
            counts = ", ".join(f"level {lv}: {len(g)}" for lv, g in enumerate(levels.groups))
            print(f"tree {path}: groups per level {counts}", flush=True)
    autoencoder = train_autoencoder_stage(run, ctx, False, run.run_dir, log)
    train_prior_stage(run, ctx, autoencoder)
    baseline = None
    if cfg.baseline:
        (run.run_dir / "baseline").mkdir(exist_ok=True)
        baseline_log = run.open_log(run.run_dir / "baseline" / "log.jsonl")
        baseline = train_autoencoder_stage(run, ctx, True, run.run_dir / "baseline", baseline_log)

    summary = {"run_dir": str(run_dir), "steps": {"autoencoder": cfg.steps, "prior": cfg.prior_steps,
                                                  "baseline": cfg.steps if cfg.baseline else 0}}  # fmt: skip
    if run.main:
        test = eval_loader(splits["test"], run)
        codes = analysis.encode_dataset(autoencoder, test, run.device)
        plain = analysis.encode_dataset(baseline, test, run.device) if baseline is not None else None
        result = analysis.correlations(*codes, autoencoder, levels, plain)
        summary["correlation"] = analysis.write_report(result, run.run_dir / "analysis")["levels"]
    run.finish(summary)
    run.barrier()
    return summary
