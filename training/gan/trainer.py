"""StyleGAN2 training: one function over (config, run directory), in the manner of NVlabs stylegan2-ada.

Every step runs four phases, each with its own optimiser step: G main (non-saturating loss), G reg
(path-length, every `pl_interval` steps when `pl_weight` > 0), D main (logistic loss), D reg (R1 on reals,
every `r1_interval` steps when `gamma` > 0); then the EMA generator follows G. Gradients are averaged over DDP
ranks by hand (one flat all-reduce per phase), which keeps R1's double backward simple. On CUDA with `amp`,
bf16 autocast covers all four phases, the regularisers' double backward included (as NVlabs runs them in its
mixed precision; StyleGAN2 keeps mapping, styles, demodulation and the running image in float32, and the
penalties reduce in float32); channels_last and fused Adam too. `train_step` makes no host sync: the loop
sums the losses on the device and reads them once per `log_every` steps. Each step's randomness derives from
(seed, step, rank) and the data order from (seed, epoch), so a run resumed from `last.pt` reaches the same
weights as an uninterrupted one. Every `snapshot_kimg`: a sample grid from fixed seeds, the Fréchet distance
on a fixed real subset, `G_ema.safetensors`, `last.pt` (and `G_ema_best.safetensors` when the distance improves).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader

from core.atomic import write_text
from core.config import require_per_process, require_positive, to_dict
from core.device import autocast, loader_settings
from core.errors import TrainingDiverged, UserError
from core.seeding import derive_seed, seed_everything
from datasets.gpu_transforms import mirror, to_model_batch
from datasets.registry import DataConfig, DataSpec, build_dataset, collate_skipping, resolve_meta
from datasets.transforms import Uint8Images
from models.stylegan2 import Discriminator, Generator
from models.stylegan2.checkpoint import save_generator
from testing import gan_metrics
from testing.sampling import render, save_grid, z_from_seeds
from training.gan.augment import MODES as AUG_MODES
from training.gan.augment import AugmentPipe, build_augment
from training.gan.losses import (
    d_logistic,
    ema_beta,
    g_nonsaturating,
    lazy_regularization,
    path_length_penalty,
    path_lengths,
    r1_penalty,
    update_ema,
)
from training.lifecycle import ShuffledSteps, TrainerConfig, TrainingRun
from training.optim import optimiser_step

ADAM_BETAS = (0.0, 0.99)
METRIC_SEED = 1_000_000  # latents of the metric's fakes: seeds METRIC_SEED, METRIC_SEED + 1, ...


@dataclass
class GanConfig(TrainerConfig):
    PRESETS: ClassVar[str] = "gan"

    data: DataConfig = field(default_factory=lambda: DataConfig(val_fraction=0.0))  # trains on all of train
    mirror: bool = True
    # networks
    z_dim: int = 512
    w_dim: int = 512
    mapping_layers: int = 8
    channel_base: int = 16384
    channel_max: int = 512
    conv_clamp: float | None = 256.0
    mbstd_group: int = 4
    # optimisation (batch_size counts images per step over all processes, as NVlabs --batch)
    batch_size: int = 32
    kimg: float = 1000.0
    lr: float = 0.0025
    gamma: float = 1.0
    r1_interval: int = 16
    pl_weight: float = 0.0
    pl_interval: int = 4
    pl_batch_shrink: int = 2
    pl_decay: float = 0.01
    style_mixing: float = 0.0
    ema_kimg: float = 10.0
    ema_rampup: float | None = 0.05
    # discriminator augmentation (training/gan/augment.py): ada adapts p towards ada_target, fixed keeps aug_p
    aug: str = "none"
    aug_p: float = 0.0  # fixed p, or ada's initial p
    ada_target: float = 0.6
    ada_interval: int = 4
    ada_kimg: float = 500.0
    # bookkeeping
    snapshot_kimg: float = 50.0
    metric_images: int = 1000
    metric_classifier: str | None = None
    grid_size: int = 64

    def check(self) -> None:
        require_positive(self, "batch_size", "kimg", "snapshot_kimg")
        require_positive(self, "z_dim", "w_dim", "mapping_layers", "channel_base", "channel_max", "ema_kimg")
        require_positive(self, "r1_interval", "pl_interval", "pl_batch_shrink", "metric_images", "grid_size")
        size = self.data.image_size
        if size < 8 or size > 1024 or size & (size - 1):
            raise UserError(
                f"--image-size must be a power of two from 8 to 1024 for StyleGAN2 (e.g. 32, 64, 256), got {size}"
            )
        if self.gamma < 0 or self.pl_weight < 0:
            raise UserError("--gamma and --pl-weight must be >= 0")
        if self.aug not in AUG_MODES:
            raise UserError(f"--aug must be one of {', '.join(AUG_MODES)}, got {self.aug!r}")
        if not 0 <= self.aug_p <= 1 or not 0 < self.ada_target < 1:
            raise UserError(
                f"--aug-p must be in [0, 1] and --ada-target in (0, 1), got {self.aug_p}, {self.ada_target}"
            )
        require_positive(self, "ada_interval", "ada_kimg")
        if not 0 <= self.style_mixing <= 1:
            raise UserError(f"--style-mixing must be in [0, 1], got {self.style_mixing}")
        if self.ema_rampup is not None and self.ema_rampup <= 0:
            raise UserError(f"ema_rampup must be positive or null, got {self.ema_rampup}")
        per_rank = self.batch_size // require_per_process(self, "batch_size")
        if per_rank % min(self.mbstd_group, per_rank):
            raise UserError(
                f"images per process ({per_rank}) must be a multiple of --mbstd-group ({self.mbstd_group})"
            )

    def data_spec(self) -> DataSpec:
        return self.data.spec(self.seed)


# ----------------------------------------------------------------------------
# Data: the train split, resized and centre-cropped to a square by the workers (uint8); [-1, 1] and
# mirroring happen on the batch, on the device.


def real_batch(batch: dict, device: torch.device, cfg: GanConfig, group: int) -> torch.Tensor:
    """A loader batch as D's reals on `device`: [-1, 1] (converted there from the workers' uint8 squares,
    float batches moved), trimmed to a multiple of the minibatch-stddev `group`, mirrored when `cfg.mirror`;
    channels_last on CUDA."""
    real = to_model_batch(batch, device, train=False, channels_last=device.type == "cuda")["image"]
    real = real[: real.shape[0] // group * group]
    return mirror(real) if cfg.mirror else real


# ----------------------------------------------------------------------------
# Networks and optimisation.


def build_networks(cfg: GanConfig) -> tuple[Generator, Discriminator]:
    G = Generator(
        z_dim=cfg.z_dim,
        c_dim=0,
        w_dim=cfg.w_dim,
        img_resolution=cfg.data.image_size,
        img_channels=3,
        mapping_kwargs={"num_layers": cfg.mapping_layers},
        synthesis_kwargs={
            "channel_base": cfg.channel_base,
            "channel_max": cfg.channel_max,
            "conv_clamp": cfg.conv_clamp,
        },
    )
    D = Discriminator(
        c_dim=0,
        img_resolution=cfg.data.image_size,
        img_channels=3,
        channel_base=cfg.channel_base,
        channel_max=cfg.channel_max,
        mbstd_group_size=cfg.mbstd_group,
        conv_clamp=cfg.conv_clamp,
    )
    return G, D


def adam(params, lr: float, interval: int, lazy: bool, fused: bool = False) -> torch.optim.Adam:
    """Adam(0, 0.99), with the lazy-regularisation correction when a regulariser runs every `interval` steps;
    `fused` (CUDA): one kernel for the whole update."""
    betas = ADAM_BETAS
    if lazy:
        lr, betas = lazy_regularization(lr, betas, interval)
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=1e-8, fused=fused or None)


def generate(G: Generator, z: torch.Tensor, style_mixing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, ws) from the training G; with probability `style_mixing` ws after a random cutoff come from
    a second latent (mixing regularisation; drawn on the device and applied as a mask, so no host sync). The
    mapping runs in float32 even inside autocast: its w_avg update mixes dtypes otherwise, and NVlabs keeps it
    in float32 too."""
    with torch.autocast(z.device.type, enabled=False):
        ws = G.mapping(z)
        if style_mixing > 0:
            num_ws = ws.shape[1]
            cutoff = torch.randint(1, num_ws, (), device=z.device)
            cutoff = torch.where(torch.rand((), device=z.device) < style_mixing, cutoff, num_ws)
            mixed = G.mapping(torch.randn_like(z), skip_w_avg_update=True)
            later = torch.arange(num_ws, device=z.device) >= cutoff
            ws = torch.where(later[None, :, None], mixed, ws)
    return G.synthesis(ws), ws


# ----------------------------------------------------------------------------
# Training state and one step.


@dataclass
class GanState:
    """Everything a resumed run needs: networks, optimisers, the path-length mean and the counters."""

    G: Generator
    D: Discriminator
    G_ema: Generator
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    pl_mean: torch.Tensor
    step: int = 0
    nimg: int = 0
    best: dict = dataclasses.field(default_factory=lambda: {"fd": None, "kimg": None})
    augment: AugmentPipe | None = None  # D's augmentation, p and the ADA statistics in its buffers

    def to_resume_state(self, cfg: GanConfig) -> dict:
        """Tensors and plain values only (loadable with weights_only=True)."""
        return {
            "G": self.G.state_dict(), "D": self.D.state_dict(), "G_ema": self.G_ema.state_dict(),
            "opt_G": self.opt_G.state_dict(), "opt_D": self.opt_D.state_dict(),
            "pl_mean": self.pl_mean.detach().cpu(), "step": self.step, "nimg": self.nimg, "best": self.best,
            "config": to_dict(cfg), "augment": self.augment.state_dict() if self.augment is not None else None,
        }  # fmt: skip

    def load(self, state: dict) -> None:
        """The counters, path-length mean and augmentation of a resume state that `to_resume_state` made (the
        lifecycle's `restore` loads the networks and optimisers)."""
        self.pl_mean = state["pl_mean"].to(self.pl_mean.device)
        self.step, self.nimg, self.best = state["step"], state["nimg"], state["best"]
        if self.augment is not None and state.get("augment") is not None:
            self.augment.load_state_dict(state["augment"])


def new_state(cfg: GanConfig, device: torch.device) -> GanState:
    """Networks initialised from `cfg.seed` (identical on every rank) and their Adam optimisers."""
    seed_everything(cfg.seed)
    G, D = build_networks(cfg)
    G, D = G.to(device).train(), D.to(device).train()
    cuda = device.type == "cuda"
    if cuda:
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    opt_G = adam(G.parameters(), cfg.lr, cfg.pl_interval, cfg.pl_weight > 0, fused=cuda)
    opt_D = adam(D.parameters(), cfg.lr, cfg.r1_interval, cfg.gamma > 0, fused=cuda)
    augment = build_augment(cfg.aug, cfg.aug_p, device)
    return GanState(G, D, G_ema, opt_G, opt_D, torch.zeros([], device=device), augment=augment)


def run_D(s: GanState, images: torch.Tensor) -> torch.Tensor:
    """D's logits, on augmented images when augmentation is on (reals, fakes and R1 alike, as NVlabs)."""
    return s.D(s.augment(images) if s.augment is not None else images)


def train_step(s: GanState, real: torch.Tensor, cfg: GanConfig, world: int, amp: bool) -> dict:
    """G main, G reg, D main, D reg, EMA; returns detached device tensors for the log (losses, D scores,
    penalties). bf16 autocast over every phase when `amp` (CUDA). No host sync."""
    n, device = real.shape[0], real.device
    out = {}
    s.G.requires_grad_(True)
    s.D.requires_grad_(False)
    with autocast(device, amp):
        fake, _ = generate(s.G, torch.randn(n, cfg.z_dim, device=device), cfg.style_mixing)
        loss_G = g_nonsaturating(run_D(s, fake))
    optimiser_step(s.opt_G, s.G, loss_G, world)
    if cfg.pl_weight > 0 and s.step % cfg.pl_interval == 0:
        with autocast(device, amp):
            images, ws = generate(s.G, torch.randn(max(1, n // cfg.pl_batch_shrink), cfg.z_dim, device=device),
                                  cfg.style_mixing)  # fmt: skip
            lengths = path_lengths(images, ws)
        penalty, pl_mean = path_length_penalty(lengths.float(), s.pl_mean, cfg.pl_decay)
        s.pl_mean = pl_mean.detach()
        optimiser_step(s.opt_G, s.G, penalty.mean() * cfg.pl_weight * cfg.pl_interval, world)
        out["pl"], out["pl_mean"] = penalty.detach().mean(), s.pl_mean

    s.G.requires_grad_(False)
    s.D.requires_grad_(True)
    with autocast(device, amp):
        with torch.no_grad():
            fake, _ = generate(s.G, torch.randn(n, cfg.z_dim, device=device), cfg.style_mixing)
        fake_logits, real_logits = run_D(s, fake), run_D(s, real)
        loss_D = d_logistic(real_logits, fake_logits)
    optimiser_step(s.opt_D, s.D, loss_D, world)
    if s.augment is not None:
        if cfg.aug == "ada":  # r_t from the signs of D on (augmented) reals; p moves every ada_interval steps
            s.augment.observe(real_logits)
            if (s.step + 1) % cfg.ada_interval == 0:
                out["ada_r_t"] = s.augment.adjust(
                    cfg.ada_target, cfg.batch_size * cfg.ada_interval, cfg.ada_kimg, world
                )
        out["aug_p"] = s.augment.p.clone()
    if cfg.gamma > 0 and s.step % cfg.r1_interval == 0:
        real_in = real.detach().requires_grad_(True)  # R1 on the reals before augmentation, through it
        with autocast(device, amp):
            penalty = r1_penalty(real_in, run_D(s, real_in))
        optimiser_step(s.opt_D, s.D, penalty.mean() * (cfg.gamma / 2) * cfg.r1_interval, world)
        out["r1"] = penalty.detach().mean()

    update_ema(s.G_ema, s.G, ema_beta(cfg.batch_size, s.nimg, cfg.ema_kimg, cfg.ema_rampup))
    s.nimg += cfg.batch_size
    s.step += 1
    scores = torch.stack([real_logits.detach().float().mean(), fake_logits.detach().float().mean()])
    return {"window": torch.stack([loss_G.detach(), loss_D.detach(), *scores]).double(), **out}


# ----------------------------------------------------------------------------
# Snapshots: sample grid, metric, weights, resume state.


class Evaluator:
    """The fixed-subset Fréchet distance: real statistics computed once, fakes from fixed seeds."""

    def __init__(self, cfg: GanConfig, dataset, device: torch.device, batch_size: int):
        self.extractor = gan_metrics.build_extractor(cfg.metric_classifier, device)
        self.key = f"fd_{self.extractor.name}"
        self.batch_size = batch_size
        n = min(cfg.metric_images, len(dataset))
        indices = np.unique(np.linspace(0, len(dataset) - 1, n).round().astype(int)).tolist()
        settings = {**loader_settings(device, cfg.hardware.num_workers), "persistent_workers": False}
        subset = torch.utils.data.Subset(dataset, indices)
        loader = DataLoader(subset, batch_size=batch_size, collate_fn=collate_skipping, **settings)
        reals = (to_model_batch(b, device, train=False)["image"] for b in loader if "image" in b)
        self.real_stats = gan_metrics.feature_statistics(gan_metrics.extract_features(self.extractor, reals))
        self.n = len(indices)
        self.z = z_from_seeds(list(range(METRIC_SEED, METRIC_SEED + self.n)), cfg.z_dim)
        self.seed = derive_seed(cfg.seed, "metric")

    def __call__(self, G_ema: Generator) -> dict:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            fakes = gan_metrics.generated_batches(
                lambda z: render(G_ema, z, noise_mode="random"), self.z, self.batch_size
            )
            stats = gan_metrics.feature_statistics(gan_metrics.extract_features(self.extractor, fakes))
        return {self.key: gan_metrics.frechet_distance(*self.real_stats, *stats), "fd_images": self.n}


def _weights_meta(cfg: GanConfig, meta, s: GanState, metrics: dict) -> dict:
    return {
        "source": "train gan",
        "dataset": {"name": cfg.data.dataset, "root": str(meta.root), "image_size": cfg.data.image_size},
        "kimg": s.nimg / 1000,
        "step": s.step,
        "metrics": metrics,
        "config": to_dict(cfg),
    }


def snapshot(run: TrainingRun, meta, s: GanState, evaluator: Evaluator, batch: int) -> None:
    """Rank 0: sample grid (+ its seeds), metric (logged), G_ema (+ best), then last.pt."""
    cfg, run_dir = run.cfg, run.run_dir
    grid = run_dir / "samples" / f"fakes_{s.step:07d}.png"
    seeds = list(range(cfg.grid_size))  # `generate gan --seed 0` renders the same images
    save_grid(torch.cat([render(s.G_ema, z) for z in z_from_seeds(seeds, cfg.z_dim).split(batch)]), grid)
    info = {"step": s.step, "kimg": s.nimg / 1000, "seeds": seeds, "truncation": 1.0, "noise_mode": "const"}
    write_text(grid.with_suffix(".json"), json.dumps(info, indent=2))

    if not all(torch.isfinite(p).all() for p in s.G_ema.parameters()):
        raise TrainingDiverged("the generator's weights", s.step)
    metrics = evaluator(s.G_ema)
    run.log.write(s.step, "val", kimg=s.nimg / 1000, **metrics)
    value = metrics[evaluator.key]
    if not run.quiet:
        print(f"kimg {s.nimg / 1000:.1f}: {evaluator.key} {value:.4f} ({evaluator.n} images)", flush=True)
    weights_meta = _weights_meta(cfg, meta, s, metrics)
    save_generator(run_dir / "G_ema.safetensors", s.G_ema, weights_meta)
    if s.best["fd"] is None or value < s.best["fd"]:
        s.best = {"fd": value, "kimg": s.nimg / 1000, "metric": evaluator.key}
        save_generator(run_dir / "G_ema_best.safetensors", s.G_ema, weights_meta)
    run.save_state(s.to_resume_state(cfg))


# ----------------------------------------------------------------------------
# The training loop.


def train_gan(cfg: GanConfig, run_dir: Path, resume: bool = False, quiet: bool = False) -> dict:
    """Train G and D, snapshot every `snapshot_kimg`; returns the summary written to summary.json."""
    run = TrainingRun(cfg, run_dir, resume, quiet)
    device, world = run.device, run.world
    per_rank = cfg.batch_size // world
    group = min(cfg.mbstd_group, per_rank)
    spec = cfg.data_spec()
    meta = run.prepare(lambda quiet: resolve_meta(spec, quiet=quiet))
    dataset = build_dataset(
        spec, "train", train_transform=False, meta=meta, transform=Uint8Images(cfg.data.image_size, "square")
    )

    s = new_state(cfg, device)
    state = run.load_state()
    if state is not None:
        run.restore(state, G=s.G, D=s.D, G_ema=s.G_ema, opt_G=s.opt_G, opt_D=s.opt_D)
        s.load(state)
    run.broadcast(s.G, s.D, s.G_ema)
    sampler = ShuffledSteps(dataset, per_rank, run.rank, world, cfg.seed, start=s.step)
    batches = iter(run.loader(dataset, batch_sampler=sampler, collate_fn=collate_skipping))
    evaluator = Evaluator(cfg, dataset, device, per_rank) if run.main else None
    run.begin()
    if run.main and s.step == 0:
        reals = collate_skipping([dataset[i] for i in range(min(cfg.grid_size, len(dataset)))])
        save_grid(to_model_batch(reals, "cpu", train=False)["image"], run.run_dir / "samples" / "reals.png")

    total_steps = math.ceil(cfg.kimg * 1000 / cfg.batch_size)
    snapshot_nimg = max(1, round(cfg.snapshot_kimg * 1000))
    loop = run.steps(total_steps, s.step, name="train gan", log_every=cfg.log_every, samples_per_step=cfg.batch_size,
                     save=lambda: run.save_state(s.to_resume_state(cfg)), fields=lambda: {"kimg": s.nimg / 1000},
                     log_last=False, state=state, what="the GAN loss")  # fmt: skip
    for _ in loop:
        batch = next(batches)
        if "image" not in batch or batch["image"].shape[0] < group:
            raise UserError(f"step {s.step}: too many unreadable images in one batch to train on")
        previous = s.nimg
        out = train_step(s, real_batch(batch, device, cfg, group), cfg, world, cfg.hardware.amp)
        window = dict(zip(("loss_G", "loss_D", "d_real", "d_fake"), out.pop("window"), strict=True))
        loop.log(window, latest=out, show=tuple(window))
        if s.nimg // snapshot_nimg > previous // snapshot_nimg or s.step == total_steps:
            with loop.paused():
                if run.main:
                    loop.check_finite()  # nothing trained on a non-finite loss is snapshot
                    snapshot(run, meta, s, evaluator, per_rank)
                run.barrier()

    summary = {"best": s.best, "kimg": s.nimg / 1000, "steps": s.step, "run_dir": str(run_dir)}
    if run.main and not (run.run_dir / "G_ema.safetensors").is_file():  # resumed a run that had finished
        save_generator(run.run_dir / "G_ema.safetensors", s.G_ema, _weights_meta(cfg, meta, s, {}))
    return run.finish(summary)
