"""`concepts`: concept analytics of a VisCoIN ensemble over a split; `concepts heatmaps`: where concepts fire."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Annotated

import typer

from cli.amplify import IMAGES, check_batch_size, images_command, parse_list
from cli.common import CONTEXT, MODEL, OUTPUT, results_dir, with_options
from core.errors import UserError

app = typer.Typer(
    help="Concept analytics of a VisCoIN ensemble over a split: activation profile, per-concept totals and "
    "dead concepts, class x concept and concept x class importance, concept entropy, co-activation and "
    "Theta's top concepts per class (figures, CSVs, summary.json; per-image activations cached under the "
    "bundle's hash and the data, --force recomputes). `concepts heatmaps`: where the top concepts fire.",
    no_args_is_help=True,
    invoke_without_command=True,
    context_settings=CONTEXT,
)


@app.callback(invoke_without_command=True)
@with_options(
    "batch_size", "device", "out", "name", "overwrite", "show", "quiet",
    first=("bundle", "dataset", "data_dir", "split"), defaults={"bundle": None}, table=IMAGES,
)  # fmt: skip
def concepts(
    o: SimpleNamespace,
    ctx: typer.Context,
    force: Annotated[
        bool, typer.Option(help="Recompute the per-image activations even if cached.", rich_help_panel=OUTPUT)
    ] = False,
) -> None:
    """Activation profile, per-concept totals and dead concepts, class x concept and concept x class
    importance, concept entropy, co-activation and Theta's top concepts per class: figures, CSVs and
    summary.json. The per-image activations are cached under the bundle's hash, the data and the split."""
    if ctx.invoked_subcommand is not None:
        return
    if o.bundle is None:
        raise UserError("concepts needs --bundle PATH (a to-pickle bundle or a VisCoIN run directory)")
    from core.rundir import mark_run
    from testing.viscoin.concepts import open_analysis, run_concepts

    check_batch_size(o.batch_size)
    analysis = open_analysis(o.bundle, o.dataset, o.data_dir, o.split, o.device, quiet=o.quiet)
    config = {"bundle": str(o.bundle), "bundle_hash": analysis.models.content_hash, "dataset": analysis.spec.dataset,
              "split": o.split, "force": force}  # fmt: skip
    run_dir = results_dir("concepts", o, [o.bundle, o.data_dir], config)
    summary = run_concepts(analysis, run_dir, o.batch_size, force=force, show=o.show, quiet=o.quiet)
    mark_run(run_dir, status="finished")
    cache = summary["cache"]
    typer.echo(
        f"activations: {'used the cache' if cache['hit'] else 'computed and cached'} ({cache['path']})"
    )
    typer.echo(
        f"{summary['n_images']} images: accuracy f {summary['accuracy_f']:.4f}, Theta {summary['accuracy_theta']:.4f}, "
        f"fidelity {summary['fidelity']:.4f}; {summary['n_dead']}/{summary['n_concepts']} concepts dead, "
        f"{summary['mean_active']:.1f} active per image"
    )
    typer.echo(f"results: {run_dir}")


@app.command("heatmaps", context_settings=CONTEXT)
@images_command
def heatmaps(
    o: SimpleNamespace,
    top: Annotated[
        int,
        typer.Option(help="Concepts per image, by relevance to Theta's prediction.", rich_help_panel=MODEL),
    ] = 3,
) -> None:
    """For chosen images, each top concept's map upsampled and overlaid on the image: grid PNG + CSV."""
    from core.rundir import mark_run
    from testing.viscoin.amplify import choose_images
    from testing.viscoin.concepts import open_analysis
    from testing.viscoin.heatmaps import check_top, run_heatmaps

    check_batch_size(o.batch_size)
    indices = parse_list(o.image_indices, "--image-indices")
    analysis = open_analysis(o.bundle, o.dataset, o.data_dir, o.split, o.device, quiet=o.quiet)
    check_top(top, analysis.models.n_concepts)
    image_ids = choose_images(len(analysis.data), indices, o.seed, split=f"the {o.split}")
    config = {"bundle": str(o.bundle), "bundle_hash": analysis.models.content_hash, "dataset": analysis.spec.dataset,
              "split": o.split, "images": image_ids, "top": top}  # fmt: skip
    run_dir = results_dir("concepts heatmaps", o, [o.bundle, o.data_dir], config)
    run_heatmaps(analysis, image_ids, run_dir, top, o.batch_size, show=o.show)
    mark_run(run_dir, status="finished")
    typer.echo(f"heat maps of {len(image_ids)} images: {run_dir / 'heatmaps.png'}")
