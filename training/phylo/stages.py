"""Phylo-NN's three stages, each on the shared run lifecycle and resumable on its own: the builders of their
networks, one importable step per stage (device tensors in and out, no host sync), the codebooks' restarts, the
evaluations during training, and `train_vqgan_stage`, `train_disentangler_stage` and `train_prior_stage`, which
training.phylo.trainer runs in sequence. The losses are training.phylo.losses'."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from core.config import (
    saved_settings,
    to_dict,
)
from core.device import autocast
from core.errors import UserError
from core.seeding import derive_seed, seed_everything
from datasets.gpu_transforms import mirror
from datasets.phylogeny import Levels
from datasets.registry import collate_skipping
from models.phylo import (
    VQGAN,
    CodePrior,
    PatchDiscriminator,
    PhyloDisentangler,
    PhyloNN,
    load_vqgan,
    save_phylo,
    save_vqgan,
)
from models.phylo.checkpoint import RUN_FILE, VQGAN_RUN_FILE
from testing.phylo import evaluate as phylo_evaluate
from testing.sampling import save_grid
from training.lifecycle import ShuffledSteps, TrainingRun
from training.optim import optimiser_step
from training.phylo.losses import (
    adversary_loss,
    cosine_warm_restarts,
    disentangler_losses,
    vqgan_discriminator_losses,
    vqgan_generator_losses,
)

if TYPE_CHECKING:
    from training.phylo.trainer import PhyloConfig


ADAM_BETAS = (0.5, 0.9)  # taming-transformers' and Phylo-NN's

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
