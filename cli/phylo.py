"""`train phylo` and `test phylo`: Phylo-NN in the paper's stages (a VQGAN, the phylogenetic disentangler on its
frozen features, the conditional code prior), and the analysis of its codes and samples."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import typer

from cli.common import (
    DATA,
    EVALUATION_OPTIONS,
    MODEL,
    OPTIM,
    OUTPUT,
    DataDir,
    Shared,
    TrainOptions,
    check_classifier_checkpoint,
    run_dir_for,
    training_command,
    with_options,
)
from testing.generation import TOP_K

# Settings a resumed run may change besides the hardware and log cadence; everything else must match.
RESUMABLE = {"eval_every", "classifier", "fidelity_samples", "top_k"}

# How the Phylo-NN commands word the shared options they both have
HELPS = {
    "classifier": "An independent classifier (a train classifier run) that judges the samples: recognition per "
    "level, diversity, the round trip.",
}
TopK = Annotated[
    int | None,
    typer.Option(
        help="Samples draw each code from the k most likely (0 = all; 5, the paper's).",
        rich_help_panel=OUTPUT,
    ),
]


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


@training_command(
    "train phylo",
    helps={
        **HELPS,
        "mirror": "Flip training images left-right.",
        "preset": "Recipe from training/presets/phylo.yaml: tiny, cub.",
        "batch_size": "Disentangler samples per step over all processes.",
        "steps": "Stage-2 (disentangler) steps.",
        "lr": "Disentangler learning rate.",
    },
)
def train_phylo_command(
    options: TrainOptions,
    tree: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="Newick tree, or a taxonomy table (CSV/TSV with rank columns such as order,family,genus,species), "
            "whose leaves are the class names (default: the world's tree.nwk).",
            rich_help_panel=DATA,
        ),
    ] = None,
    cuts: Annotated[
        str | None,
        typer.Option(
            help="Relative depths cutting the tree into levels, e.g. 0.5,0.8,0.95 (species is the last level; "
            "default: that for a Newick tree, one level per rank for a taxonomy table).",
            rich_help_panel=DATA,
        ),
    ] = None,
    mirror: Shared = None,
    preset: Shared = None,
    stage1: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            help="A trained stage-1 VQGAN (stage1/vqgan.safetensors or the train phylo run holding it): skip stage 1.",
            rich_help_panel=MODEL,
        ),
    ] = None,
    vqgan_only: Annotated[
        bool | None,
        typer.Option(
            "--vqgan-only", help="Train stage 1 alone (to pass with --stage1 later).", rich_help_panel=MODEL
        ),
    ] = None,
    codes_per_level: Annotated[
        int | None, typer.Option(help="Code vectors per tree level.", rich_help_panel=MODEL)
    ] = None,
    free_codes: Annotated[
        int | None, typer.Option(help="Code vectors of the free part.", rich_help_panel=MODEL)
    ] = None,
    n_embed: Annotated[
        int | None, typer.Option(help="Entries of the disentangler's codebook.", rich_help_panel=MODEL)
    ] = None,
    perceptual: Annotated[
        str | None,
        typer.Option(
            help="Stage 1's LPIPS: auto (when torchvision's VGG-16 weights are cached), imagenet, none or a file.",
            rich_help_panel=OPTIM,
        ),
    ] = None,
    phylo_weight: Annotated[
        float | None, typer.Option(help="Weight of the level heads' loss.", rich_help_panel=OPTIM)
    ] = None,
    adv_weight: Annotated[
        float | None,
        typer.Option(help="Weight of the free part's adversarial (confusion) loss.", rich_help_panel=OPTIM),
    ] = None,
    batch_size: Shared = None,
    vqgan_steps: Annotated[
        int | None, typer.Option(help="Stage-1 (VQGAN) steps.", rich_help_panel=OPTIM)
    ] = None,
    steps: Shared = None,
    prior_steps: Annotated[
        int | None, typer.Option(help="Stage-3 (prior) steps.", rich_help_panel=OPTIM)
    ] = None,
    lr: Shared = None,
    classifier: Shared = None,
    top_k: TopK = None,
    eval_every: Shared = None,
) -> None:
    """Train Phylo-NN: a VQGAN (stage 1), the disentangler of per-level phylo codes and adversarial free codes
    on its frozen features (stage 2), the conditional code prior (stage 3); then the analysis (analysis/):
    code-tree correlations against the VQGAN's codes, the world's traits, and with --classifier the samples'
    fidelity."""
    from training.phylo.trainer import PhyloConfig, train_phylo

    settings = dict(
        tree=tree, cuts=parse_cuts(cuts), mirror=mirror, stage1=stage1, vqgan_only=vqgan_only,
        codes_per_level=codes_per_level, free_codes=free_codes, n_embed=n_embed, perceptual=perceptual,
        phylo_weight=phylo_weight, adv_weight=adv_weight, batch_size=batch_size, vqgan_steps=vqgan_steps,
        steps=steps, prior_steps=prior_steps, lr=lr, classifier=classifier, top_k=top_k, eval_every=eval_every,
    )  # fmt: skip
    cfg, run_dir, summary = options.train(
        PhyloConfig, preset, settings, RESUMABLE, train_phylo,
        inputs=lambda cfg: [cfg.tree, cfg.stage1, cfg.classifier],
        check=lambda cfg: check_classifier_checkpoint(cfg.classifier, "--classifier"),
    )  # fmt: skip
    if summary is None:
        return
    if "stage1" in summary:
        s = summary["stage1"]
        line = f"stage 1 on test: L1 {s['l1']:.4f}, {s['codes_used']} codes used"
        if "classifier" in s:
            line += f", classifier {s['classifier']:.3f} on images, {s['classifier_round_trip']:.3f} on reconstructions"
        typer.echo(line)
        typer.echo(f"stage 1: {run_dir / 'stage1' / 'vqgan.safetensors'} (pass it with --stage1)")
        return
    print_report(summary)
    typer.echo(f"weights: {run_dir / 'phylo.safetensors'}; analysis: {run_dir / 'analysis'}")


def _number(value) -> str:
    return (
        "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.3f}"
    )


def print_correlations(rows: list[dict]) -> None:
    """Per level: the code-tree Spearman correlations (n/a where a correlation does not exist)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Spearman correlation of code distances with tree distances")
    columns = [c for c in ("phylo", "free", "plain_vq") if any(c in row for row in rows)]
    for column in ("level", "groups", *columns):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["level"]), str(row["groups"]), *(_number(row.get(c)) for c in columns))
    Console().print(table)


def print_report(summary: dict) -> None:
    """The correlations, then the samples' fidelity per level and the round trip when they were measured."""
    from rich.console import Console
    from rich.table import Table

    print_correlations(summary["correlation"])
    trip = summary.get("round_trip") or {}
    lines = []
    if "heads" in trip:
        lines.append(f"species head on images {_number(trip['heads'][-1])}, on their round trip "
                     f"{_number(trip['heads_round_trip'][-1])}")  # fmt: skip
    if "classifier" in trip:
        lines.append(f"classifier on images {_number(trip['classifier'])}, on their reconstructions "
                     f"{_number(trip['classifier_round_trip'])}")  # fmt: skip
    if lines:
        typer.echo("round trip of the test images: " + "; ".join(lines))
    fidelity = summary.get("fidelity")
    if not fidelity:
        return
    table = Table(title="Samples recognised by the classifier (in the group asked for / chance)")
    for column in (
        "level",
        "species samples",
        "node samples",
        "spread vs real\n(node; species row: species)",
    ):
        table.add_column(column, justify="right")
    species = {r["level"]: r for r in fidelity["species"]["recognition"]}
    for level in sorted(species):
        node = fidelity["nodes"].get(level) or fidelity["nodes"].get(str(level))
        node_rate = node["recognition"][0] if node and node["recognition"] else None
        spread = (node or fidelity["species"])["spread_ratio"]
        table.add_row(
            str(level),
            f"{_number(species[level]['rate'])} / {_number(species[level]['chance'])}",
            f"{_number(node_rate['rate'])} / {_number(node_rate['chance'])}" if node_rate else "",
            _number(spread),
        )
    Console().print(table)


@with_options(
    "batch_size", "device", "num_workers", "out", "name", "overwrite", "show", "quiet",
    first=("checkpoint",), helps={**HELPS, "checkpoint": "phylo.safetensors or a train phylo run."},
    table=EVALUATION_OPTIONS,
)  # fmt: skip
def test_phylo_command(
    o: SimpleNamespace,
    baseline: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            help="Plain VQ to compare (default: the model's own stage-1 VQGAN).",
            rich_help_panel=MODEL,
        ),
    ] = None,
    classifier: Shared = None,
    samples: Annotated[
        int, typer.Option(help="Samples per species and per node.", rich_help_panel=OUTPUT)
    ] = 10,
    top_k: Annotated[
        int,
        typer.Option(help="Samples draw each code from the k most likely (0 = all).", rich_help_panel=OUTPUT),
    ] = TOP_K,
    seed: Annotated[
        int, typer.Option(help="Sample i of a condition uses seed + i.", rich_help_panel=OUTPUT)
    ] = 0,
    split: Shared = "test",
    data_dir: DataDir = None,
) -> None:
    """Per tree level, the Spearman correlation between code distances and tree distances across species beside
    the free part's and the plain VQ's; the world's traits per code part; the round trip of real images; with
    --classifier, how often samples of a species or a node are recognised as such, and their diversity."""
    from core.errors import UserError
    from testing.phylo.evaluate import run_phylo_test

    check_classifier_checkpoint(str(classifier) if classifier else None, "--classifier")
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    run_dir = run_dir_for("test-phylo", o.out, o.name)
    summary = run_phylo_test(
        o.checkpoint, run_dir, baseline=baseline, classifier=classifier, split=split,
        data_overrides={"data_dir": str(data_dir) if data_dir else None}, samples=samples, top_k=top_k, seed=seed,
        batch_size=o.batch_size, device=o.device, num_workers=o.num_workers, overwrite=o.overwrite, show=o.show,
        quiet=o.quiet,
    )  # fmt: skip
    print_report(summary)
    typer.echo(f"results: {run_dir}")
