"""`test`: evaluate a trained model on a split and save metrics, tables and figures."""

from __future__ import annotations

from types import SimpleNamespace

import typer

from cli import phylo, viscoin
from cli.common import CONTEXT, EVALUATION_OPTIONS, DataDir, Shared, run_dir_for, with_options

app = typer.Typer(help="Evaluate a trained model.", no_args_is_help=True, context_settings=CONTEXT)


@app.command("classifier")
@with_options(
    "batch_size", "device", "amp", "num_workers", "out", "name", "overwrite", "show", "quiet",
    first=("checkpoint",), helps={"checkpoint": "Classifier .safetensors, or a training run directory (uses best)."},
    table=EVALUATION_OPTIONS,
)  # fmt: skip
def classifier(
    o: SimpleNamespace,
    split: Shared = "test",
    dataset: Shared = None,
    data_dir: DataDir = None,
) -> None:
    """Top-1/top-5 accuracy, per-class accuracy CSV and confusion matrix of a classifier."""
    from rich.console import Console
    from rich.table import Table

    from datasets.registry import canonical_name
    from testing.classifier import run_classifier_test

    overrides = {
        "dataset": canonical_name(dataset) if dataset else None,
        "data_dir": str(data_dir) if data_dir else None,
    }
    run_dir = run_dir_for("test-classifier", o.out, o.name)
    metrics = run_classifier_test(
        o.checkpoint, run_dir, split=split, data_overrides=overrides, batch_size=o.batch_size, device=o.device,
        num_workers=o.num_workers, amp=o.amp, show=o.show, quiet=o.quiet, overwrite=o.overwrite,
    )  # fmt: skip
    table = Table(title=f"{metrics['dataset']} / {split}: {metrics['n']} images")
    for column in ("top-1", "top-5", "mean per-class", "loss", "skipped"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{metrics['top1']:.4f}", f"{metrics['top5']:.4f}", f"{metrics['mean_per_class_accuracy']:.4f}",
        f"{metrics['loss']:.4f}", str(metrics["skipped"]),
    )  # fmt: skip
    Console().print(table)
    typer.echo(f"results: {run_dir}")


app.command("viscoin")(viscoin.test_viscoin_command)
app.command("phylo")(phylo.test_phylo_command)
