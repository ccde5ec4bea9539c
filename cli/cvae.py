"""`train cvae`: a conditional VAE on images (world, CUB, image folder) or on scikit-learn's digits."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import (
    DATA,
    MODEL,
    OPTIM,
    OUTPUT,
    Amp,
    DataDir,
    Device,
    LogEvery,
    Name,
    Out,
    Overwrite,
    Quiet,
    Resume,
    TrainSeed,
    Workers,
    WorldPreset,
    is_main_process,
    resolve_config,
    run_dir_for,
)

RESUMABLE = {"steps", "device", "num_workers", "amp", "log_every", "eval_every"}


def train_cvae_command(
    dataset: Annotated[
        str,
        typer.Option(
            "--dataset", "-d", help="world (alias toy), cub, folder or digits.", rich_help_panel=DATA
        ),
    ] = "world",
    data_dir: DataDir = None,
    world: WorldPreset = None,
    image_size: Annotated[
        int | None, typer.Option(help="Image side in pixels, a power of two.", rich_help_panel=DATA)
    ] = None,
    val_fraction: Annotated[
        float | None, typer.Option(help="Share of train held out for the ELBO.", rich_help_panel=DATA)
    ] = None,
    bbox_crop: Annotated[
        bool | None,
        typer.Option(
            "--bbox-crop/--no-bbox-crop", help="Crop images to their bounding box.", rich_help_panel=DATA
        ),
    ] = None,
    attributes: Annotated[
        bool | None,
        typer.Option(
            "--attributes/--no-attributes",
            help="Condition on the per-image attributes too (when the data has them).",
            rich_help_panel=DATA,
        ),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help="Recipe from training/presets/cvae.yaml: tiny, digits, cub (default per dataset).",
            rich_help_panel=MODEL,
        ),
    ] = None,
    arch: Annotated[
        str | None, typer.Option(help="conv (images) or mlp (vectors).", rich_help_panel=MODEL)
    ] = None,
    latent_dim: Annotated[int | None, typer.Option(help="Latent dimensions.", rich_help_panel=MODEL)] = None,
    channels: Annotated[
        int | None, typer.Option(help="Conv channels at full resolution.", rich_help_panel=MODEL)
    ] = None,
    hidden: Annotated[
        int | None, typer.Option(help="Width of the dense layers.", rich_help_panel=MODEL)
    ] = None,
    beta: Annotated[
        float | None, typer.Option(help="KL weight (1 = the ELBO).", rich_help_panel=OPTIM)
    ] = None,
    sigma: Annotated[
        float | None,
        typer.Option(
            help="Standard deviation of the decoder's Gaussian likelihood (data units).",
            rich_help_panel=OPTIM,
        ),
    ] = None,
    p_class: Annotated[
        float | None,
        typer.Option(help="Probability that a training sample is given its class.", rich_help_panel=OPTIM),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Samples per step over all processes.", rich_help_panel=OPTIM)
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Optimiser steps.", rich_help_panel=OPTIM)] = None,
    lr: Annotated[
        float | None, typer.Option("--lr", help="Adam learning rate.", rich_help_panel=OPTIM)
    ] = None,
    seed: TrainSeed = None,
    classifier: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            help="Classifier checkpoint: report how often it recognises conditional samples.",
            rich_help_panel=OUTPUT,
        ),
    ] = None,
    eval_every: Annotated[
        int | None, typer.Option(help="Steps between evaluations and checkpoints.", rich_help_panel=OUTPUT)
    ] = None,
    log_every: LogEvery = None,
    device: Device = "auto",
    amp: Amp = True,
    num_workers: Workers = None,
    out: Out = None,
    name: Name = None,
    overwrite: Overwrite = False,
    resume: Resume = False,
    quiet: Quiet = False,
) -> None:
    """Train a conditional VAE (class and any subset of attributes); per-dimension KL in log.jsonl and plotted."""
    from core.checkpoint import read_meta
    from core.errors import UserError
    from core.rundir import prepare_run_dir
    from training.cvae import DEFAULT_PRESET, PRESETS, CVAEConfig, train_cvae

    if dataset != "digits":
        from datasets.registry import canonical_name

        dataset = canonical_name(dataset)
    overrides = dict(
        dataset=dataset, data_dir=str(data_dir) if data_dir else None, world=world, image_size=image_size,
        val_fraction=val_fraction, bbox_crop=bbox_crop, attributes=attributes, arch=arch, latent_dim=latent_dim, channels=channels,
        hidden=hidden, beta=beta, sigma=sigma, p_class=p_class, batch_size=batch_size, steps=steps, lr=lr, seed=seed,
        classifier=str(classifier) if classifier else None, eval_every=eval_every, log_every=log_every,
        device=device, amp=amp, num_workers=num_workers,
    )  # fmt: skip
    run_dir = run_dir_for("train-cvae", out, name)
    cfg = resolve_config(CVAEConfig, PRESETS, preset or DEFAULT_PRESET[dataset], overrides, run_dir, resume,
                         RESUMABLE, command="train cvae")  # fmt: skip
    cfg.validate()
    if cfg.dataset != "digits":
        from datasets.registry import check_data_spec
        from training.cvae import image_spec

        check_data_spec(image_spec(cfg))
    if cfg.classifier:  # checked before the run directory is touched
        clf = Path(cfg.classifier)
        if read_meta(clf / "best.safetensors" if clf.is_dir() else clf).get("kind") != "classifier":
            raise UserError(f"--classifier {clf} is not a classifier checkpoint")
    if is_main_process():
        inputs = [cfg.data_dir, cfg.classifier]
        prepare_run_dir(run_dir, "train cvae", overwrite=overwrite, resume=resume, inputs=inputs)
    summary = train_cvae(cfg, Path(run_dir), resume=resume, quiet=quiet)
    if is_main_process():
        val = summary["val"]
        typer.echo("held-out -ELBO: " + ", ".join(f"{s} given {t['neg_elbo']:.2f}" for s, t in val.items()))
        if "recognition" in summary:
            r = summary["recognition"]
            rates = ", ".join(f"{k} {r[k]:.3f}" for k in ("class", "all") if k in r)
            typer.echo(f"samples recognised as their class: {rates} (chance {r['chance']:.3f})")
        typer.echo(f"weights: {Path(run_dir) / 'cvae.safetensors'}; run: {run_dir}")
