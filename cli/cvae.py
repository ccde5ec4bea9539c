"""`train cvae`: a conditional VAE on images (world, CUB, image folder) or on scikit-learn's digits."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import DATA, MODEL, OPTIM, OUTPUT, TrainOptions, check_classifier_checkpoint, training_command

# Settings a resumed run may change besides the hardware and log cadence; everything else must match.
RESUMABLE = {"steps", "eval_every"}


@training_command(
    "train cvae",
    helps={
        "dataset": "world (alias toy), cub, folder or digits.",
        "val_fraction": "Share of train held out for the ELBO.",
    },
    datasets=("digits",),
)
def train_cvae_command(
    options: TrainOptions,
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
) -> None:
    """Train a conditional VAE (class and any subset of attributes); per-dimension KL in log.jsonl and plotted."""
    from training.cvae import DEFAULT_PRESET, PRESETS, CVAEConfig, train_cvae

    settings = dict(
        attributes=attributes, arch=arch, latent_dim=latent_dim, channels=channels, hidden=hidden, beta=beta,
        sigma=sigma, p_class=p_class, batch_size=batch_size, steps=steps, lr=lr, classifier=classifier,
        eval_every=eval_every,
    )  # fmt: skip
    cfg, run_dir, summary = options.train(
        CVAEConfig, PRESETS, preset or DEFAULT_PRESET[options.dataset], settings, RESUMABLE, train_cvae,
        inputs=lambda cfg: [cfg.classifier],
        check=lambda cfg: check_classifier_checkpoint(cfg.classifier, "--classifier"),
    )  # fmt: skip
    if summary is not None:
        val = summary["val"]
        typer.echo("held-out -ELBO: " + ", ".join(f"{s} given {t['neg_elbo']:.2f}" for s, t in val.items()))
        if "recognition" in summary:
            r = summary["recognition"]
            rates = ", ".join(f"{k} {r[k]:.3f}" for k in ("class", "all") if k in r)
            typer.echo(f"samples recognised as their class: {rates} (chance {r['chance']:.3f})")
        typer.echo(f"weights: {run_dir / 'cvae.safetensors'}; run: {run_dir}")
