"""`vdna`: build, calibrate, inspect and compare Visual DNAs (per-neuron activation distributions)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import typer

from cli.common import (
    CONTEXT,
    DATA,
    HARDWARE,
    MODEL,
    OUTPUT,
    Device,
    Overwrite,
    Quiet,
    Shared,
    Show,
    Workers,
    with_options,
)
from core.errors import UserError

app = typer.Typer(
    help="Visual DNA: per-neuron activation distributions of image sets, and their distances.",
    no_args_is_help=True,
    context_settings=CONTEXT,
)
DIST = "Distribution"

Source = Annotated[
    str,
    typer.Argument(
        help="Image folder (recursive), .txt list of paths, generate output folder, or world[:PRESET]:SPLIT, "
        "cub[:DIR]:SPLIT, folder:DIR[:SPLIT]."
    ),
]
Extractor = Annotated[
    str,
    typer.Option(
        "--extractor",
        "-e",
        help="resnet50, vgg16, inception_v3, vit_b_16 (torchvision weights or --weights), rand_<arch>[-seedK], "
        "classifier:PATH[:blocks].",
        rich_help_panel=MODEL,
    ),
]
Weights = Annotated[
    Path | None,
    typer.Option(exists=True, dir_okay=False, help="Local state dict for a torchvision extractor.",
                 rich_help_panel=MODEL),
]  # fmt: skip
Distribution = Annotated[
    str,
    typer.Option(help="histogram-N, gaussian, layer-gaussian or activation-ranges.", rich_help_panel=DIST),
]
Ranges = Annotated[
    Path | None,
    typer.Option(
        exists=True,
        dir_okay=False,
        help="Activation ranges for histograms: vdna's activation_ranges.json or an activation-ranges VDNA "
        "(default: this extractor's cached `vdna calibrate`).",
        rich_help_panel=DIST,
    ),
]
ImageSize = Annotated[
    int | None, typer.Option(help="Input size in pixels (default: the extractor's).", rich_help_panel=DATA)
]
Resize = Annotated[
    str | None,
    typer.Option(
        help="center-crop (shorter side, then centre crop), clean (vdna: float bicubic squash) or clean-center.",
        rich_help_panel=DATA,
    ),
]
NumImages = Annotated[
    int | None,
    typer.Option(help="Use a random subset of this many images (default: all).", rich_help_panel=DATA),
]
Seed = Annotated[int, typer.Option(help="Seed of the --num-images subset.", rich_help_panel=DATA)]
BatchSize = Annotated[
    int,
    typer.Option(
        help="Images per forward pass. On the CPU at most this many: the extractor runs on as many as keep "
        "its features within 96 MB (faster, same features); the VDNA records the batch it used.",
        rich_help_panel=HARDWARE,
    ),
]
Amp = Annotated[
    bool, typer.Option("--amp/--no-amp", help="bf16 forward on CUDA (statistics in float32/64).",
                       rich_help_panel=HARDWARE),
]  # fmt: skip


# The extraction options of `vdna make` and `vdna calibrate` (cli.common.with_options)
EXTRACTION = {
    "extractor": (Extractor, "rand_resnet50"),
    "weights": (Weights, None),
    "image_size": (ImageSize, None),
    "resize": (Resize, "center-crop"),
    "num_images": (NumImages, None),
    "seed": (Seed, 0),
    "batch_size": (BatchSize, 64),
    "num_workers": (Workers, None),
    "device": (Device, "auto"),
    "amp": (Amp, True),
}
extraction_options = with_options(first=tuple(EXTRACTION), table=EXTRACTION)
# `vdna compare` builds a VDNA of a source as `vdna make` would
MAKE = {**EXTRACTION, "distribution": (Distribution, "histogram-1000"), "ranges": (Ranges, None)}


def _extract(o: SimpleNamespace) -> dict:
    """The extraction options as the pipeline's keywords (after the checks every extraction makes)."""
    check_sizes(o.image_size, o.num_images, o.batch_size)
    return {"extractor": o.extractor, "batch_size": o.batch_size, "num_workers": o.num_workers, "device": o.device,
            "image_size": o.image_size, "num_images": o.num_images, "seed": o.seed, "weights": o.weights,
            "resize": o.resize, "amp": o.amp}  # fmt: skip


def _describe(vdna) -> str:
    neurons = sum(vdna.neurons_list.values())
    return (
        f"{vdna.name} VDNA of {vdna.num_images} images with {vdna.feature_extractor_name} "
        f"({len(vdna.neurons_list)} layers, {neurons:,} neurons)"
    )


def _skipped(vdna) -> str:
    settings = vdna.data_settings
    parts = []
    if settings.get("non_image_files_skipped"):
        parts.append(f"{settings['non_image_files_skipped']} non-image files")
    if settings.get("unreadable_images_skipped"):
        parts.append(f"{settings['unreadable_images_skipped']} unreadable images")
    return f"skipped {' and '.join(parts)} in {settings.get('source')}" if parts else ""


def check_sizes(image_size: int | None, num_images: int | None, batch_size: int) -> None:
    """Refuse sizes that would mean something else than asked (0 images is not "all")."""
    from datasets.registry import check_image_size

    check_image_size(image_size)
    if num_images is not None and num_images < 1:
        raise UserError(f"--num-images must be at least 1 (leave it out for all images), got {num_images}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")


@app.command("make")
@extraction_options
def make(
    o: SimpleNamespace,
    source: Source,
    out: Annotated[
        Path,
        typer.Option(help="Output path: writes OUT.json + OUT.npz (vdna's layout).", rich_help_panel=OUTPUT),
    ],
    distribution: Distribution = "histogram-1000",
    ranges: Ranges = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Build the VDNA of SOURCE in one streaming pass and save it."""
    extraction = _extract(o)
    from core.rundir import check_output_file
    from core.vdna import save_vdna, vdna_paths
    from core.vdna.io import is_vdna_file
    from testing.vdna.pipeline import make_vdna

    json_path, npz_path = vdna_paths(out)
    for path in (json_path, npz_path):
        check_output_file(path, overwrite, is_vdna_file, "one of a VDNA pair (<name>.json + <name>.npz)")
    vdna = make_vdna(source, distribution=distribution, ranges=ranges, quiet=quiet, **extraction)
    save_vdna(vdna, out)
    typer.echo(f"made {_describe(vdna)} -> {json_path} + {npz_path.name}")
    settings = vdna.extraction_settings
    if settings.get("activation_ranges_id") and ranges is None:
        typer.echo(
            f"histogram bins from the cached calibration {settings['activation_ranges_id']} "
            f"({settings.get('activation_ranges_origin')}); VDNAs to compare must share it (--ranges)"
        )
    if _skipped(vdna):
        typer.echo(_skipped(vdna))


@app.command("calibrate")
@extraction_options
def calibrate(
    o: SimpleNamespace,
    source: Source,
    force: Annotated[bool, typer.Option(help="Recompute even if cached.", rich_help_panel=OUTPUT)] = False,
    quiet: Quiet = False,
) -> None:
    """Per-neuron activation ranges of SOURCE for histograms, cached per extractor ($BIOVIS_CACHE)."""
    extraction = _extract(o)
    from testing.vdna.pipeline import calibrate as run_calibration

    vdna, path, cached = run_calibration(source, force=force, quiet=quiet, **extraction)
    state = "already cached (--force recomputes)" if cached else "cached"
    typer.echo(
        f"activation ranges of {vdna.feature_extractor_name} on {vdna.num_images} images {state}: {path}"
    )
    if _skipped(vdna):
        typer.echo(_skipped(vdna))


@app.command("compare")
@with_options(
    table=MAKE,
    helps={
        "extractor": "For sources (default: A's, else rand_resnet50).",
        "distribution": "For sources (default: the saved VDNA's, else histogram-1000).",
    },
)
def compare(
    a: Annotated[str, typer.Argument(help="Saved VDNA (path with or without .json/.npz) or a source.")],
    b: Annotated[str, typer.Argument(help="Saved VDNA or a source, built like A.")],
    distance: Annotated[
        str | None, typer.Option(help="emd, nfd or fd (default: emd for histograms, nfd for gaussians).")
    ] = None,
    layer: Annotated[str | None, typer.Option(help="Restrict to one layer.")] = None,
    neuron: Annotated[int | None, typer.Option(help="Restrict to one neuron of --layer.")] = None,
    top_k: Annotated[int, typer.Option(help="Most different neurons to plot.", rich_help_panel=OUTPUT)] = 8,
    extractor: Shared = None,
    weights: Weights = None,
    distribution: Shared = None,
    ranges: Ranges = None,
    image_size: ImageSize = None,
    resize: Resize = None,
    num_images: NumImages = None,
    seed: Seed = 0,
    batch_size: BatchSize = 64,
    num_workers: Workers = None,
    device: Device = "auto",
    amp: Amp = True,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Folder for figures and CSVs (default runs/vdna-compare/<time>).", rich_help_panel=OUTPUT
        ),
    ] = None,  # fmt: skip
    overwrite: Overwrite = False,
    show: Show = False,
    quiet: Quiet = False,
) -> None:
    """Distance between A and B, with the distance per layer and the most different neurons as figures."""
    check_sizes(image_size, num_images, batch_size)
    from cli.common import run_dir_for
    from core.rundir import check_run_dir, mark_run, prepare_run_dir
    from testing.vdna.pipeline import BuildOptions, compare_vdnas, is_saved_vdna, open_or_make
    from testing.vdna.plots import write_comparison

    if top_k < 0:
        raise UserError(f"--top-k must be at least 0, got {top_k}")
    options = BuildOptions(extractor, str(weights) if weights else None, distribution,
                           str(ranges) if ranges else None, batch_size, num_workers, device, image_size, resize,
                           num_images, seed, amp, quiet)  # fmt: skip
    run_dir = run_dir_for("vdna-compare", out, None)
    inputs = [p for p in (a, b, weights, ranges) if p is not None and Path(p).exists()]
    check_run_dir(run_dir, "vdna compare", overwrite=overwrite, inputs=inputs, resumable=False)
    saved_a, saved_b = is_saved_vdna(a), is_saved_vdna(b)
    shared = None
    if not saved_a and not saved_b:  # two sources: one extractor for both
        from models.extractors import build_extractor

        shared = build_extractor(extractor or "rand_resnet50", options.weights, image_size)
    if saved_a or not saved_b:
        va = open_or_make(a, options, extractor=shared)
        vb = open_or_make(b, options, reference=va if saved_a else None, extractor=shared)
    else:  # a source against a saved VDNA: built like the saved one
        vb = open_or_make(b, options)
        va = open_or_make(a, options, reference=vb)
    result = compare_vdnas(va, vb, distance, layer, neuron, top_k)
    run_dir = prepare_run_dir(run_dir, "vdna compare", overwrite=overwrite, inputs=inputs, resumable=False)
    labels = (Path(a).name or a, Path(b).name or b)
    write_comparison(result, va, vb, labels, run_dir, layer, show)
    mark_run(run_dir, status="finished", distance=result.distance, value=result.value)
    where = f" on layer {layer}" + (f" neuron {neuron}" if neuron is not None else "") if layer else ""
    typer.echo(
        f"{result.distance.upper()}{where} = {result.value:.6g}  [{va.feature_extractor_name}, {va.name}; "
        f"A: {va.num_images} images, B: {vb.num_images} images]"
    )
    typer.echo(f"figures and tables: {run_dir}")


@app.command("inspect")
def inspect(
    path: Annotated[str, typer.Argument(help="Saved VDNA (path with or without .json/.npz).")],
) -> None:
    """Metadata and a per-layer summary of a saved VDNA."""
    from rich.console import Console
    from rich.table import Table

    from core.vdna import load_vdna
    from testing.vdna.pipeline import summarize

    vdna = load_vdna(path)
    typer.echo(_describe(vdna))
    data, extraction = vdna.data_settings, vdna.extraction_settings
    facts = {
        "source": data.get("source"),
        "image size": data.get("image_size"),
        "resize": data.get("resize") or data.get("resize_mode"),
        "made": vdna.time_of_compute,
        "activation ranges": extraction.get("activation_ranges_id"),
        "skipped": _skipped(vdna) or None,
    }
    for key, value in facts.items():
        if value is not None:
            typer.echo(f"{key}: {value}")
    frame = summarize(vdna)
    table = Table(title=f"{vdna.name} per layer")
    for column in frame.columns:
        table.add_column(str(column), justify="left" if column == "layer" else "right")
    for row in frame.itertuples(index=False):
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    Console(width=160).print(table)
