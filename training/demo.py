"""The quickstart pipeline on the synthetic world: build it, train a classifier, test it, plot its logs."""

from __future__ import annotations

from pathlib import Path

from core.config import from_preset
from core.rundir import mark_run, prepare_run_dir
from testing.classifier import run_classifier_test
from testing.runlogs import plot_run_log
from training.classifier import PRESETS, ClassifierConfig, train_classifier


def run_demo(
    out: Path, world: str = "default", epochs: int | None = None, device: str = "auto", quiet: bool = False
) -> dict:
    """Run every stage into sub-folders of `out`; returns the paths of what a user should look at."""
    prepare_run_dir(out, "demo")
    say = (lambda *_: None) if quiet else print
    say(f"[1/3] world '{world}' + classifier training -> {out / 'classifier'}")
    cfg = from_preset(
        ClassifierConfig,
        PRESETS,
        "tiny",
        {"dataset": "world", "world": world, "epochs": epochs, "device": device},
    )
    train_dir = prepare_run_dir(out / "classifier", "train classifier")
    summary = train_classifier(cfg, train_dir, quiet=quiet)
    say(f"[2/3] test on the held-out species images -> {out / 'test'}")
    test_dir = prepare_run_dir(out / "test", "test classifier")
    metrics = run_classifier_test(train_dir / "best.safetensors", test_dir, device=device, quiet=quiet)
    say(f"[3/3] training curves -> {train_dir / 'logs'}")
    curves = plot_run_log(train_dir)
    mark_run(out, status="finished")
    return {
        "val_top1": summary["best"]["top1"],
        "test_top1": metrics["top1"],
        "test_top5": metrics["top5"],
        "figures": [str(curves["figure"]), str(test_dir / "confusion.png")],
        "tables": [str(test_dir / "per_class_accuracy.csv"), str(curves["out_dir"] / "summary.csv")],
    }
