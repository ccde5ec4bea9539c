"""Tiny trained generators on the small world (8 species, 32 px), built in-process once per test session:
a classifier that recognises the species, a CVAE (class + attributes) and a Phylo-NN run with its baseline."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from core.rundir import prepare_run_dir

_BUILT: dict[tuple[str, Path], Path] = {}
SMALL = {"dataset": "world", "world": "small", "image_size": 32, "device": "cpu", "amp": False}


def _once(name: str, root: Path, build) -> Path:
    """Build once per session, on one thread: these tiny models gain little from two, and one thread does not
    stall when other jobs share the cores (OpenMP oversubscription slowed them 5-10x in our runs)."""
    key = (name, root)
    if key not in _BUILT:
        with single_threaded():
            _BUILT[key] = build(root / name)
    return _BUILT[key]


@contextlib.contextmanager
def single_threaded():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def classifier(root: Path) -> Path:
    """The tiny classifier preset on bird crops (as the tiny CVAE preset sees them) for 12 epochs."""
    from training import classifier as tc

    def build(run: Path) -> Path:
        cfg = tc.ClassifierConfig.preset(
            "tiny",
            {**SMALL, "epochs": 12, "batch_size": 16, "bbox_crop": True},
        )
        tc.train_classifier(cfg, prepare_run_dir(run, "train classifier"), quiet=True)
        return run

    return _once("classifier", root, build)


def cvae(root: Path, steps: int = 300) -> Path:
    """The tiny CVAE preset on the small world (batch 16), evaluated once at the end."""
    from training import cvae as tv

    def build(run: Path) -> Path:
        cfg = tv.CVAEConfig.preset("tiny", {**SMALL, "steps": steps, "batch_size": 16,
                                   "eval_every": steps, "log_every": 50})  # fmt: skip
        tv.train_cvae(cfg, prepare_run_dir(run, "train cvae"), quiet=True)
        return run

    return _once("cvae", root, build)


def phylo(root: Path, steps: int = 30) -> Path:
    """A few steps of every Phylo-NN stage (VQGAN with its discriminator from half-way, disentangler, prior) on
    the small world's bird crops: enough for shapes and plumbing."""
    from training.phylo import trainer as tp

    def build(run: Path) -> Path:
        overrides = {**SMALL, "bbox_crop": True, "vqgan_steps": steps, "steps": steps, "prior_steps": steps,
                     "batch_size": 16, "vqgan_batch_size": 16, "prior_batch_size": 16, "disc_start": steps // 2,
                     "eval_every": steps, "log_every": steps, "prior_eval_every": steps}  # fmt: skip
        cfg = tp.PhyloConfig.preset("tiny", overrides)
        tp.train_phylo(cfg, prepare_run_dir(run, "train phylo"), quiet=True)
        return run

    return _once("phylo", root, build)
