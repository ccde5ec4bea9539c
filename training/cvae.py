"""Conditional VAE training: one function over (config, run directory).

Data: images (world, CUB, an image folder; the class and the per-image attributes as conditions), scikit-learn's
digits, or the testbed's vectors (seed 004): `gaussian`, `projected` and `swissroll` sets of known intrinsic
dimension, or a CSV table; a vector's conditions are any subset of its own features.
Every step draws which conditions each sample is given (the class with probability `p_class`; no attributes,
all attributes, or each attribute with a per-sample random probability), so one network learns every subset a
user may give at sampling time. Loss: the Gaussian reconstruction NLL (std `sigma`) + beta * KL(q(z|x,c) ||
p(z|c)), the negative ELBO when beta = 1. The prior p(z|c) is the testbed's N(0, I) (`prior: standard`, the
default) or a learned N(m(c), I) (`learned`, see models/cvae.py).
Each step's randomness derives from (seed, step, rank) and the data order from (seed, epoch), so a run resumed
from `last.pt` reaches the same weights as an uninterrupted one, also after a preemption signal
(core.preemption), which saves `last.pt` between two steps. Every `eval_every` steps: held-out ELBO and
per-dimension KL for each condition setting, a sample grid, with `classifier` the rate at which it recognises
class-conditional samples and their within-class spread against real images', `cvae.safetensors` and
`last.pt`. The end adds the KL-per-dimension figure and, on vectors, the testbed's sweep: KL per latent
dimension as 0, 1, ... features are given (kl_sweep.png).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader

from core.config import require_per_process, require_positive, to_dict
from core.device import autocast, loader_settings
from core.errors import UserError
from core.seeding import derive_seed, seed_everything
from datasets.registry import DataConfig
from datasets.vectors import SYNTHETIC, csv_dataset, intrinsic_dimension, synthetic_dataset
from models.cvae import CVAE, PRIORS, RUN_FILE, elbo_terms, save_cvae
from testing import cvae as evaluation
from testing.sampling import save_grid
from training.lifecycle import ShuffledSteps, TrainerConfig, TrainingRun

VECTORS = (*SYNTHETIC, "csv")  # the vector sets of datasets.vectors
DATASETS = ("world", "cub", "folder", "digits", *VECTORS)
EVAL_SEED = 1_000_000  # latents of the evaluation grid and recognition samples start here
REAL_PER_CLASS = 50  # real training images per class the samples' spread is compared with


@dataclass
class CVAEConfig(TrainerConfig):
    PRESETS: ClassVar[str] = "cvae"

    data: DataConfig = field(default_factory=lambda: DataConfig(image_size=32))
    attributes: bool = True  # the dataset's attributes as conditions besides the class
    # vector data (datasets.vectors): the synthetic sets' size and dimensions, or a CSV table
    dim: int = 2  # coordinates of gaussian / projected (their intrinsic dimension)
    projection_dim: int = 8  # observed coordinates of projected
    n_points: int = 10000
    csv: str | None = None
    label_column: str | None = None  # the CSV column naming the classes (none: no classes)
    # model
    arch: str = "conv"
    prior: str = "standard"  # N(0, I), the testbed's; or learned: N(m(c), I)
    latent_dim: int = 16
    channels: int = 32
    max_channels: int = 128
    hidden: int = 256
    layers: int = 3
    depth: int = 1
    # which conditions a training sample is given
    p_class: float = 0.9
    p_attrs_none: float = 0.3
    p_attrs_all: float = 0.3
    # optimisation
    beta: float = 1.0
    sigma: float = 0.1
    batch_size: int = 64
    steps: int = 3000
    lr: float = 1e-3
    # bookkeeping
    eval_every: int = 500
    classifier: str | None = None
    recognition_samples: int = 20  # per class

    def check(self) -> None:
        require_positive(self, "batch_size", "steps", "latent_dim", "channels", "max_channels", "sigma", "hidden",
                         "layers", "depth", "eval_every", "recognition_samples")  # fmt: skip
        if self.data.dataset not in DATASETS:
            raise UserError(
                f"--dataset must be one of {', '.join(DATASETS)} for a CVAE, got {self.data.dataset!r}"
            )
        if self.arch not in ("conv", "mlp"):
            raise UserError(f"--arch must be conv or mlp, got {self.arch!r}")
        if self.data.dataset in ("digits", *VECTORS) and self.arch != "mlp":
            raise UserError(f"--dataset {self.data.dataset} holds vectors: use --arch mlp (its preset does)")
        if self.prior not in PRIORS:
            raise UserError(f"--prior must be one of {', '.join(PRIORS)}, got {self.prior!r}")
        if self.data.dataset == "csv" and not self.csv:
            raise UserError("--dataset csv needs --csv FILE: a table with a header row of feature names")
        if self.csv and self.data.dataset != "csv":
            raise UserError(f"--csv is read with --dataset csv, not {self.data.dataset}")
        if self.label_column and self.data.dataset != "csv":
            raise UserError(f"--label-column names a column of --dataset csv, not of {self.data.dataset}")
        if not self.attributes and self.data.dataset in VECTORS:
            raise UserError(f"--dataset {self.data.dataset}: a vector's features are its conditions; "
                            "--no-attributes would leave only the class")  # fmt: skip
        if self.classifier and self.data.dataset in ("digits", *VECTORS):
            raise UserError(
                f"--classifier judges images; --dataset {self.data.dataset} holds vectors: leave it out"
            )
        require_positive(self, "dim", "projection_dim", "n_points")
        for name in ("p_class", "p_attrs_none", "p_attrs_all"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        if self.p_attrs_none + self.p_attrs_all > 1:
            raise UserError("--p-attrs-none plus --p-attrs-all must not exceed 1")
        if self.beta < 0:
            raise UserError(f"--beta must be >= 0, got {self.beta}")
        require_per_process(self, "batch_size")


# ----------------------------------------------------------------------------
# Data: images of a dataset (with their attributes when it has them) or the digits vectors.


@dataclass
class CVAEData:
    train: object
    val: object
    class_names: list[str]
    attribute_names: list[str]
    x_shape: tuple[int, ...]
    value_range: tuple[float, float]
    dataset_info: dict


def image_spec(cfg: CVAEConfig):

    return cfg.data.spec(cfg.seed)


def vector_data(cfg: CVAEConfig) -> CVAEData:
    """A synthetic set or a CSV table as train and val splits of vectors (datasets.vectors)."""
    name, fraction = cfg.data.dataset, cfg.data.val_fraction
    if name == "csv":
        train, val = (csv_dataset(cfg.csv, s, cfg.label_column, fraction, cfg.seed) for s in ("train", "val"))
        info = {"name": "csv", "csv": str(cfg.csv), "label_column": cfg.label_column}
    else:
        train, val = (synthetic_dataset(name, s, cfg.n_points, cfg.dim, cfg.projection_dim, fraction, cfg.seed)
                      for s in ("train", "val"))  # fmt: skip
        info = {"name": name, "dim": cfg.dim, "intrinsic_dim": intrinsic_dimension(name, cfg.dim),
                "n_points": cfg.n_points}  # fmt: skip
        if name == "projected":
            info["projection_dim"] = cfg.projection_dim
    if len(train) == 0 or len(val) == 0:
        raise UserError(
            f"--dataset {name}: the train or val split is empty (more rows or another --val-fraction)"
        )
    low, high = float(train.x.min()), float(train.x.max())
    info["input_dim"] = train.dim
    return CVAEData(train, val, train.class_names, train.attribute_names, (train.dim,), (low, high), info)


def build_data(cfg: CVAEConfig, quiet: bool = False) -> CVAEData:
    if cfg.data.dataset in VECTORS:
        return vector_data(cfg)
    if cfg.data.dataset == "digits":
        from datasets.digits import SIDE, DigitsDataset

        train, val = (DigitsDataset(s, cfg.data.val_fraction, cfg.seed) for s in ("train", "val"))
        attrs = train.attribute_names if cfg.attributes else []
        info = {"name": "digits", "source": "sklearn.datasets.load_digits"}
        return CVAEData(train, val, train.class_names, attrs, (1, SIDE, SIDE), (0.0, 1.0), info)
    from datasets.registry import build_dataset, resolve_meta
    from datasets.transforms import square_transform

    spec = image_spec(cfg)
    meta = resolve_meta(spec, quiet=quiet)
    transform = square_transform(cfg.data.image_size)
    train, val = (build_dataset(spec, s, False, meta=meta, attributes=None if cfg.attributes else False,
                                transform=transform) for s in ("train", "val"))  # fmt: skip
    if len(train) == 0 or len(val) == 0:
        raise UserError(f"dataset {cfg.data.dataset}: the train or val split is empty (check --val-fraction)")
    attrs = list(train.attribute_names or []) if cfg.attributes else []
    info = {
        "name": cfg.data.dataset,
        "root": str(meta.root),
        "world": cfg.data.world if cfg.data.dataset == "world" else None,
    }
    return CVAEData(
        train, val, meta.class_names, attrs, (3, cfg.data.image_size, cfg.data.image_size), (-1.0, 1.0), info
    )


def unpack(batch: dict, device: torch.device, with_attributes: bool):
    """(x, labels, attributes or None) of a collated batch, on `device`; images are already in [-1, 1]."""
    x = batch["x"] if "x" in batch else batch["image"]
    attributes = batch["attributes"].to(device, non_blocking=True).float() if with_attributes else None
    return x.to(device, non_blocking=True).float(), batch["label"].to(device, non_blocking=True), attributes


def batches(loader, device, with_attributes: bool):
    for batch in loader:
        if "label" in batch:
            yield unpack(batch, device, with_attributes)


# ----------------------------------------------------------------------------
# One step.


def condition_masks(labels: torch.Tensor, attributes: torch.Tensor | None, cfg: CVAEConfig):
    """Which conditions each sample is given: (class present [N], attribute present [N, K] or None)."""
    n, device = labels.shape[0], labels.device
    label_present = (torch.rand(n, device=device) < cfg.p_class).float()
    if attributes is None:
        return label_present, None
    u = torch.rand(n, 1, device=device)
    keep = torch.rand(n, 1, device=device)  # the per-sample share of attributes given in the partial case
    partial = (torch.rand_like(attributes) < keep).float()
    none, everything = u < cfg.p_attrs_none, u >= 1 - cfg.p_attrs_all
    present = torch.where(
        everything, torch.ones_like(partial), torch.where(none, torch.zeros_like(partial), partial)
    )
    return label_present, present


def train_step(net, model: CVAE, opt: torch.optim.Optimizer, x, labels, attributes, cfg: CVAEConfig) -> dict:
    """Draw the conditions, one ELBO step; returns detached device tensors (loss, rec, kl, kl_per_dim)."""
    label_present, attribute_present = condition_masks(labels, attributes, cfg)
    c = model.conditions(x.shape[0], labels, label_present, attributes, attribute_present)
    with autocast(x.device, cfg.hardware.amp):
        recon, mu, logvar, prior = net(x, c)
    terms = elbo_terms(x, recon, mu, logvar, cfg.beta, cfg.sigma, prior)
    opt.zero_grad(set_to_none=True)
    terms["loss"].backward()
    opt.step()
    return {"loss": terms["loss"].detach(), "rec": terms["rec"].detach().mean(), "kl": terms["kl"].detach().mean(),
            "kl_per_dim": terms["kl_per_dim"].detach()}  # fmt: skip


def build_model(cfg: CVAEConfig, data: CVAEData) -> CVAE:
    return CVAE(cfg.arch, data.x_shape, len(data.class_names), len(data.attribute_names), cfg.latent_dim,
                cfg.channels, cfg.max_channels, cfg.hidden, cfg.layers, cfg.depth, cfg.prior)  # fmt: skip


# ----------------------------------------------------------------------------
# Evaluation and snapshots.


def to_images(x: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """Model outputs as [-1, 1] RGB NCHW: vectors become grey images, [0, 1] values are rescaled."""
    low, high = value_range
    x = (x.float() - low) / (high - low) * 2 - 1
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def load_recogniser(path: str, num_classes: int, device: torch.device):
    """A project classifier for the recognition rate, which must know as many classes as the data."""
    from models.classifiers import load_classifier

    clf, meta = load_classifier(path, device=str(device))
    if clf.num_classes != num_classes:
        raise UserError(f"--classifier {path} knows {clf.num_classes} classes, the data {num_classes}")
    return clf.eval().requires_grad_(False), meta.get("image_size")


def real_images(dataset, per_class: int) -> tuple[torch.Tensor, np.ndarray]:
    """Up to `per_class` images of each class of `dataset` (images in [-1, 1]) and their labels."""
    labels = np.asarray(dataset.labels)  # from the split's table: no image is read for its label
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)])
    return torch.stack([torch.as_tensor(dataset[int(i)]["image"]) for i in keep]), labels[keep]


class Evaluator:
    def __init__(self, cfg: CVAEConfig, data: CVAEData, device: torch.device):
        self.cfg, self.data, self.device = cfg, data, device
        settings = {**loader_settings(device, cfg.hardware.num_workers), "persistent_workers": False}
        self.loader = DataLoader(data.val, batch_size=cfg.batch_size, shuffle=False, **settings)
        self.train_loader = DataLoader(data.train, batch_size=cfg.batch_size, shuffle=False, **settings)
        labels = np.asarray([data.val[i]["label"] for i in range(len(data.val))])
        attrs = (
            np.stack([data.val[i]["attributes"] for i in range(len(data.val))])
            if data.attribute_names
            else None
        )
        self.per_class = evaluation.class_attributes(labels, attrs, len(data.class_names))
        self.recogniser, self.real = None, None
        if cfg.classifier:
            self.recogniser = load_recogniser(cfg.classifier, len(data.class_names), device)
            self.real = real_images(data.train, REAL_PER_CLASS)

    def __call__(self, model: CVAE) -> dict:
        with_attributes = bool(self.data.attribute_names)
        result = evaluation.evaluate_elbo(model, batches(self.loader, self.device, with_attributes), self.device,
                                          seed=derive_seed(self.cfg.seed, "eval"), beta=self.cfg.beta, sigma=self.cfg.sigma)  # fmt: skip
        result["fit"] = evaluation.fit_latents(
            model, batches(self.train_loader, self.device, False), self.device
        )
        if self.recogniser is not None:
            classifier, size = self.recogniser
            result["recognition"] = evaluation.recognition(
                model, classifier, self.per_class, self.cfg.recognition_samples, EVAL_SEED, size, self.real
            )
        model.train()
        return result

    def grid(self, model: CVAE, path: Path) -> None:
        """Up to 8 classes (rows) x 8 samples, class only given, from fixed latents (vectors: a scatter of
        samples given nothing beside held-out points)."""
        if self.data.dataset_info["name"] in VECTORS:
            real = torch.as_tensor(np.stack([self.data.val[i]["x"] for i in range(len(self.data.val))]))
            c = model.conditions(len(real))
            samples = evaluation.sample(model, c, list(range(EVAL_SEED, EVAL_SEED + len(real))))
            model.train()
            evaluation.plot_vectors(real, samples.cpu(), self.data.attribute_names, path)
            return
        classes = min(8, model.num_classes)
        labels = torch.arange(classes, device=self.device).repeat_interleave(8)
        c = evaluation.given_conditions(model, "class", labels, None)
        images = evaluation.sample(model, c, list(range(EVAL_SEED, EVAL_SEED + len(labels))))
        model.train()
        save_grid(to_images(images, self.data.value_range), path, columns=8)


def flat_metrics(result: dict) -> dict:
    """The evaluation as log fields: <setting>_<term>, kl_per_dim_<setting> lists, recognition rates."""
    out = {"n": result["n"]}
    for setting, terms in result["settings"].items():
        for key, value in terms.items():
            out[f"kl_per_dim_{setting}" if key == "kl_per_dim" else f"{setting}_{key}"] = value
    out.update({f"fit_{k}": v for k, v in result.get("fit", {}).items()})
    for key in ("class", "all", "chance", "class_spread", "all_spread", "prior_class", "prior_class_spread"):
        if key in result.get("recognition", {}):
            out[f"recognition_{key}"] = result["recognition"][key]
    return out


def weights_meta(cfg: CVAEConfig, data: CVAEData, step: int, result: dict | None) -> dict:
    settings = (result or {}).get("settings", {})
    return {
        "source": "train cvae",
        "dataset": data.dataset_info,
        "class_names": data.class_names,
        "attribute_names": data.attribute_names,
        "value_range": list(data.value_range),
        "step": step,
        "kl_per_dim": {s: v["kl_per_dim"] for s, v in settings.items()},
        "metrics": flat_metrics(result) if result else {},
        "config": to_dict(cfg),
    }


# ----------------------------------------------------------------------------
# The training loop.


def train_cvae(cfg: CVAEConfig, run_dir: Path, resume: bool = False, quiet: bool = False) -> dict:
    """Train, evaluate every `eval_every` steps, keep the latest weights; returns the summary."""
    run = TrainingRun(cfg, run_dir, resume, quiet, tune=False)
    device = run.device
    data = run.prepare(lambda quiet: build_data(cfg, quiet=quiet))
    with_attributes = bool(data.attribute_names)

    seed_everything(cfg.seed)
    model = build_model(cfg, data).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    state, step = run.load_state(), 0
    if state is not None:
        if "fit_mean" in state["model"]:  # the latents fitted at the last evaluation
            model.fit_latents(
                *(state["model"][k] for k in ("fit_class_mean", "fit_class_std", "fit_mean", "fit_std"))
            )
        run.restore(state, model=model, optimizer=opt)
        step = state["step"]
    net = run.ddp(model)
    sampler = ShuffledSteps(data.train, cfg.batch_size // run.world, run.rank, run.world, cfg.seed, step)
    stream = iter(run.loader(data.train, batch_sampler=sampler))
    evaluator = Evaluator(cfg, data, device) if run.main else None
    run.begin()

    def save_resume() -> None:
        state = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "step": loop.step,
            "config": to_dict(cfg),
        }
        run.save_state(state)

    loop = run.steps(cfg.steps, step, name="train cvae", log_every=cfg.log_every, samples_per_step=cfg.batch_size,
                     save=save_resume, state=state, hint="lower --lr")  # fmt: skip
    result = None
    for _ in loop:
        x, labels, attributes = unpack(next(stream), device, with_attributes)
        out = train_step(net, model, opt, x, labels, attributes, cfg)
        loop.log({k: out[k] for k in ("loss", "rec", "kl")}, latest={"kl_per_dim": out["kl_per_dim"]},
                 show=("loss", "kl"))  # fmt: skip
        if loop.due(cfg.eval_every):
            with loop.paused():
                if run.main:
                    result = evaluator(model)
                    run.log.write(loop.step, "val", **flat_metrics(result))
                    evaluator.grid(model, run.run_dir / "samples" / f"step_{loop.step:07d}.png")
                    save_cvae(run.run_dir / RUN_FILE, model, weights_meta(cfg, data, loop.step, result))
                    save_resume()
                run.barrier()

    summary = {"steps": loop.step, "run_dir": str(run_dir)}
    if run.main:
        if result is None:  # resumed a finished run: evaluate what it holds
            result = evaluator(model)
            save_cvae(run.run_dir / RUN_FILE, model, weights_meta(cfg, data, loop.step, result))
        kl = {s: v["kl_per_dim"] for s, v in result["settings"].items()}
        evaluation.plot_kl_per_dim(kl, run.run_dir / "kl_per_dim.png")
        summary["val"] = {
            s: {k: v for k, v in t.items() if k != "kl_per_dim"} for s, t in result["settings"].items()
        }
        summary["active_dims"] = {s: int(sum(v > 0.05 for v in values)) for s, values in kl.items()}
        if "recognition" in result:
            summary["recognition"] = {
                k: v for k, v in result["recognition"].items() if not k.endswith("per_class")
            }
        if data.dataset_info["name"] in VECTORS:
            summary["sweep"] = kl_sweep(model, data, cfg, run.run_dir)
    return run.finish(summary)


def kl_sweep(model: CVAE, data: CVAEData, cfg: CVAEConfig, run_dir: Path) -> list[dict]:
    """The testbed's measure on the held-out vectors: KL per latent dimension as 0, 1, ..., all features are
    given (a random subset per vector), against the data's intrinsic dimension; kl_sweep.png/.csv."""
    x = torch.as_tensor(np.stack([data.val[i]["x"] for i in range(len(data.val))]))
    features = x.shape[1]
    kl = evaluation.kl_by_given_count(
        model, x, list(range(features + 1)), seed=derive_seed(cfg.seed, "sweep")
    )
    info = data.dataset_info
    intrinsic = info.get("intrinsic_dim", features)
    independent = info["name"] == "gaussian"  # only there does each given coordinate remove one to encode
    rows = evaluation.sweep_rows(run_dir.name, info["input_dim"], intrinsic, kl, independent)
    evaluation.plot_kl_sweep(rows, run_dir / "kl_sweep.png")
    return [{k: v for k, v in row.items() if k != "kl_per_dim"} for row in rows]
