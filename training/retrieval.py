"""Contrastive training of the retrieval model (BIOSCAN-CLIP / CLIBD) on a BIOSCAN HDF5 file.

Step-based: step s takes batch s of a per-epoch shuffle seeded by (seed, epoch), and every random draw of the
step (crops, flips, dropout) comes from a generator seeded by (seed, step, rank), so a run resumed from
`last.pt` reaches the same weights as an uninterrupted one. AdamW (weight decay on all parameters, as the
reference) under a OneCycle schedule stepped every iteration; bf16 autocast on CUDA; negatives gathered across
DDP ranks with gradients. Every `eval_every` steps and at the end the model is scored with the BIOSCAN
protocol on the validation queries against all keys; `best.safetensors` keeps the highest mean micro top-1.
SIGUSR1/SIGTERM (SLURM's time limit or preemption) save `last.pt` after the current step and requeue the job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from core import checkpoint
from core.config import require_positive, to_dict
from core.device import autocast
from core.errors import UserError
from core.seeding import seed_everything
from datasets.bioscan.hdf5 import BioscanSplit, check_split
from datasets.bioscan.taxonomy import token_groups
from datasets.registry import check_image_size
from models.retrieval import RetrievalModel, RetrievalSpec
from testing.retrieval.embed import model_inputs
from testing.retrieval.evaluate import parse_pairs, score_model
from testing.retrieval.protocol import selection_score
from training.lifecycle import ShuffledSteps, TrainerConfig, TrainingRun
from training.losses_retrieval import contrastive_loss, modality_pairs

SELECTIONS = ("micro_macro", "micro")


@dataclass
class RetrievalConfig(TrainerConfig):
    PRESETS: ClassVar[str] = "retrieval"

    # data: a BIOSCAN HDF5 file with its fixed splits (no datasets.registry.DataConfig: no val share, crop or
    # image folder to choose), or the synthetic world exported to that layout
    data: str | None = None
    world: str = "default"
    data_dir: str | None = None
    train_split: str = "no_split_and_seen_train"
    val_on: str = "val"
    key_split: str = "all_keys"
    dna_unknown: str = "n"
    # model
    modalities: list[str] = field(default_factory=lambda: ["image", "dna"])
    embed_dim: int = 768
    image_arch: str = "vit_b_16"
    image_size: int = 224
    weights: str = "imagenet"  # image tower: imagenet, none or PATH
    dna_weights: str | None = None  # BarcodeBERT checkpoint (v1 or v2): its tokenisation and BERT size
    dna_k: int | None = None  # None: the checkpoint's, else 5
    dna_stride: int | None = None  # None: the checkpoint's, else k
    dna_max_len: int | None = None  # None: the checkpoint's, else 660
    dna_bert: dict = field(default_factory=dict)
    text_buckets: int = 65536
    text_width: int = 256
    text_layers: int = 2
    temperature: float = 0.07
    learn_temperature: bool = True
    logit_scale_max: float | None = None  # None: unclamped, as CLIBD; else the logit scale's ceiling
    mask_text_duplicates: bool = False  # same taxonomy tokens: not a negative in pairs with text (CLIBD: no)
    mask_same_species: bool = False  # same species: not a negative in image-DNA pairs
    # optimisation (batch_size per process, as CLIBD)
    batch_size: int = 500
    epochs: float = 50
    lr: float = 5e-5  # OneCycle peak at lr_reference_batch records per step
    lr_reference_batch: int | None = 500
    weight_decay: float = 0.01
    pct_start: float = 0.3
    crop_scale: float = 0.08  # smallest area share of RandomResizedCrop (CLIBD: torchvision's 0.08)
    crop_whole_image: bool = True  # crops of the whole resized image (CLIBD); False: of its centre square
    rotation: float = 45.0  # random rotation of +- this many degrees after the crop (CLIBD: 45)
    vflip: bool = True
    # model selection: CLIBD's mean of micro and macro top-1 over every pair, rank and split ("micro_macro"),
    # or the mean micro top-1 ("micro"); no evaluation before eval_skip_epochs (CLIBD: 23 on 1M, 10 on 5M)
    selection: str = "micro_macro"
    eval_skip_epochs: float = 0.0
    # bookkeeping
    eval_every: int = 0  # steps between evaluations; 0: once per epoch
    eval_batch_size: int = 256
    seed: int = 42

    def check(self) -> None:
        require_positive(self, "batch_size", "epochs", "embed_dim", "eval_batch_size")
        check_image_size(self.image_size)
        if self.eval_every < 0:
            raise UserError(f"--eval-every must be >= 0, got {self.eval_every}")
        if not 0 < self.crop_scale <= 1:
            raise UserError(f"--crop-scale must be in (0, 1], got {self.crop_scale}")
        if not 0 <= self.rotation <= 180:
            raise UserError(f"rotation must be between 0 and 180 degrees, got {self.rotation}")
        if self.selection not in SELECTIONS:
            raise UserError(f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if not 0 <= self.eval_skip_epochs < self.epochs:
            raise UserError(f"eval_skip_epochs must be in [0, epochs), got {self.eval_skip_epochs}")
        if self.logit_scale_max is not None and not self.logit_scale_max > 1:
            raise UserError(f"logit_scale_max must be above 1 or null, got {self.logit_scale_max}")
        if not 0 < self.pct_start < 1:
            raise UserError(f"--pct-start must be in (0, 1), got {self.pct_start}")
        self.spec()

    def spec(self) -> RetrievalSpec:
        """The model's spec; with `dna_weights`, the DNA tower's tokenisation and size are the checkpoint's
        (the options may fill what it does not say, and only dropout may differ)."""
        k = self.dna_k or 5
        dna = {"dna_k": k, "dna_stride": self.dna_stride or k, "dna_max_len": self.dna_max_len or 660,
               "dna_bert": dict(self.dna_bert)}  # fmt: skip
        if self.dna_weights and "dna" in self.modalities:
            from models.retrieval.barcodebert import read_barcodebert

            dna = read_barcodebert(
                self.dna_weights, self.dna_k, self.dna_stride, self.dna_max_len, tensors=False
            ).spec_fields()
            dropout = {k: v for k, v in self.dna_bert.items() if k.endswith("dropout_prob")}
            dna["dna_bert"] = {**dna["dna_bert"], **dropout}
        return RetrievalSpec(
            tuple(self.modalities), self.embed_dim, self.image_arch, self.image_size, **dna,
            text_buckets=self.text_buckets, text_width=self.text_width, text_layers=self.text_layers,
            temperature=self.temperature, learn_temperature=self.learn_temperature,
            logit_scale_max=self.logit_scale_max,
        )  # fmt: skip

    def data_path(self, quiet: bool = False) -> Path:
        if self.data:
            return Path(self.data)
        from datasets.bioscan.export import ensure_world_hdf5

        return ensure_world_hdf5(self.world, self.data_dir, quiet=quiet)

    def peak_lr(self, world_size: int) -> float:
        """CLIBD scales the learning rate linearly with the global batch."""
        if not self.lr_reference_batch:
            return self.lr
        return self.lr * self.batch_size * world_size / self.lr_reference_batch


def build_model(cfg: RetrievalConfig) -> RetrievalModel:
    return RetrievalModel(cfg.spec(), image_weights=cfg.weights, dna_weights=cfg.dna_weights)


def train_step(net, model: RetrievalModel, inputs: dict, optimizer, schedule, rank: int, amp: bool,
               targets: dict) -> dict:  # fmt: skip
    """One optimisation step; returns device tensors (no host sync): loss, per-pair losses, logit scale.
    `targets` are the contrastive loss's keyword arguments (text groups, species groups)."""
    with autocast(inputs["dna_ids" if "dna_ids" in inputs else "text_ids"].device, amp):
        out = net(inputs)
    embeddings = {m: out[m] for m in model.spec.modalities}
    loss, per_pair = contrastive_loss(embeddings, out["logit_scale"], rank=rank, **targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()
    return {"loss": loss.detach(), "pairs": per_pair.detach(), "logit_scale": out["logit_scale"].detach()}


def _weights_meta(cfg: RetrievalConfig, model: RetrievalModel, data: Path, step: int, metrics: dict) -> dict:
    return {
        "kind": "retrieval", "spec": model.spec.to_dict(), "preprocessing": model.spec.preprocessing(),
        "dataset": {"path": str(data), "train_split": cfg.train_split}, "step": step, "metrics": metrics,
        "config": to_dict(cfg),
    }  # fmt: skip


def _validate(cfg: RetrievalConfig, model, data: Path, device, pairs, quiet: bool) -> dict:
    splits = [f"{cfg.val_on}_seen", f"{cfg.val_on}_unseen"]
    rows = score_model(model, data, splits, cfg.key_split, pairs, device, cfg.eval_batch_size,
                       cfg.hardware.num_workers, cfg.hardware.amp, quiet=True).rows  # fmt: skip
    flat = {f"{r['query']}_{r['key']}_{r['rank']}_{r['kind']}_{r['metric']}": r["value"]
            for r in rows if r["metric"] in ("micro", "macro") and r["k"] == 1}  # fmt: skip
    return {"score": selection_score(rows, cfg.selection), **flat}


def train_retrieval(cfg: RetrievalConfig, run_dir: Path, resume: bool = False, quiet: bool = False) -> dict:
    """Train, evaluate, keep best and last; returns the summary written to summary.json."""
    run = TrainingRun(cfg, run_dir, resume, quiet, tune=False)
    device = run.device
    data = run.prepare(lambda quiet: cfg.data_path(quiet=quiet))
    modalities = tuple(cfg.modalities)
    for split in (cfg.train_split, f"{cfg.val_on}_seen", f"{cfg.val_on}_unseen", cfg.key_split):
        check_split(data, split, modalities)
    spec = cfg.spec()
    train_set = BioscanSplit(data, cfg.train_split, modalities, spec.load_size, spec.dna_tokenizer,
                             spec.text_tokenizer, cfg.dna_unknown, whole_image=cfg.crop_whole_image)  # fmt: skip

    seed_everything(cfg.seed)
    model = build_model(cfg).to(device)
    net = run.ddp(model)
    sampler = ShuffledSteps(train_set, cfg.batch_size, run.rank, run.world, cfg.seed)
    total_steps = max(1, math.ceil(cfg.epochs * sampler.per_epoch))
    eval_every = cfg.eval_every or sampler.per_epoch
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.peak_lr(run.world), weight_decay=cfg.weight_decay
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.peak_lr(run.world), total_steps=total_steps,
                                                   pct_start=cfg.pct_start, anneal_strategy="cos", cycle_momentum=False)  # fmt: skip
    state, step, best = run.load_state(), 0, {"score": -1.0, "step": None}
    if state is not None:
        run.restore(state, model=model, optimizer=optimizer, schedule=schedule)
        step, best = state["step"], state["best"]
    sampler.start = step
    batches = iter(run.loader(train_set, batch_sampler=sampler))
    pairs = parse_pairs(None, modalities)
    run.begin(data=str(data))

    def save_resume() -> None:
        run.save_state({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                        "step": loop.step, "best": best, "config": to_dict(cfg)})  # fmt: skip

    def fields() -> dict:
        return {"epoch": round(loop.step / sampler.per_epoch, 3), "lr": optimizer.param_groups[0]["lr"]}

    names = [
        f"loss_{a}_{b}" for a, b in modality_pairs([m for m in ("image", "dna", "text") if m in modalities])
    ]
    loop = run.steps(total_steps, step, name="train retrieval", log_every=cfg.log_every,
                     samples_per_step=cfg.batch_size * run.world, save=save_resume, fields=fields,
                     rate_key="records_per_s", state=state)  # fmt: skip
    first_eval = cfg.eval_skip_epochs * sampler.per_epoch  # CLIBD skips evaluating the first epochs
    for _ in loop:
        batch = next(batches)
        inputs = model_inputs(batch, device, cfg.image_size, train=True, vflip=cfg.vflip,
                              crop_scale=(cfg.crop_scale, 1.0), rotation=cfg.rotation)  # fmt: skip
        targets: dict = {}
        if "text_ids" in inputs and cfg.mask_text_duplicates:
            targets["text_groups"] = token_groups(inputs["text_ids"], inputs["text_mask"])
        if cfg.mask_same_species:
            targets["species_groups"] = inputs["lineage"][:, -1]
        model.train()
        out = train_step(net, model, inputs, optimizer, schedule, run.rank, cfg.hardware.amp, targets)
        losses = {
            "loss": out["loss"],
            **dict(zip(names, out["pairs"], strict=True)),
            "logit_scale": out["logit_scale"],
        }
        loop.log(losses, show=("loss",))
        if (loop.step % eval_every == 0 and loop.step >= first_eval) or loop.step == total_steps:
            with loop.paused():
                if run.main:
                    val = _validate(cfg, model, data, device, pairs, quiet)
                    run.log.write(loop.step, "val", epoch=round(loop.step / sampler.per_epoch, 3), **val)
                    if not quiet:
                        print(f"step {loop.step}: val {cfg.selection} top-1 {val['score']:.4f}", flush=True)
                    meta = _weights_meta(cfg, model, data, loop.step, {"val": val})
                    checkpoint.save_weights(run.run_dir / "last.safetensors", model.state_dict(), meta)
                    if val["score"] > best["score"]:
                        best = {"score": val["score"], "step": loop.step}
                        checkpoint.save_weights(run.run_dir / "best.safetensors", model.state_dict(), meta)
                    save_resume()
                run.barrier()

    summary = {
        "best": best,
        "steps": loop.step,
        "epochs": cfg.epochs,
        "data": str(data),
        "run_dir": str(run_dir),
    }
    return run.finish(summary)
