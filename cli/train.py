"""`train`: fit a model. Subcommands per model family."""

from __future__ import annotations

from typing import Annotated

import typer

from cli import cvae, gan, phylo, retrieve, viscoin
from cli.common import CONTEXT, MODEL, OPTIM, AutoResumeGroup, Shared, TrainOptions, training_command

app = typer.Typer(help="Train a model.", no_args_is_help=True, context_settings=CONTEXT, cls=AutoResumeGroup)

# Settings a resumed run may change besides the hardware and log cadence; everything else must match.
RESUMABLE = {"epochs", "compile"}


@app.command("classifier", no_args_is_help=False)
@training_command(
    "train classifier",
    helps={
        "preset": "Recipe from training/presets/classifier.yaml (default per dataset: world->tiny, cub->cub).",
        "weights": "none, imagenet (torchvision) or a weights file for offline use.",
        "batch_size": "Images per step per process.",
    },
)
def classifier(
    options: TrainOptions,
    preset: Shared = None,
    arch: Annotated[
        str | None, typer.Option(help="tiny, resnet18, resnet34 or resnet50.", rich_help_panel=MODEL)
    ] = None,
    weights: Shared = None,
    batch_size: Shared = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs.", rich_help_panel=OPTIM)] = None,
    lr: Shared = None,
    optimizer: Annotated[str | None, typer.Option(help="adam or sgd.", rich_help_panel=OPTIM)] = None,
    schedule: Annotated[
        str | None, typer.Option(help="none, step or cosine (per epoch).", rich_help_panel=OPTIM)
    ] = None,
    weight_decay: Shared = None,
    compile: Shared = None,
) -> None:
    """Train an image classifier (best/last checkpoints, log.jsonl, resume, DDP under torchrun/srun)."""
    from training.classifier import ClassifierConfig, train_classifier

    settings = dict(arch=arch, weights=weights, batch_size=batch_size, epochs=epochs, lr=lr, optimizer=optimizer,
                    schedule=schedule, weight_decay=weight_decay, compile=compile)  # fmt: skip
    cfg, run_dir, summary = options.train(
        ClassifierConfig, preset, settings, RESUMABLE, train_classifier,
        inputs=lambda cfg: [None if cfg.weights in ("none", "imagenet") else cfg.weights],
    )  # fmt: skip
    if summary is not None:
        best = summary["best"]
        typer.echo(f"best val top-1 {best['top1']:.4f} at epoch {best['epoch']}; run: {run_dir}")
        typer.echo(f"weights: {run_dir / 'best.safetensors'}  (config: {cfg.arch}, {cfg.data.image_size} px)")


app.command("gan")(gan.train_gan)
app.command("cvae")(cvae.train_cvae_command)
app.command("phylo")(phylo.train_phylo_command)
app.command("viscoin")(viscoin.train_viscoin_command)
app.command("retrieval")(retrieve.train_retrieval_command)
