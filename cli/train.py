"""`train`: fit a model. Subcommands per model family."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli import cvae, gan, phylo, retrieve, viscoin
from cli.common import (
    CONTEXT,
    DATA,
    MODEL,
    OPTIM,
    OUTPUT,
    Amp,
    AutoResumeGroup,
    Compile,
    DataDir,
    Dataset,
    Device,
    Name,
    Out,
    Overwrite,
    Quiet,
    Resume,
    Workers,
    WorldPreset,
    is_main_process,
    resolve_config,
    run_dir_for,
)

app = typer.Typer(help="Train a model.", no_args_is_help=True, context_settings=CONTEXT, cls=AutoResumeGroup)

# Settings a resumed run may change; everything else must match the run's saved config.
RESUMABLE = {"epochs", "device", "num_workers", "amp", "log_every", "compile"}


@app.command("classifier", no_args_is_help=False)
def classifier(
    dataset: Dataset = "world",
    data_dir: DataDir = None,
    world: WorldPreset = None,
    image_size: Annotated[
        int | None, typer.Option(help="Training resolution in pixels.", rich_help_panel=DATA)
    ] = None,
    val_fraction: Annotated[
        float | None, typer.Option(help="Share of train held out for validation.", rich_help_panel=DATA)
    ] = None,
    bbox_crop: Annotated[
        bool | None,
        typer.Option(
            "--bbox-crop/--no-bbox-crop", help="Crop images to their bounding box.", rich_help_panel=DATA
        ),
    ] = None,
    skip_bad_images: Annotated[
        bool | None,
        typer.Option("--skip-bad-images", help="Skip and count unreadable images.", rich_help_panel=DATA),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help="Recipe from training/presets/classifier.yaml (default per dataset: world->tiny, cub->cub).",
            rich_help_panel=MODEL,
        ),
    ] = None,
    arch: Annotated[
        str | None, typer.Option(help="tiny, resnet18, resnet34 or resnet50.", rich_help_panel=MODEL)
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            help="none, imagenet (torchvision) or a weights file for offline use.", rich_help_panel=MODEL
        ),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Images per step per process.", rich_help_panel=OPTIM)
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs.", rich_help_panel=OPTIM)] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Learning rate.", rich_help_panel=OPTIM)] = None,
    optimizer: Annotated[str | None, typer.Option(help="adam or sgd.", rich_help_panel=OPTIM)] = None,
    schedule: Annotated[
        str | None, typer.Option(help="none, step or cosine (per epoch).", rich_help_panel=OPTIM)
    ] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Weight decay.", rich_help_panel=OPTIM)] = None,
    seed: Annotated[
        int | None, typer.Option(help="Random seed (data split, init, shuffling).", rich_help_panel=OPTIM)
    ] = None,
    log_every: Annotated[
        int | None, typer.Option(help="Training steps between log lines.", rich_help_panel=OUTPUT)
    ] = None,
    device: Device = "auto",
    amp: Amp = True,
    compile: Compile = None,
    num_workers: Workers = None,
    out: Out = None,
    name: Name = None,
    overwrite: Overwrite = False,
    resume: Resume = False,
    quiet: Quiet = False,
) -> None:
    """Train an image classifier (best/last checkpoints, log.jsonl, resume, DDP under torchrun/srun)."""
    from core.config import to_dict
    from core.rundir import prepare_run_dir
    from datasets.registry import canonical_name, check_data_spec
    from training.classifier import (
        DEFAULT_PRESET,
        PRESETS,
        ClassifierConfig,
        train_classifier,
    )

    dataset = canonical_name(dataset)
    overrides = dict(
        dataset=dataset, data_dir=str(data_dir) if data_dir else None, world=world, image_size=image_size,
        val_fraction=val_fraction, bbox_crop=bbox_crop, skip_bad_images=skip_bad_images, arch=arch, weights=weights,
        batch_size=batch_size, epochs=epochs, lr=lr, optimizer=optimizer, schedule=schedule,
        weight_decay=weight_decay, seed=seed, log_every=log_every, device=device, amp=amp, compile=compile, num_workers=num_workers,
    )  # fmt: skip
    run_dir = run_dir_for("train-classifier", out, name)
    cfg = resolve_config(
        ClassifierConfig,
        PRESETS,
        preset or DEFAULT_PRESET[dataset],
        overrides,
        run_dir,
        resume,
        RESUMABLE,
        command="train classifier",
    )
    cfg.validate()
    check_data_spec(cfg.data_spec())
    if is_main_process():
        inputs = [cfg.data_dir, None if cfg.weights in ("none", "imagenet") else cfg.weights]
        prepare_run_dir(run_dir, "train classifier", overwrite=overwrite, resume=resume, inputs=inputs)
    summary = train_classifier(cfg, Path(run_dir), resume=resume, quiet=quiet)
    if is_main_process():
        best = summary["best"]
        typer.echo(f"best val top-1 {best['top1']:.4f} at epoch {best['epoch']}; run: {run_dir}")
        typer.echo(
            f"weights: {Path(run_dir) / 'best.safetensors'}  (config: {to_dict(cfg)['arch']}, {cfg.image_size} px)"
        )


app.command("gan")(gan.train_gan)
app.command("cvae")(cvae.train_cvae_command)
app.command("phylo")(phylo.train_phylo_command)
app.command("viscoin")(viscoin.train_viscoin_command)
app.command("retrieval")(retrieve.train_retrieval_command)
