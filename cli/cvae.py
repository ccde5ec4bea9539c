"""`train cvae`: a conditional VAE on images (world, CUB, image folder), scikit-learn's digits or the testbed's
vectors (synthetic sets of known intrinsic dimension, a CSV table); `compare-runs`: CVAE runs side by side."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import typer

from cli.common import (
    DATA,
    MODEL,
    OPTIM,
    Name,
    Out,
    Overwrite,
    Shared,
    Show,
    TrainOptions,
    check_classifier_checkpoint,
    results_dir,
    training_command,
)

# Settings a resumed run may change besides the hardware and log cadence; everything else must match.
RESUMABLE = {"steps", "eval_every"}


@training_command(
    "train cvae",
    helps={
        "dataset": "world (alias toy), cub, folder, digits, or vectors: gaussian, projected, swissroll, csv.",
        "val_fraction": "Share of train held out for the ELBO.",
        "preset": "Recipe from training/presets/cvae.yaml: tiny, digits, vectors, cub (default per dataset).",
        "batch_size": "Samples per step over all processes.",
        "lr": "Adam learning rate.",
        "classifier": "Classifier checkpoint: report how often it recognises conditional samples.",
    },
    datasets=("digits", "gaussian", "projected", "swissroll", "csv"),
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
    dim: Annotated[
        int | None,
        typer.Option(
            help="Coordinates of --dataset gaussian|projected (their intrinsic dimension).",
            rich_help_panel=DATA,
        ),
    ] = None,
    projection_dim: Annotated[
        int | None, typer.Option(help="Observed coordinates of --dataset projected.", rich_help_panel=DATA)
    ] = None,
    n_points: Annotated[
        int | None, typer.Option(help="Points of a synthetic vector set (all splits).", rich_help_panel=DATA)
    ] = None,
    csv: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="--dataset csv: a table with a header row; every column but --label-column is a feature.",
            rich_help_panel=DATA,
        ),
    ] = None,
    label_column: Annotated[
        str | None,
        typer.Option(help="The CSV column naming each row's class (none: no classes).", rich_help_panel=DATA),
    ] = None,
    preset: Shared = None,
    arch: Annotated[
        str | None, typer.Option(help="conv (images) or mlp (vectors).", rich_help_panel=MODEL)
    ] = None,
    prior: Annotated[
        str | None,
        typer.Option(
            help="p(z|c): standard, N(0, I) for every condition (the testbed's; samples vary as much as the data "
            "allows), or learned, N(m(c), I) (the condition moves the prior).",
            rich_help_panel=MODEL,
        ),
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
    batch_size: Shared = None,
    steps: Shared = None,
    lr: Shared = None,
    classifier: Shared = None,
    eval_every: Shared = None,
) -> None:
    """Train a conditional VAE (class and any subset of attributes); per-dimension KL in log.jsonl and plotted."""
    from training.cvae import CVAEConfig, train_cvae

    settings = dict(
        attributes=attributes, dim=dim, projection_dim=projection_dim, n_points=n_points, csv=csv,
        label_column=label_column, prior=prior, arch=arch, latent_dim=latent_dim, channels=channels, hidden=hidden, beta=beta,
        sigma=sigma, p_class=p_class, batch_size=batch_size, steps=steps, lr=lr, classifier=classifier,
        eval_every=eval_every,
    )  # fmt: skip
    cfg, run_dir, summary = options.train(
        CVAEConfig, preset, settings, RESUMABLE, train_cvae,
        inputs=lambda cfg: [cfg.classifier, cfg.csv],
        check=lambda cfg: check_classifier_checkpoint(cfg.classifier, "--classifier"),
    )  # fmt: skip
    if summary is not None:
        val = summary["val"]
        typer.echo("held-out -ELBO: " + ", ".join(f"{s} given {t['neg_elbo']:.2f}" for s, t in val.items()))
        if "recognition" in summary:
            r = summary["recognition"]
            rates = ", ".join(f"{k} {r[k]:.3f}" for k in ("class", "all") if k in r)
            typer.echo(f"samples recognised as their class: {rates} (chance {r['chance']:.3f})")
            spreads = ", ".join(
                f"{k} {r[f'{k}_spread']:.2f}"
                for k in ("class", "all")
                if math.isfinite(r.get(f"{k}_spread", math.nan))
            )
            if spreads:
                typer.echo(f"within-class pixel spread of the samples / the real images': {spreads}")
        for row in summary.get("sweep") or []:
            left = (
                ""
                if row["expected_active"] is None
                else f" (intrinsic dimension left: {row['expected_active']})"
            )
            typer.echo(f"{row['given']} of {row['input_dim']} features given: held-out KL {row['kl_total']:.2f} nats, "
                       f"{row['active_dims']} latent dimensions in use{left}")  # fmt: skip
        typer.echo(f"weights: {run_dir / 'cvae.safetensors'}; run: {run_dir}")


def compare_runs_command(
    runs: Annotated[
        list[Path], typer.Argument(exists=True, file_okay=False, help="train cvae run directories.")
    ],
    out: Out = None,
    name: Name = None,
    overwrite: Overwrite = False,
    show: Show = False,
) -> None:
    """CVAE runs side by side (the testbed's compare_models): comparison.csv with one row per run (data,
    prior, held-out ELBO terms and active dimensions per condition setting, recognition), comparison.png (the
    held-out -ELBO and the sorted KL per latent dimension) and, for runs on vectors, kl_sweep.png: KL and active
    dimensions against the number of features given (one line per run) and the KL with none given against
    each run's input dimension."""
    from testing.cvae_compare import check_runs, compare_runs

    check_runs(runs)
    run_dir = results_dir("compare-runs", SimpleNamespace(out=out, name=name, overwrite=overwrite), runs,
                          {"runs": [str(r) for r in runs]})  # fmt: skip
    rows = compare_runs(runs, run_dir, show=show)
    columns = [c for c in ("prior", "latent_dim", "none_neg_elbo", "class_neg_elbo", "all_neg_elbo",
                           "recognition_class", "recognition_class_spread") if any(c in r for r in rows)]  # fmt: skip
    for row in rows:
        values = ", ".join(f"{c} {row[c]:.3g}" if isinstance(row.get(c), float) else f"{c} {row.get(c)}"
                           for c in columns)  # fmt: skip
        typer.echo(f"{row['run']}: {values}")
    from core.rundir import mark_run

    mark_run(run_dir, status="finished")
    typer.echo(f"results: {run_dir}")
