"""VisCoIN training: Psi, Theta and Omega around a frozen classifier f and a frozen pretrained StyleGAN2 G.

Each optimiser step: B real images plus B images drawn from G, all in [-1, 1] (one pixel convention, so the
reference's real/fake scale mismatch cannot happen); f, G and Omega's synthesis stay in eval mode without
gradients for their weights. Gradient accumulation divides the loss; the learning-rate schedule, evaluation
and checkpoint cadences count optimiser steps. Randomness of each step derives from (seed, step), so a
resumed run (num_workers=0) reaches the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from core import checkpoint, preemption
from core.atomic import write_text
from core.config import MAX_LR, require_positive, require_range, to_dict, to_yaml
from core.device import autocast, loader_settings, resolve_device
from core.distributed import barrier, dist_env, init_distributed
from core.errors import TrainingDiverged, UserError
from core.progress import Progress
from core.rundir import mark_run
from core.runlog import RunLog
from core.seeding import derive_seed, seed_everything
from datasets.registry import DataSpec, build_dataset, collate_skipping, resolve_meta
from models.classifiers import load_classifier
from models.stylegan2.checkpoint import load_generator
from models.viscoin import ConceptDecoder, ConceptExtractor, Explainer
from models.viscoin_io import VisCoINModels, part_configs, parts_state
from testing.viscoin import SELECT_METRICS, evaluate_viscoin, fixed_subset, load_lpips, selection_score
from training import viscoin_losses as losses

PRESETS = Path(__file__).parent / "presets" / "viscoin.yaml"
DEFAULT_PRESET = {"world": "tiny", "cub": "cub", "folder": "cub"}


@dataclass
class VisCoINConfig:
    dataset: str = "world"
    data_dir: str | None = None
    world: str = "default"
    classifier: str | None = None  # default checkpoints/<dataset>/classifier.safetensors
    generator: str | None = None  # default checkpoints/<dataset>/gan.safetensors
    n_concepts: int = 256
    latent_channels: int = 512
    grid: int = 3
    concept_slots: list[int] | None = None
    learn_w_avg: bool = False
    decoder_lr_multiplier: float = 0.01  # equalised-LR multiplier of Omega's heads (the reference's 0.01)
    batch_size: int = 8
    iterations: int = 100000
    grad_accum: int = 1
    lr: float = 1e-4
    alpha: float = 0.5
    beta: float = 3.0
    gamma: float = 0.1
    delta: float = 0.2
    w_reg: float = 1.0  # weight of ||w - w_avg||^2 (the reference's 1)
    warmup: int = 100
    lr_decay: float = 0.8
    lr_decay_every: int = 1000
    lpips_weights: str = "imagenet"
    eval_every: int = 2000
    eval_images: int = 512
    select_metric: str = "fidelity"  # picks best.safetensors (testing.viscoin.SELECT_METRICS)
    checkpoint_every: int = 10000
    log_every: int = 50
    val_fraction: float = 0.1
    device: str = "auto"
    amp: bool = True
    num_workers: int | None = None
    seed: int = 0

    def validate(self) -> None:
        require_positive(self, "batch_size", "iterations", "grad_accum", "lr", "n_concepts", "latent_channels",
                         "decoder_lr_multiplier",
                         "eval_every", "eval_images", "checkpoint_every", "log_every", "lr_decay_every")  # fmt: skip
        for name in ("alpha", "beta", "gamma", "delta", "w_reg", "warmup"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must not be negative")
        require_range(self, "num_workers", 0, optional=True)
        require_range(self, "lr", 0, MAX_LR)
        if self.select_metric not in SELECT_METRICS:
            raise UserError(
                f"--select-metric must be one of {', '.join(SELECT_METRICS)}, got {self.select_metric!r}"
            )
        if self.select_metric == "lpips" and self.lpips_weights == "none":
            raise UserError("--select-metric lpips needs --lpips-weights imagenet|PATH")
        if self.beta > 0 and self.lpips_weights == "none":
            raise UserError(
                "--beta > 0 weights an LPIPS term: give --lpips-weights imagenet|PATH, or --beta 0"
            )


def default_checkpoint(dataset: str, kind: str) -> Path:
    return Path("checkpoints") / dataset / f"{kind}.safetensors"


def resolve_inputs(cfg: VisCoINConfig) -> tuple[Path, Path]:
    """Paths of f and G, naming the command that produces a missing one."""
    clf = Path(cfg.classifier) if cfg.classifier else default_checkpoint(cfg.dataset, "classifier")
    gan = Path(cfg.generator) if cfg.generator else default_checkpoint(cfg.dataset, "gan")
    if not (clf.is_file() or (clf.is_dir() and (clf / "best.safetensors").is_file())):
        raise UserError(
            f"no trained classifier at {clf}: run `python main.py train classifier --dataset {cfg.dataset}` "
            f"and pass --classifier RUN_DIR (or copy its best.safetensors + .yaml there)"
        )
    if not gan.exists():
        raise UserError(
            f"no pretrained generator at {gan}: run `python main.py train gan --dataset {cfg.dataset}` or "
            f"`python main.py import-gan SNAPSHOT.pkl --out {gan}`, or pass --generator"
        )
    return clf, gan


class StepBatches:
    """Batch sampler drawing each step's real images from a generator seeded by (seed, step, rank).

    Steps are independent of each other, so resuming at step s draws exactly what an uninterrupted run draws
    (augmentation too when the images are loaded in this process, num_workers=0).
    """

    def __init__(self, n: int, batch: int, seed: int, rank: int, start: int, stop: int):
        self.n, self.batch, self.seed, self.rank, self.start, self.stop = n, batch, seed, rank, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self):
        for step in range(self.start, self.stop):
            g = torch.Generator().manual_seed(derive_seed(self.seed, "batch", step, self.rank))
            indices = torch.randint(0, self.n, (self.batch,), generator=g).tolist()
            # with num_workers=0 the augmentation of this batch runs right after the yield, on this RNG
            torch.manual_seed(derive_seed(self.seed, "augment", step, self.rank))
            yield indices


class VisCoINNet(torch.nn.Module):
    """The trainable trio in one module (one DDP wrapper): concept maps -> Theta logits and Omega images."""

    def __init__(self, extractor: ConceptExtractor, explainer: Explainer, decoder: ConceptDecoder):
        super().__init__()
        self.extractor, self.explainer, self.decoder = extractor, explainer, decoder

    def forward(self, features):
        concepts, support = self.extractor(features)
        logits_theta = self.explainer(concepts)
        x_hat, ws = self.decoder(concepts, support, noise_mode="const")
        return concepts, logits_theta, x_hat, ws


def _lr_factor(cfg: VisCoINConfig):
    """Constant for the first half, then x lr_decay every lr_decay_every optimiser steps (the reference's)."""
    half = cfg.iterations // 2

    def factor(step: int) -> float:
        return cfg.lr_decay ** max(0, (step - half) // cfg.lr_decay_every) if step > half else 1.0

    return factor


def train_viscoin(cfg: VisCoINConfig, run_dir: Path, resume: bool = False, quiet: bool = False) -> dict:
    cfg.validate()
    preempt = preemption.watch(run_dir)  # SIGUSR1/SIGTERM: save last.pt between two steps, requeue
    env = dist_env()
    device = resolve_device(cfg.device, env.local_rank)
    init_distributed(env, device)
    main = env.is_main
    clf_path, gan_path = resolve_inputs(cfg)
    classifier, clf_meta = load_classifier(clf_path, device=str(device))
    classifier.eval().requires_grad_(False)
    image_size = int(clf_meta.get("image_size", 0))
    G, gan_meta = load_generator(gan_path, device=device)
    if image_size != G.img_resolution:
        raise UserError(
            f"the classifier works at {image_size} px but the generator makes {G.img_resolution} px images"
        )
    spec = DataSpec(cfg.dataset, cfg.data_dir, cfg.world, image_size, cfg.val_fraction, cfg.seed)
    if main:
        meta = resolve_meta(spec, quiet=quiet)
    barrier()
    if not main:
        meta = resolve_meta(spec, quiet=True)
    if meta.num_classes != classifier.num_classes:
        raise UserError(
            f"the classifier predicts {classifier.num_classes} classes; dataset {cfg.dataset} has {meta.num_classes}"
        )
    train_set = build_dataset(spec, "train", train_transform=True, meta=meta)
    val_set = build_dataset(spec, "val", train_transform=False, meta=meta, attributes=None)

    seed_everything(cfg.seed)
    extractor = ConceptExtractor(classifier.feature_channels, cfg.n_concepts, cfg.latent_channels, cfg.grid)
    explainer = Explainer(cfg.n_concepts, meta.num_classes)
    slots = tuple(cfg.concept_slots) if cfg.concept_slots else None
    decoder = ConceptDecoder.from_generator(
        G,
        cfg.n_concepts,
        cfg.grid,
        concept_slots=slots,
        lr_multiplier=cfg.decoder_lr_multiplier,
        learn_w_avg=cfg.learn_w_avg,
    )
    net = VisCoINNet(extractor, explainer, decoder).to(device)
    ddp = net
    if env.enabled:
        ddp = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    opt_concepts = torch.optim.Adam([*extractor.parameters(), *explainer.parameters()], lr=cfg.lr)
    opt_decoder = torch.optim.Adam([p for p in decoder.parameters() if p.requires_grad], lr=cfg.lr)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, _lr_factor(cfg)) for o in (opt_concepts, opt_decoder)]
    lpips = load_lpips(cfg.lpips_weights, device)

    step = 0
    best = {"score": float("inf"), "step": None}
    if resume and (run_dir / "last.pt").is_file():
        state = checkpoint.load_state(run_dir / "last.pt", device=str(device))
        checkpoint.load_state_dict_checked(net, state["model"], str(run_dir / "last.pt"))
        opt_concepts.load_state_dict(state["opt_concepts"])
        opt_decoder.load_state_dict(state["opt_decoder"])
        for schedule, s in zip(schedules, state["schedules"], strict=True):
            schedule.load_state_dict(s)
        step, best = state["step"], state["best"]

    weights_meta = {
        "kind": "viscoin",
        "image_size": image_size,
        "dataset": {"name": cfg.dataset, "root": str(meta.root), "num_classes": meta.num_classes, "world": cfg.world},
        "class_names": meta.class_names,
        "configs": part_configs(extractor, explainer, decoder),
        "classifier": {"path": str(Path(clf_path if clf_path.is_file() else clf_path / "best.safetensors").resolve()),
                       "hash": checkpoint.file_hash(clf_path if clf_path.is_file() else clf_path / "best.safetensors")},
        "generator": {"path": str(gan_path.resolve()), "source": gan_meta.get("source")},
        "config": to_dict(cfg),
    }  # fmt: skip
    if main:
        write_text(run_dir / "config.yaml", to_yaml(cfg))
        mark_run(run_dir, status="running", world_size=env.world_size, device=str(device))
    log = RunLog(run_dir / "log.jsonl", enabled=main, resume_step=step if resume else None)
    eval_subset = fixed_subset(val_set, cfg.eval_images, cfg.seed)
    eval_loader = DataLoader(eval_subset, batch_size=max(cfg.batch_size, 16), shuffle=False,
                             collate_fn=collate_skipping, **loader_settings(device, cfg.num_workers))  # fmt: skip
    micro = cfg.batch_size
    loader = DataLoader(
        train_set,
        batch_sampler=StepBatches(
            len(train_set), micro * cfg.grad_accum, cfg.seed, env.rank, step, cfg.iterations
        ),
        collate_fn=collate_skipping,
        **loader_settings(device, cfg.num_workers),
    )

    def save(name: str, metrics: dict) -> None:
        checkpoint.save_weights(run_dir / f"{name}.safetensors", parts_state(extractor, explainer, decoder),
                                {**weights_meta, "step": step, "metrics": metrics})  # fmt: skip

    def save_resume() -> None:
        checkpoint.save_state(run_dir / "last.pt", {
            "model": net.state_dict(), "opt_concepts": opt_concepts.state_dict(), "opt_decoder": opt_decoder.state_dict(),
            "schedules": [s.state_dict() for s in schedules], "step": step, "best": best, "config": to_dict(cfg),
        })  # fmt: skip

    tick, seen = time.time(), 0
    net.train()
    with Progress(cfg.iterations - step, "viscoin", enabled=main and not quiet) as bar:
        for batch in loader:
            torch.manual_seed(derive_seed(cfg.seed, "step", step, env.rank))
            real_all = batch["image"].to(device, non_blocking=True)
            totals: dict[str, float] = {}
            for part in range(cfg.grad_accum):
                real = real_all[part * micro : (part + 1) * micro]
                with torch.no_grad():
                    fake = G(torch.randn(len(real), G.z_dim, device=device), noise_mode="random").clamp(-1, 1)
                    x = torch.cat([real, fake])
                    with autocast(device, cfg.amp):
                        logits_f, features = classifier(x)
                with autocast(device, cfg.amp):
                    concepts, logits_theta, x_hat, ws = ddp([f.detach() for f in features])
                    logits_hat, _ = classifier(x_hat)
                parts = losses.reconstruction(x_hat, x, logits_f, logits_hat,
                                              lpips(x_hat, x) if lpips is not None and cfg.beta > 0 else None,
                                              cfg.beta, cfg.gamma)  # fmt: skip
                parts["ortho"] = losses.orthogonality(extractor.conv5.weight)
                parts["w_reg"] = losses.w_regulariser(ws, decoder.w_avg)
                parts["of"] = losses.output_fidelity(logits_f, logits_theta)
                parts["sparsity"] = losses.sparsity(concepts)
                on = 1.0 if step >= cfg.warmup else 0.0
                loss = (
                    parts["rec"]
                    + parts["ortho"]
                    + cfg.w_reg * parts["w_reg"]
                    + on * (cfg.alpha * parts["of"] + cfg.delta * parts["sparsity"])
                )
                if not torch.isfinite(loss):
                    raise TrainingDiverged("the VisCoIN loss", step)
                (loss / cfg.grad_accum).backward()
                parts["loss"] = loss
                for key, value in parts.items():
                    totals[key] = totals.get(key, 0.0) + float(value.detach()) / cfg.grad_accum
            opt_concepts.step()
            opt_decoder.step()
            opt_concepts.zero_grad(set_to_none=True)
            opt_decoder.zero_grad(set_to_none=True)
            for schedule in schedules:
                schedule.step()
            step += 1
            seen += len(real_all) * 2 * env.world_size
            bar.update(1, loss=totals["loss"], rec=totals["rec"], of=totals["of"])
            if step % cfg.log_every == 0:
                log.write(step, "train", lr=opt_concepts.param_groups[0]["lr"],
                          images_per_s=round(seen / max(time.time() - tick, 1e-9), 2), **totals)  # fmt: skip
            if step % cfg.eval_every == 0 or step == cfg.iterations:
                models = VisCoINModels(classifier, extractor, explainer, decoder, weights_meta)
                result = evaluate_viscoin(
                    models, eval_loader, device, lpips=lpips, amp=cfg.amp, progress=False
                )
                net.train()
                log.write(step, "val", **result)
                score = selection_score(cfg.select_metric, result)
                if score <= best["score"]:  # ties: the later, longer-trained weights
                    best = {"score": score, "step": step, "metric": cfg.select_metric}
                    if main:
                        save("best", result)
                if main:
                    save("last", result)
            if main and (step % cfg.checkpoint_every == 0 or step == cfg.iterations):
                save_resume()
            if env.enabled and step % cfg.checkpoint_every == 0:
                barrier()
            preempt.check(step, save_resume)

    summary = {"best": best, "steps": step, "run_dir": str(run_dir)}
    if main:
        save("final", {})
        save_resume()
        write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
        mark_run(run_dir, status="finished")
    return summary
