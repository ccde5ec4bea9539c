"""VisCoIN training: Psi, Theta and Omega around a frozen classifier f and a frozen pretrained StyleGAN2 G.

Each optimiser step: B real images plus B images drawn from G, all in [-1, 1] (one pixel convention, so the
reference's real/fake scale mismatch cannot happen); f, G and Omega's synthesis stay in eval mode without
gradients for their weights. Gradient accumulation divides the loss; the learning-rate schedule, evaluation
and checkpoint cadences count optimiser steps. Randomness of each step derives from (seed, step), so a
resumed run reaches the same weights as an uninterrupted one.

`viscoin_step` is that optimisation step as a function (what `bench/bench_viscoin.py` times): bf16 autocast
on CUDA through all of it when `amp` (G's sampling and Omega's synthesis included; StyleGAN2 keeps styles,
demodulation and the running image in float32; the losses reduce in float32), no host sync. The loop sums
its loss parts on the device and reads them once per `log_every` steps, where it checks they are finite
(and before any save). On CUDA: channels_last, fused Adam, uint8 batches augmented on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from core import checkpoint
from core.config import require_positive, to_dict
from core.device import autocast
from core.errors import UserError
from core.seeding import seed_everything
from datasets.gpu_transforms import to_model_batch
from datasets.registry import DataConfig, build_dataset, collate_skipping, resolve_meta
from models.classifiers import load_classifier
from models.stylegan2.checkpoint import load_generator
from models.viscoin import ConceptDecoder, ConceptExtractor, Explainer
from models.viscoin_io import VisCoINModels, part_configs, parts_state
from testing.viscoin.evaluate import (
    SELECT_METRICS,
    evaluate_viscoin,
    fixed_subset,
    load_lpips,
    selection_score,
)
from training import losses_viscoin as losses
from training.lifecycle import DrawnSteps, TrainerConfig, TrainingRun


@dataclass
class VisCoINConfig(TrainerConfig):
    PRESETS: ClassVar[str] = "viscoin"

    # data.image_size: the classifier's, set when training starts
    data: DataConfig = field(default_factory=DataConfig)
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
    amp_lpips: bool = False  # LPIPS-VGG under bf16 too (its input gradients then differ by 15-25%: opt-in)
    compile: bool = False  # torch.compile f and the trainable trio (opt-in: not measured to win yet)

    def check(self) -> None:
        require_positive(self, "batch_size", "iterations", "grad_accum", "n_concepts", "latent_channels",
                         "decoder_lr_multiplier", "eval_every", "eval_images", "checkpoint_every",
                         "lr_decay_every")  # fmt: skip
        for name in ("alpha", "beta", "gamma", "delta", "w_reg", "warmup"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must not be negative")
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
    clf = Path(cfg.classifier) if cfg.classifier else default_checkpoint(cfg.data.dataset, "classifier")
    gan = Path(cfg.generator) if cfg.generator else default_checkpoint(cfg.data.dataset, "gan")
    if not (clf.is_file() or (clf.is_dir() and (clf / "best.safetensors").is_file())):
        raise UserError(
            f"no trained classifier at {clf}: run `python main.py train classifier --dataset {cfg.data.dataset}` "
            f"and pass --classifier RUN_DIR (or copy its best.safetensors + .yaml there)"
        )
    if not gan.exists():
        raise UserError(
            f"no pretrained generator at {gan}: run `python main.py train gan --dataset {cfg.data.dataset}` or "
            f"`python main.py import-gan SNAPSHOT.pkl --out {gan}`, or pass --generator"
        )
    return clf, gan


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


@dataclass
class StepModels:
    """What one optimisation step runs: the frozen f and G, the trainable trio (and its DDP wrapper, which
    the forward goes through), LPIPS (or None)."""

    classifier: torch.nn.Module
    G: torch.nn.Module
    net: VisCoINNet
    lpips: torch.nn.Module | None = None
    ddp: torch.nn.Module | None = None


def viscoin_step(m: StepModels, real: torch.Tensor, optimisers: list[torch.optim.Optimizer],
                 cfg: VisCoINConfig, step: int) -> dict[str, torch.Tensor]:  # fmt: skip
    """One optimisation step on `real` (model input on the device, grad_accum x batch_size images): per
    micro-batch G samples as many images, f encodes both halves, Psi/Theta/Omega forward, f classifies the
    reconstructions, every loss term, backward; then each optimiser steps and zeroes its gradients. Returns
    the loss parts averaged over the micro-batches, as device tensors. No host sync."""
    device, micro = real.device, cfg.batch_size
    extractor, decoder = m.net.extractor, m.net.decoder
    on = 1.0 if step >= cfg.warmup else 0.0  # output fidelity and sparsity after the warm-up
    totals: dict[str, torch.Tensor] = {}
    for part in range(cfg.grad_accum):
        chunk = real[part * micro : (part + 1) * micro]
        with torch.no_grad(), autocast(device, cfg.hardware.amp):
            fake = m.G(torch.randn(len(chunk), m.G.z_dim, device=device), noise_mode="random").clamp(-1, 1)
            x = torch.cat([chunk, fake.to(chunk.dtype)])
            logits_f, features = m.classifier(x)
        with autocast(device, cfg.hardware.amp):
            concepts, logits_theta, x_hat, ws = (m.net if m.ddp is None else m.ddp)(features)
            logits_hat, _ = m.classifier(x_hat)
        distance = None
        if m.lpips is not None and cfg.beta > 0:
            with autocast(device, cfg.hardware.amp and cfg.amp_lpips):
                distance = m.lpips(x_hat, x)
        parts = losses.reconstruction(x_hat, x, logits_f, logits_hat, distance, cfg.beta, cfg.gamma)
        parts["ortho"] = losses.orthogonality(extractor.conv5.weight)
        parts["w_reg"] = losses.w_regulariser(ws, decoder.w_avg)
        parts["of"] = losses.output_fidelity(logits_f, logits_theta)
        parts["sparsity"] = losses.sparsity(concepts)
        loss = (
            parts["rec"]
            + parts["ortho"]
            + cfg.w_reg * parts["w_reg"]
            + on * (cfg.alpha * parts["of"] + cfg.delta * parts["sparsity"])
        )
        (loss / cfg.grad_accum).backward()
        parts["loss"] = loss
        for key, value in parts.items():
            share = value.detach() / cfg.grad_accum
            totals[key] = totals[key] + share if key in totals else share
    for optimiser in optimisers:
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
    return totals


def step_models(classifier, G, net: VisCoINNet, lpips, cfg: VisCoINConfig, ddp=None) -> StepModels:
    """The step's models as `train viscoin` runs them: on CUDA channels_last (f, G, the trio with Omega's
    synthesis, LPIPS's VGG); the trio wrapped by `ddp` (the run's DDP wrapper, which leaves it alone without a
    launcher); f and the trio compiled when `cfg.compile`."""
    device = next(net.parameters()).device
    cuda = device.type == "cuda"
    if cuda:
        for module in (classifier, G, net, lpips):
            if module is not None:
                module.to(memory_format=torch.channels_last)
    wrapped = ddp(net) if ddp is not None else net
    ddp = None if wrapped is net else wrapped
    models = StepModels(classifier, G, net, lpips, ddp)
    if cfg.compile:
        models.classifier, models.ddp = torch.compile(classifier), torch.compile(net if ddp is None else ddp)
    return models


def build_optimisers(net: VisCoINNet, cfg: VisCoINConfig) -> list[torch.optim.Optimizer]:
    """Adam for Psi and Theta, Adam for Omega's trainable part; fused on CUDA."""
    fused = True if next(net.parameters()).device.type == "cuda" else None
    concepts = [*net.extractor.parameters(), *net.explainer.parameters()]
    decoder = [p for p in net.decoder.parameters() if p.requires_grad]
    return [
        torch.optim.Adam(concepts, lr=cfg.lr, fused=fused),
        torch.optim.Adam(decoder, lr=cfg.lr, fused=fused),
    ]


def _lr_factor(cfg: VisCoINConfig):
    """Constant for the first half, then x lr_decay every lr_decay_every optimiser steps (the reference's)."""
    half = cfg.iterations // 2

    def factor(step: int) -> float:
        return cfg.lr_decay ** max(0, (step - half) // cfg.lr_decay_every) if step > half else 1.0

    return factor


def train_viscoin(cfg: VisCoINConfig, run_dir: Path, resume: bool = False, quiet: bool = False) -> dict:
    run = TrainingRun(cfg, run_dir, resume, quiet)
    device = run.device
    clf_path, gan_path = resolve_inputs(cfg)
    classifier, clf_meta = load_classifier(clf_path, device=str(device))
    classifier.eval().requires_grad_(False)
    image_size = int(clf_meta.get("image_size", 0))
    G, gan_meta = load_generator(gan_path, device=device)
    if image_size != G.img_resolution:
        raise UserError(
            f"the classifier works at {image_size} px but the generator makes {G.img_resolution} px images"
        )
    cfg.data.image_size = image_size  # recorded in config.yaml as the size the run works at
    spec = cfg.data.spec(cfg.seed)
    meta = run.prepare(lambda quiet: resolve_meta(spec, quiet=quiet))
    if meta.num_classes != classifier.num_classes:
        raise UserError(
            f"the classifier predicts {classifier.num_classes} classes; dataset {cfg.data.dataset} has {meta.num_classes}"
        )
    train_set = build_dataset(spec, "train", train_transform=True, meta=meta, output="uint8")
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
    models = step_models(classifier, G, net, load_lpips(cfg.lpips_weights, device), cfg, run.ddp)
    lpips = models.lpips
    opt_concepts, opt_decoder = build_optimisers(net, cfg)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, _lr_factor(cfg)) for o in (opt_concepts, opt_decoder)]

    state, step, best = run.load_state(), 0, {"score": float("inf"), "step": None}
    if state is not None:
        run.restore(state, model=net, opt_concepts=opt_concepts, opt_decoder=opt_decoder)
        for schedule, s in zip(schedules, state["schedules"], strict=True):
            schedule.load_state_dict(s)
        step, best = state["step"], state["best"]

    weights_meta = {
        "kind": "viscoin",
        "image_size": image_size,
        "dataset": {"name": cfg.data.dataset, "root": str(meta.root), "num_classes": meta.num_classes, "world": cfg.data.world},
        "class_names": meta.class_names,
        "configs": part_configs(extractor, explainer, decoder),
        "classifier": {"path": str(Path(clf_path if clf_path.is_file() else clf_path / "best.safetensors").resolve()),
                       "hash": checkpoint.file_hash(clf_path if clf_path.is_file() else clf_path / "best.safetensors")},
        "generator": {"path": str(gan_path.resolve()), "source": gan_meta.get("source")},
        "config": to_dict(cfg),
    }  # fmt: skip
    run.begin()
    eval_subset = fixed_subset(val_set, cfg.eval_images, cfg.seed)
    eval_loader = run.loader(eval_subset, persistent=True, batch_size=max(cfg.batch_size, 16), shuffle=False,
                             collate_fn=collate_skipping)  # fmt: skip
    sampler = DrawnSteps(
        len(train_set), cfg.batch_size * cfg.grad_accum, cfg.seed, run.rank, step, cfg.iterations
    )
    batches = iter(run.loader(train_set, batch_sampler=sampler, collate_fn=collate_skipping))

    def save(name: str, metrics: dict) -> None:
        checkpoint.save_weights(run.run_dir / f"{name}.safetensors", parts_state(extractor, explainer, decoder),
                                {**weights_meta, "step": loop.step, "metrics": metrics})  # fmt: skip

    def save_resume() -> None:
        run.save_state({
            "model": net.state_dict(), "opt_concepts": opt_concepts.state_dict(), "opt_decoder": opt_decoder.state_dict(),
            "schedules": [s.state_dict() for s in schedules], "step": loop.step, "best": best, "config": to_dict(cfg),
        })  # fmt: skip

    loop = run.steps(cfg.iterations, step, name="viscoin", log_every=cfg.log_every,
                     samples_per_step=cfg.batch_size * cfg.grad_accum * 2 * run.world, save=save_resume,
                     fields=lambda: {"lr": opt_concepts.param_groups[0]["lr"]}, log_last=False, state=state,
                     what="the VisCoIN loss")  # fmt: skip
    net.train()
    for index in loop:
        real = to_model_batch(next(batches), device, train=True, channels_last=run.cuda)["image"]
        parts = viscoin_step(models, real, [opt_concepts, opt_decoder], cfg, index)
        for schedule in schedules:
            schedule.step()
        loop.log(parts, show=("loss", "rec", "of"))
        if loop.due(cfg.eval_every):
            with loop.paused():
                loop.check_finite()
                parts_now = VisCoINModels(classifier, extractor, explainer, decoder, weights_meta)
                result = evaluate_viscoin(
                    parts_now, eval_loader, device, lpips=lpips, amp=cfg.hardware.amp, progress=False
                )
                net.train()
                run.log.write(loop.step, "val", **result)
                score = selection_score(cfg.select_metric, result)
                if score <= best["score"]:  # ties: the later, longer-trained weights
                    best = {"score": score, "step": loop.step, "metric": cfg.select_metric}
                    if run.main:
                        save("best", result)
                if run.main:
                    save("last", result)
        if run.main and loop.due(cfg.checkpoint_every):
            save_resume()
        if run.env.enabled and loop.step % cfg.checkpoint_every == 0:
            run.barrier()

    summary = {"best": best, "steps": loop.step, "run_dir": str(run_dir)}
    if run.main:
        save("final", {})
        save_resume()
    return run.finish(summary)
