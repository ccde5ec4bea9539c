"""`train phylo` and `test phylo`: the phylogeny-guided VQ autoencoder with its code prior, and the analysis of
how well its codes follow the tree."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import typer

from cli.common import (
    DATA,
    MODEL,
    OPTIM,
    OUTPUT,
    DataDir,
    TrainOptions,
    run_dir_for,
    training_command,
    with_options,
)

# Settings a resumed run may change besides the hardware and log cadence; everything else must match.
RESUMABLE = {"eval_every"}


def parse_cuts(text: str | None) -> list[float] | None:
    """`0.5,0.8,0.95` -> [0.5, 0.8, 0.95]."""
    from core.errors import UserError

    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(
            f"--cuts must be comma-separated numbers such as 0.5,0.8,0.95, got {text!r}"
        ) from None


@training_command("train phylo")
def train_phylo_command(
    options: TrainOptions,
    tree: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="Newick tree whose leaves are the class names (default: the world's tree.nwk).",
            rich_help_panel=DATA,
        ),
    ] = None,
    cuts: Annotated[
        str | None,
        typer.Option(
            help="Relative depths cutting the tree into levels, e.g. 0.5,0.8,0.95 (species is the last level).",
            rich_help_panel=DATA,
        ),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(help="Recipe from training/presets/phylo.yaml: tiny, cub.", rich_help_panel=MODEL),
    ] = None,
    codes_per_level: Annotated[
        int | None, typer.Option(help="Code vectors per tree level.", rich_help_panel=MODEL)
    ] = None,
    free_codes: Annotated[
        int | None, typer.Option(help="Code vectors of the free part.", rich_help_panel=MODEL)
    ] = None,
    n_embed: Annotated[int | None, typer.Option(help="Codebook entries.", rich_help_panel=MODEL)] = None,
    phylo_weight: Annotated[
        float | None, typer.Option(help="Weight of the level heads' loss.", rich_help_panel=OPTIM)
    ] = None,
    adv_weight: Annotated[
        float | None,
        typer.Option(help="Weight of the free part's adversarial (confusion) loss.", rich_help_panel=OPTIM),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Images per step over all processes.", rich_help_panel=OPTIM)
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Autoencoder steps (and the baseline's).", rich_help_panel=OPTIM)
    ] = None,
    prior_steps: Annotated[int | None, typer.Option(help="Prior steps.", rich_help_panel=OPTIM)] = None,
    lr: Annotated[
        float | None, typer.Option("--lr", help="Autoencoder learning rate.", rich_help_panel=OPTIM)
    ] = None,
    baseline: Annotated[
        bool | None,
        typer.Option(
            "--baseline/--no-baseline",
            help="Also train the plain VQ autoencoder of equal size.",
            rich_help_panel=MODEL,
        ),
    ] = None,
    eval_every: Annotated[
        int | None, typer.Option(help="Steps between evaluations and checkpoints.", rich_help_panel=OUTPUT)
    ] = None,
) -> None:
    """Train Phylo-NN: per-level phylo codes + adversarial free codes, the conditional code prior, the plain VQ
    baseline, then the code-tree correlation analysis (analysis/)."""
    from training.phylo import DEFAULT_PRESET, PRESETS, PhyloConfig, train_phylo

    settings = dict(
        tree=tree, cuts=parse_cuts(cuts), codes_per_level=codes_per_level, free_codes=free_codes, n_embed=n_embed,
        phylo_weight=phylo_weight, adv_weight=adv_weight, batch_size=batch_size, steps=steps,
        prior_steps=prior_steps, lr=lr, baseline=baseline, eval_every=eval_every,
    )  # fmt: skip
    cfg, run_dir, summary = options.train(
        PhyloConfig, PRESETS, preset or DEFAULT_PRESET[options.dataset], settings, RESUMABLE, train_phylo,
        inputs=lambda cfg: [cfg.tree],
    )  # fmt: skip
    if summary is not None:
        print_correlations(summary["correlation"])
        typer.echo(f"weights: {run_dir / 'phylo.safetensors'}; analysis: {run_dir / 'analysis'}")


def print_correlations(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Spearman correlation of code distances with tree distances")
    columns = [c for c in ("phylo", "free", "plain_vq") if c in rows[0]]
    for column in ("level", "groups", *columns):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["level"]), str(row["groups"]), *(f"{row[c]:.3f}" for c in columns))
    Console().print(table)


@with_options("batch_size", "device", "num_workers", "out", "name", "overwrite", "show", "quiet")
def test_phylo_command(
    o: SimpleNamespace,
    checkpoint: Annotated[
        Path,
        typer.Option(
            "--checkpoint",
            "-c",
            exists=True,
            help="phylo.safetensors or a train phylo run.",
            rich_help_panel=MODEL,
        ),
    ],
    baseline: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            help="Plain VQ autoencoder to compare (default: the run's baseline/ when present).",
            rich_help_panel=MODEL,
        ),
    ] = None,
    split: Annotated[str, typer.Option(help="test, val, train or trainval.", rich_help_panel=DATA)] = "test",
    data_dir: DataDir = None,
) -> None:
    """Per tree level, the Spearman correlation between code distances and tree distances across species,
    beside the free part's and a plain VQ autoencoder's (correlation.json/.png, heatmaps.png)."""
    from testing.phylo import run_phylo_test

    run_dir = run_dir_for("test-phylo", o.out, o.name)
    summary = run_phylo_test(
        checkpoint, run_dir, baseline=baseline, split=split, data_overrides={"data_dir": str(data_dir) if data_dir else None},
        batch_size=o.batch_size, device=o.device, num_workers=o.num_workers, overwrite=o.overwrite, show=o.show,
        quiet=o.quiet,
    )  # fmt: skip
    print_correlations(summary["levels"])
    typer.echo(f"results: {run_dir}")
