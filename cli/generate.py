"""`generate`: sample images from trained generators. Modes: gan (StyleGAN2), cvae, phylo, traverse, interpolate.

Every mode writes a run directory with images/ (per-image PNGs), grid.png (labelled: what each row and column
is) and manifest.jsonl (one row per image: its condition, seed and the checkpoint's hash); the same seed gives
the same bytes. `vdna make` reads it.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import typer

from cli.common import CONTEXT, MODEL, run_dir_for, with_options
from testing.generation import TOP_K

app = typer.Typer(help="Sample from a trained generator.", no_args_is_help=True, context_settings=CONTEXT)

CONDITIONS = "Conditions"
SAMPLING = "Sampling"

Seed = Annotated[int, typer.Option(help="Seed of image 0; image i uses seed + i.", rich_help_panel=SAMPLING)]
Count = Annotated[int, typer.Option("--n", help="Images per condition.", rich_help_panel=SAMPLING)]
BatchSize = Annotated[int, typer.Option(help="Images per forward pass.", rich_help_panel=SAMPLING)]
Classes = Annotated[
    list[str] | None,
    typer.Option(
        "--class",
        help="Class name (or index); repeat for several, 'all' for every class.",
        rich_help_panel=CONDITIONS,
    ),
]
Attrs = Annotated[
    list[str] | None,
    typer.Option(
        "--attr",
        help="Attribute condition NAME=VALUE (repeatable); attributes not named are not given.",
        rich_help_panel=CONDITIONS,
    ),
]
AttrVector = Annotated[
    str | None,
    typer.Option(
        "--attrs",
        help="All attributes as one comma-separated vector, '?' for those not given.",
        rich_help_panel=CONDITIONS,
    ),
]
Temperature = Annotated[float, typer.Option(help="Prior sampling temperature.", rich_help_panel=SAMPLING)]
TopK = Annotated[
    int,
    typer.Option(
        help="Draw each code from the k most likely (0 = all; 5, the paper's, by default).",
        rich_help_panel=SAMPLING,
    ),
]

# The sampling options of the CVAE and Phylo-NN modes (cli.common.with_options)
SAMPLING_OPTIONS = {
    "seed": (Seed, 0),
    "temperature": (Temperature, 1.0),
    "top_k": (TopK, TOP_K),
    "batch_size": (BatchSize, 64),
}
OUTPUT_OPTIONS = ("device", "out", "name", "overwrite", "quiet")


def sampling_mode(*sampling: str):
    """A CVAE / Phylo-NN mode's shared options: --checkpoint first, then its own options, then --seed, the
    `sampling` ones, --batch-size and the output options; its first parameter receives them all."""
    return with_options("seed", *sampling, "batch_size", *OUTPUT_OPTIONS, first=("checkpoint",),
                        table=SAMPLING_OPTIONS)  # fmt: skip


def _common(o, command: str):
    from testing.generation.commands import Common

    return Common(o.checkpoint, run_dir_for(command, o.out, o.name), o.seed, o.batch_size, o.device, o.overwrite,
                  o.quiet)  # fmt: skip


def _report(summary: dict) -> None:
    typer.echo(
        f"{summary['n']} images in {len(summary['groups'])} group(s): {summary['images']}  grid: {summary['grid']}"
    )


@app.command("gan")
@with_options(
    *OUTPUT_OPTIONS, first=("checkpoint",), helps={"checkpoint": "Generator .safetensors or a train gan run."}
)
def generate_gan(
    o: SimpleNamespace,
    n: Annotated[int, typer.Option("--n", help="Number of images.", rich_help_panel=MODEL)] = 64,
    seed: Annotated[
        int, typer.Option(help="Seed of image 0; image i uses seed + i.", rich_help_panel=MODEL)
    ] = 0,
    truncation: Annotated[
        float, typer.Option(help="Truncation psi in [0, 1] (1 = none).", rich_help_panel=MODEL)
    ] = 1.0,
    noise_mode: Annotated[str, typer.Option(help="const or random.", rich_help_panel=MODEL)] = "const",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.", rich_help_panel=MODEL)] = 16,
) -> None:
    """Write DIR/images/NNNNNN.png (one per seed), DIR/grid.png and DIR/manifest.jsonl."""
    from core.checkpoint import file_hash
    from core.device import resolve_device
    from core.rundir import mark_run, prepare_run_dir
    from models.stylegan2.checkpoint import load_generator, resolve_generator_path
    from testing.sampling import check_sampling_args, generate_folder

    check_sampling_args(n, seed, truncation, batch_size, noise_mode)
    torch_device = resolve_device(o.device)
    weights = resolve_generator_path(o.checkpoint)
    G, _ = load_generator(weights, device=torch_device)
    run_dir = prepare_run_dir(run_dir_for("generate-gan", o.out, o.name), "generate gan", overwrite=o.overwrite,
                              inputs=[o.checkpoint, weights], resumable=False)  # fmt: skip
    summary = generate_folder(
        G, run_dir, n, seed=seed, truncation=truncation, batch_size=batch_size, noise_mode=noise_mode,
        checkpoint_hash=file_hash(weights), quiet=o.quiet,
    )  # fmt: skip
    mark_run(run_dir, status="finished", checkpoint=str(weights), n=n, seed=seed, truncation=truncation)
    typer.echo(f"{summary['n']} images: {summary['images']}  grid: {summary['grid']}")


@app.command("cvae")
@sampling_mode()
def generate_cvae(
    o: SimpleNamespace,
    classes: Classes = None,
    attr: Attrs = None,
    attrs: AttrVector = None,
    n: Count = 16,
) -> None:
    """Conditional VAE samples: --class and/or attributes given (the rest left out); one folder per condition."""
    from testing.generation.commands import generate_cvae as run

    _report(run(_common(o, "generate-cvae"), classes or [], attr or [], attrs, n))


@app.command("phylo")
@sampling_mode("temperature", "top_k")
def generate_phylo(
    o: SimpleNamespace,
    species: Annotated[
        list[str] | None,
        typer.Option(help="Species to draw codes for (repeatable, or 'all').", rich_help_panel=CONDITIONS),
    ] = None,
    node: Annotated[
        str | None,
        typer.Option(
            help="A tree node (a group at some level): every image draws its codes from the prior given the node.",
            rich_help_panel=CONDITIONS,
        ),
    ] = None,
    level: Annotated[
        int | None,
        typer.Option(
            help="Level of --node when it is a group at several (default: the finest).",
            rich_help_panel=CONDITIONS,
        ),
    ] = None,
    n: Count = 16,
) -> None:
    """Phylo-NN samples: codes drawn by the prior for --species, or under an ancestor --node (each image its own)."""
    from testing.generation.commands import generate_phylo as run

    _report(run(_common(o, "generate-phylo"), species or [], node, level, n, o.temperature, o.top_k))


@app.command("traverse")
@sampling_mode("temperature", "top_k")
def traverse(
    o: SimpleNamespace,
    label: Annotated[
        str | None, typer.Option("--class", help="CVAE: class given.", rich_help_panel=CONDITIONS)
    ] = None,
    attr: Attrs = None,
    dims: Annotated[
        str | None,
        typer.Option(help="CVAE: latent dimensions to sweep, e.g. 0,3,5.", rich_help_panel=SAMPLING),
    ] = None,
    top: Annotated[
        int | None,
        typer.Option(
            help="CVAE: sweep the k dimensions of largest KL (default 4).", rich_help_panel=SAMPLING
        ),
    ] = None,
    span: Annotated[
        float, typer.Option(help="CVAE: sweep from -span to +span.", rich_help_panel=SAMPLING)
    ] = 3.0,
    species: Annotated[
        str | None, typer.Option(help="Phylo-NN: codes drawn for this species.", rich_help_panel=CONDITIONS)
    ] = None,
    image: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, help="Phylo-NN: codes of this image.", rich_help_panel=CONDITIONS
        ),
    ] = None,
    positions: Annotated[
        str | None,
        typer.Option(
            help="Phylo-NN: code positions to vary (default: the first of each level and of the free part).",
            rich_help_panel=SAMPLING,
        ),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            help="Images per row (CVAE default 9 values; Phylo-NN default 16 codebook entries).",
            rich_help_panel=SAMPLING,
        ),
    ] = None,
) -> None:
    """One grid row per latent dimension (CVAE) or code position (Phylo-NN), swept across its values."""
    from testing.generation.commands import traverse as run

    common = _common(o, "generate-traverse")
    _report(
        run(
            common,
            label,
            attr or [],
            dims,
            top,
            span,
            species,
            image,
            positions,
            steps,
            o.temperature,
            o.top_k,
        )
    )


@app.command("interpolate")
@sampling_mode("temperature", "top_k")
def interpolate(
    o: SimpleNamespace,
    from_class: Annotated[
        str | None, typer.Option(help="CVAE: start class.", rich_help_panel=CONDITIONS)
    ] = None,
    to_class: Annotated[str | None, typer.Option(help="CVAE: end class.", rich_help_panel=CONDITIONS)] = None,
    attr: Attrs = None,
    from_species: Annotated[
        str | None, typer.Option(help="Phylo-NN: start species.", rich_help_panel=CONDITIONS)
    ] = None,
    to_species: Annotated[
        str | None, typer.Option(help="Phylo-NN: end species.", rich_help_panel=CONDITIONS)
    ] = None,
    from_image: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="Start image (encoded).", rich_help_panel=CONDITIONS),
    ] = None,
    to_image: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="End image (encoded).", rich_help_panel=CONDITIONS),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="CVAE: frames per row (default 8).", rich_help_panel=SAMPLING)
    ] = None,
    n: Annotated[
        int,
        typer.Option(
            "--n",
            help="Rows for class or species endpoints, drawn from seeds seed..seed+n-1 (two images: one row).",
            rich_help_panel=SAMPLING,
        ),
    ] = 4,
) -> None:
    """Paths between two conditions or two images: linear in latent and condition (CVAE), or code swaps free part
    first, then level 0, 1, ... (Phylo-NN); one row per endpoint pair."""
    from testing.generation.commands import interpolate as run

    common = _common(o, "generate-interpolate")
    _report(
        run(
            common,
            from_class,
            to_class,
            attr or [],
            from_species,
            to_species,
            from_image,
            to_image,
            steps,
            n,
            o.temperature,
            o.top_k,
        )
    )
