"""Classifier training: one optimisation step (`classifier_step`) and the loop around it (`train_classifier`).

Per epoch: shuffled (each rank its share) batches of uint8 images from the workers, made model input on the
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

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from core import checkpoint
from core.config import require_positive, require_range, to_dict
from core.device import autocast
from core.errors import TrainingDiverged, UserError
from core.seeding import seed_everything
from datasets.gpu_transforms import to_model_batch
from datasets.registry import DataConfig, DataSpec, build_dataset, collate_skipping, resolve_meta
from models.classifiers import build_classifier
from testing.metrics import evaluate_classifier
from training.lifecycle import LossWindow, TrainerConfig, TrainingRun
from training.optim import build_optimizer, build_schedule


@dataclass
class ClassifierConfig(TrainerConfig):
    PRESETS: ClassVar[str] = "classifier"

    data: DataConfig = field(default_factory=DataConfig)
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
    log_every: int = 20
    compile: bool = False  # torch.compile the model (opt-in: not measured to win yet)

    def check(self) -> None:
        require_positive(self, "batch_size", "epochs")
        require_range(self, "weight_decay", 0)
        require_range(self, "momentum", 0, 1)
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")

    def data_spec(self) -> DataSpec:
        return self.data.spec(self.seed)


def _weights_meta(cfg: ClassifierConfig, model, meta, epoch: int, metrics: dict) -> dict:
    return {
        "kind": "classifier",
        "model": model.config,
        "image_size": cfg.data.image_size,
        "dataset": {"name": cfg.data.dataset, "root": str(meta.root), "num_classes": meta.num_classes},
        "class_names": meta.class_names,
        "epoch": epoch,
        "metrics": metrics,
        "config": to_dict(cfg),
    }


def classifier_step(net, batch: dict, optimizer: torch.optim.Optimizer, cfg: ClassifierConfig) -> dict:
    """One optimisation step on a model-ready batch (`to_model_batch`'s: images and labels on the device):
    bf16 autocast on CUDA when `cfg.hardware.amp`, cross-entropy, backward, optimiser step. Returns device tensors:
    the mean `loss` and the number of `correct` top-1 predictions. No host sync."""
    images, labels = batch["image"], batch["label"]
    with autocast(images.device, cfg.hardware.amp):
        logits, _ = net(images)
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.detach(), "correct": (logits.detach().argmax(1) == labels).sum()}


def train_classifier(cfg: ClassifierConfig, run_dir: Path, resume: bool = False, quiet: bool = False) -> dict:
    """Train, validate every epoch, keep best and last; returns the summary written to summary.json."""
    run = TrainingRun(cfg, run_dir, resume, quiet)
    device, spec = run.device, cfg.data_spec()
    meta = run.prepare(lambda quiet: resolve_meta(spec, quiet=quiet))
    train_set = build_dataset(spec, "train", train_transform=True, meta=meta, output="uint8")
    val_set = build_dataset(spec, "val", train_transform=False, meta=meta, output="uint8")
    if len(train_set) == 0 or len(val_set) == 0:
        raise UserError(f"dataset {cfg.data.dataset}: the train or val split is empty (check --val-fraction)")
    train_loader = run.shuffled_loader(train_set, cfg.batch_size, cfg.seed, collate_fn=collate_skipping)
    val_loader = run.sharded_loader(val_set, cfg.batch_size, collate_fn=collate_skipping)

    seed_everything(cfg.seed)
    model = build_classifier(cfg.arch, meta.num_classes, cfg.weights).to(device)
    if run.cuda:
        model = model.to(memory_format=torch.channels_last)
    net = run.ddp(model)
    if cfg.compile:
        net = torch.compile(net)
    optimizer = build_optimizer(model.parameters(), cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay,
                                fused=run.cuda)  # fmt: skip
    schedule = build_schedule(optimizer, cfg.schedule, cfg.epochs, cfg.step_size, cfg.gamma)

    state = run.load_state()
    start_epoch, step, best = 0, 0, {"top1": -1.0, "epoch": None}
    if state is not None:
        run.restore(state, model=model, optimizer=optimizer, schedule=schedule)
        start_epoch, step, best = state["epoch"], state["step"], state["best"]
    run.begin(resume_step=step)

    def resume_state(epoch: int) -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "epoch": epoch, "step": step, "best": best, "config": to_dict(cfg)}  # fmt: skip

    def save_mid_epoch() -> None:  # a preemption signal came between two steps
        run.save_state({**resume_state(epoch), "epoch_window": totals.state(), "skipped": skipped})

    def fields() -> dict:
        nonlocal skipped
        out = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "skipped": skipped}
        skipped = 0
        return out

    for epoch in range(start_epoch, cfg.epochs):
        mid = state is not None and state.get("epoch") == epoch and state.get("batch")
        totals = LossWindow(
            state.get("epoch_window") if mid else None
        )  # the epoch's sums: one sync, at its end
        skipped = state.get("skipped", 0) if mid else 0  # unreadable images since the last log line
        loop = run.epoch(train_loader, epoch, step, epochs=cfg.epochs, state=state, name="train classifier",
                         log_every=cfg.log_every, samples_per_step=cfg.batch_size * run.world, save=save_mid_epoch,
                         fields=fields, what="the training loss")  # fmt: skip
        net.train()
        for batch in loop:
            skipped += batch["skipped"]
            if "image" not in batch:
                continue
            batch = to_model_batch(batch, device, train=True, channels_last=run.cuda)
            out = classifier_step(net, batch, optimizer, cfg)
            n = len(batch["label"])
            sums = {"loss": out["loss"] * n, "acc": out["correct"]}
            totals.add(sums, weight=n)
            loop.log(sums, weight=n)
            step = loop.step
        if not totals.empty():
            means, _ = totals.read()
            run.log.write(step, "train", epoch=epoch + 1, epoch_loss=means["loss"], epoch_acc=means["acc"])
            if not all(
                math.isfinite(v) for v in means.values()
            ):  # never save a model trained on a non-finite loss
                raise TrainingDiverged("the training loss", step)
        schedule.step()
        result = evaluate_classifier(
            net, val_loader, device, meta.num_classes, amp=cfg.hardware.amp, progress=False
        )
        val = {k: result[k] for k in ("loss", "top1", "top5", "n", "skipped")}
        run.log.write(step, "val", epoch=epoch + 1, **val)
        if run.main and not quiet:
            print(
                f"epoch {epoch + 1}: val top-1 {val['top1']:.4f} top-5 {val['top5']:.4f} loss {val['loss']:.4f}"
            )
        finite = torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()  # one sync
        if not math.isfinite(val["loss"]) or not finite:
            raise TrainingDiverged("the model (validation loss or weights)", step)
        improved = val["top1"] > best["top1"]
        if improved:
            best = {"top1": val["top1"], "epoch": epoch + 1}
        if run.main:
            weights_meta = _weights_meta(cfg, model, meta, epoch + 1, {"val": val})
            checkpoint.save_weights(run.run_dir / "last.safetensors", model.state_dict(), weights_meta)
            if improved:
                checkpoint.save_weights(run.run_dir / "best.safetensors", model.state_dict(), weights_meta)
            run.save_state(resume_state(epoch + 1))
        run.barrier()

    return run.finish({"best": best, "epochs": cfg.epochs, "steps": step, "run_dir": str(run_dir)})
