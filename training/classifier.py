"""Classifier training: one optimisation step (`classifier_step`) and the loop around it (`train_classifier`).

Per epoch: shuffled (DistributedSampler) batches of uint8 images from the workers, made model input on the
device with fresh augmentation (`to_model_batch`: batched random resized crops and flips), cross-entropy,
bf16 autocast, channels_last and fused Adam on CUDA, then validation on the held-out part of train. The step
makes no host sync: the loop sums losses on the device and reads them once per `log_every` steps (where it
also checks they are finite). `last.*` is written every epoch, `best.*` when validation top-1 improves.
Resume restores model, optimiser, schedule and counters, and every epoch's randomness derives from
(seed, epoch), so a resumed run reaches the same weights as an uninterrupted one. A preemption signal
(core.preemption) stops it between two steps with a mid-epoch resume state: the resumed run replays the data
of the epoch's finished batches (same order) without training on them, then restores the random state (the
CPU's and the GPU's), and goes on exactly as it would have.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from core import checkpoint, preemption
from core.atomic import write_text
from core.config import MAX_LR, require_positive, require_range, to_dict, to_yaml
from core.device import autocast, autotune, loader_settings, resolve_device
from core.distributed import barrier, dist_env, init_distributed
from core.errors import TrainingDiverged, UserError
from core.progress import Progress
from core.rundir import mark_run
from core.runlog import RunLog
from core.seeding import derive_seed, seed_everything
from datasets.gpu_transforms import to_model_batch
from datasets.registry import (
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    DataSpec,
    build_dataset,
    collate_skipping,
    resolve_meta,
)
from models.classifiers import build_classifier
from testing.metrics import evaluate_classifier
from training.optim import build_optimizer, build_schedule

PRESETS = Path(__file__).parent / "presets" / "classifier.yaml"
DEFAULT_PRESET = {"world": "tiny", "cub": "cub", "folder": "folder"}


@dataclass
class ClassifierConfig:
    # data
    dataset: str = "world"
    data_dir: str | None = None
    world: str = "default"
    image_size: int = 64
    val_fraction: float = 0.1
    bbox_crop: bool = False
    skip_bad_images: bool = False
    # model
    arch: str = "tiny"
    weights: str = "none"
    # optimisation
    batch_size: int = 32
    epochs: int = 10
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    step_size: int = 30
    gamma: float = 0.1
    label_smoothing: float = 0.0
    # hardware and bookkeeping
    device: str = "auto"
    amp: bool = True
    num_workers: int | None = None
    seed: int = 0
    log_every: int = 20
    compile: bool = False  # torch.compile the model (opt-in: not measured to win yet)

    def validate(self) -> None:
        require_positive(self, "batch_size", "epochs", "lr", "log_every")
        require_range(self, "lr", 0, MAX_LR)
        require_range(self, "image_size", MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
        require_range(self, "weight_decay", 0)
        require_range(self, "momentum", 0, 1)
        require_range(self, "num_workers", 0, optional=True)
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")

    def data_spec(self) -> DataSpec:
        return DataSpec(
            self.dataset, self.data_dir, self.world, self.image_size, self.val_fraction, self.seed,
            self.bbox_crop, self.skip_bad_images,
        )  # fmt: skip


def _loader(dataset, cfg: ClassifierConfig, device, env, train: bool) -> DataLoader:
    """Train: DistributedSampler (shuffled per epoch). Eval: each rank takes every world_size-th image, so
    every image is counted exactly once (DistributedSampler would pad with repeats)."""
    if train:
        sampler = DistributedSampler(
            dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=cfg.seed
        )
    else:
        sampler = list(range(env.rank, len(dataset), env.world_size))
    per_rank = len(dataset) // env.world_size
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        drop_last=train and per_rank > cfg.batch_size,  # no size-1 batch for BatchNorm
        collate_fn=collate_skipping,
        **loader_settings(device, cfg.num_workers),
    )


def _weights_meta(cfg: ClassifierConfig, model, meta, epoch: int, metrics: dict) -> dict:
    return {
        "kind": "classifier",
        "model": model.config,
        "image_size": cfg.image_size,
        "dataset": {"name": cfg.dataset, "root": str(meta.root), "num_classes": meta.num_classes},
        "class_names": meta.class_names,
        "epoch": epoch,
        "metrics": metrics,
        "config": to_dict(cfg),
    }


def classifier_step(net, batch: dict, optimizer: torch.optim.Optimizer, cfg: ClassifierConfig) -> dict:
    """One optimisation step on a model-ready batch (`to_model_batch`'s: images and labels on the device):
    bf16 autocast on CUDA when `cfg.amp`, cross-entropy, backward, optimiser step. Returns device tensors:
    the mean `loss` and the number of `correct` top-1 predictions. No host sync."""
    images, labels = batch["image"], batch["label"]
    with autocast(images.device, cfg.amp):
        logits, _ = net(images)
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.detach(), "correct": (logits.detach().argmax(1) == labels).sum()}


def train_classifier(cfg: ClassifierConfig, run_dir: Path, resume: bool = False, quiet: bool = False) -> dict:
    """Train, validate every epoch, keep best and last; returns the summary written to summary.json."""
    cfg.validate()
    preempt = preemption.watch(run_dir)
    env = dist_env()
    device = resolve_device(cfg.device, env.local_rank)
    autotune(device)
    init_distributed(env, device)
    main = env.is_main
    spec = cfg.data_spec()
    if main:
        meta = resolve_meta(spec, quiet=quiet)
    barrier()
    if not main:
        meta = resolve_meta(spec, quiet=True)
    train_set = build_dataset(spec, "train", train_transform=True, meta=meta, output="uint8")
    val_set = build_dataset(spec, "val", train_transform=False, meta=meta, output="uint8")
    if len(train_set) == 0 or len(val_set) == 0:
        raise UserError(f"dataset {cfg.dataset}: the train or val split is empty (check --val-fraction)")
    train_loader = _loader(train_set, cfg, device, env, train=True)
    val_loader = _loader(val_set, cfg, device, env, train=False)

    seed_everything(cfg.seed)
    cuda = device.type == "cuda"
    model = build_classifier(cfg.arch, meta.num_classes, cfg.weights).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    net = model
    if env.enabled:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    if cfg.compile:
        net = torch.compile(net)
    optimizer = build_optimizer(model.parameters(), cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay,
                                fused=cuda)  # fmt: skip
    schedule = build_schedule(optimizer, cfg.schedule, cfg.epochs, cfg.step_size, cfg.gamma)

    start_epoch, step, best = 0, 0, {"top1": -1.0, "epoch": None}
    done, sums, rng = 0, {}, {}  # a mid-epoch state: batches done, epoch and log sums, random states
    if resume and (run_dir / "last.pt").is_file():
        state = checkpoint.load_state(run_dir / "last.pt", device=str(device))
        checkpoint.load_state_dict_checked(model, state["model"], str(run_dir / "last.pt"))
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start_epoch, step, best = state["epoch"], state["step"], state["best"]
        done, sums = state.get("batch", 0), {k: state.get(k) for k in ("epoch_sums", "log_sums", "skipped")}
        rng = {"cpu": state.get("rng"), "cuda": state.get("cuda_rng")}
    if main:
        write_text(run_dir / "config.yaml", to_yaml(cfg))
        mark_run(run_dir, status="running", world_size=env.world_size, device=str(device))
    log = RunLog(run_dir / "log.jsonl", enabled=main, resume_step=step if resume else None)

    def epoch_sums() -> list:  # loss * n, correct, n of this rank's epoch so far (one sync)
        loss_sum, correct = totals.tolist()
        if not math.isfinite(loss_sum):  # never save a model trained on a non-finite loss
            raise TrainingDiverged("the training loss", step)
        return [loss_sum, correct, count]

    def save_mid_epoch() -> None:  # the resume state between two steps, when a preemption signal came
        checkpoint.save_state(run_dir / "last.pt", {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
            "epoch": epoch, "batch": done, "epoch_sums": epoch_sums(), "log_sums": logged, "skipped": skipped,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if cuda else None, "step": step, "best": best,
            "config": to_dict(cfg),
        })  # fmt: skip

    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(derive_seed(cfg.seed, epoch, env.rank))  # augmentation (CPU and GPU) and workers
        train_loader.sampler.set_epoch(epoch)
        net.train()
        seen, tick = 0, time.time()
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss * n, correct (this rank's epoch)
        count, logged, skipped = 0, [0.0, 0.0, 0], 0  # images, the sums at the last log line, unreadable
        with Progress(
            len(train_loader), f"epoch {epoch + 1}/{cfg.epochs}", enabled=main and not quiet
        ) as bar:
            batches = iter(train_loader)
            if done:  # resumed mid-epoch: replay the finished batches' data, then the random state
                bar.update(sum(1 for _ in itertools.islice(batches, done)))
                if env.world_size == 1:  # states loaded onto the device: generators take host tensors
                    torch.set_rng_state(rng["cpu"].cpu())
                    if cuda and rng["cuda"] is not None:
                        torch.cuda.set_rng_state(rng["cuda"].cpu(), device)
                else:  # only rank 0's state was saved: under DDP each rank reseeds (exact on one process)
                    torch.manual_seed(derive_seed(cfg.seed, epoch, env.rank, done))
                totals = torch.tensor(sums["epoch_sums"][:2], dtype=torch.float64, device=device)
                count = int(sums["epoch_sums"][2])
                logged, skipped = sums["log_sums"] or sums["epoch_sums"], sums["skipped"] or 0
            for batch in batches:
                done += 1
                skipped += batch["skipped"]
                if "image" not in batch:
                    bar.update(1)
                    continue
                batch = to_model_batch(batch, device, train=True, channels_last=cuda)
                out = classifier_step(net, batch, optimizer, cfg)
                n = len(batch["label"])
                totals += torch.stack([out["loss"].double() * n, out["correct"].double()])
                step += 1
                count += n
                seen += n * env.world_size
                shown = {}
                if step % cfg.log_every == 0:  # the one host sync of a log interval
                    now = epoch_sums()
                    images = max(now[2] - logged[2], 1)
                    shown = {"loss": (now[0] - logged[0]) / images, "acc": (now[1] - logged[1]) / images}
                    rate = seen / max(time.time() - tick, 1e-9)
                    log.write(step, "train", epoch=epoch + 1, **shown, lr=optimizer.param_groups[0]["lr"],
                              images_per_s=round(rate, 2), skipped=skipped)  # fmt: skip
                    logged, skipped = now, 0
                bar.update(1, **shown)
                preempt.check(step, save_mid_epoch)
        done = 0
        if count:
            loss_sum, correct, n = epoch_sums()
            log.write(step, "train", epoch=epoch + 1, epoch_loss=loss_sum / n, epoch_acc=correct / n)
        schedule.step()
        result = evaluate_classifier(net, val_loader, device, meta.num_classes, amp=cfg.amp, progress=False)
        val = {k: result[k] for k in ("loss", "top1", "top5", "n", "skipped")}
        log.write(step, "val", epoch=epoch + 1, **val)
        if main and not quiet:
            print(
                f"epoch {epoch + 1}: val top-1 {val['top1']:.4f} top-5 {val['top5']:.4f} loss {val['loss']:.4f}"
            )
        finite = torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()  # one sync
        if not math.isfinite(val["loss"]) or not finite:
            raise TrainingDiverged("the model (validation loss or weights)", step)
        improved = val["top1"] > best["top1"]
        if improved:
            best = {"top1": val["top1"], "epoch": epoch + 1}
        if main:
            weights_meta = _weights_meta(cfg, model, meta, epoch + 1, {"val": val})
            checkpoint.save_weights(run_dir / "last.safetensors", model.state_dict(), weights_meta)
            if improved:
                checkpoint.save_weights(run_dir / "best.safetensors", model.state_dict(), weights_meta)
            checkpoint.save_state(run_dir / "last.pt", {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "epoch": epoch + 1, "step": step, "best": best, "config": to_dict(cfg),
            })  # fmt: skip
        barrier()

    summary = {"best": best, "epochs": cfg.epochs, "steps": step, "run_dir": str(run_dir)}
    if main:
        write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
        mark_run(run_dir, status="finished")
    return summary
