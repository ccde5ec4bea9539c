"""`amplify`: scale the concepts that explain chosen images, regenerate them, and see what f makes of it."""

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
    REQUIRED,
    EvalDataset,
    results_dir,
    reworded,
    with_options,
)
from core.errors import UserError

SELECT = "Concept selection"

Bundle = Annotated[
    Path,
    typer.Option("--bundle", "-b", exists=True, rich_help_panel=MODEL,
                 help="to-pickle bundle (.pt), VisCoIN .safetensors checkpoint, or a training run directory."),
]  # fmt: skip
ImageIndices = Annotated[
    str | None,
    typer.Option(rich_help_panel=DATA,
                 help="Comma-separated indices into the split, e.g. 0,5,9 (default: 5 drawn with --seed)."),
]  # fmt: skip
Seed = Annotated[
    int, typer.Option(help="Seed of the default images and the random baseline.", rich_help_panel=DATA)
]

# The bundle and the images of a split that `amplify` and `concepts heatmaps` read (cli.common.with_options)
IMAGES = {
    "bundle": (Bundle, REQUIRED),
    "dataset": (reworded(EvalDataset, "Dataset (default: the bundle's; another is refused)."), None),
    "split": EVALUATION_OPTIONS["split"],
    "image_indices": (ImageIndices, None),
    "seed": (Seed, 0),
}
images_command = with_options(
    "seed", "batch_size", "device", "out", "name", "overwrite", "show", "quiet",
    first=("bundle", "dataset", "data_dir", "split", "image_indices"), defaults={"batch_size": 16}, table=IMAGES,
)  # fmt: skip


def parse_list(text: str | None, option: str, kind: type = int) -> list | None:
    """'0,5,9' -> [0, 5, 9] (or floats); None stays None; anything else is a one-line UserError."""
    if text is None:
        return None
    try:
        values = [kind(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise UserError(
            f"{option} takes comma-separated {kind.__name__}s such as 0,5,9, got {text!r}"
        ) from None
    if not values:
        raise UserError(f"{option} is empty: give comma-separated values such as 0,5,9")
    return values


def check_batch_size(batch_size: int) -> None:
    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}")


@images_command
def amplify(
    o: SimpleNamespace,
    concept_threshold: Annotated[
        float | None,
        typer.Option(
            rich_help_panel=SELECT,
            help="Select concepts with relevance / max|relevance| above T, T in [0, 1] (the default, T = 0.2, "
            "is the paper's rule and `test viscoin`'s faithfulness threshold).",
        ),
    ] = None,  # fmt: skip
    concept_top_k: Annotated[
        int | None,
        typer.Option(help="Select the K most relevant concepts instead.", rich_help_panel=SELECT),
    ] = None,
    concept_indices: Annotated[
        str | None, typer.Option(help="Select these concepts, e.g. 1,2.", rich_help_panel=SELECT)
    ] = None,
    multipliers: Annotated[
        str,
        typer.Option(
            help="Comma-separated factors applied to the selected concepts.", rich_help_panel=SELECT
        ),
    ] = "0,1,2,4",
) -> None:
    """Scale the concepts that explain Theta's prediction by each multiplier, regenerate the image and record
    f's probability of that class, against scaling as many random concepts. Grid figure, CSV, summary.json."""
    from core.rundir import mark_run
    from testing.viscoin.amplify import (
        check_selection_options,
        choose_images,
        plan_amplify,
        resolve_selection,
        run_amplify,
    )
    from testing.viscoin.concepts import open_analysis

    factors = parse_list(multipliers, "--multipliers", float)
    if not all(math.isfinite(m) and m >= 0 for m in factors):
        raise UserError(
            f"--multipliers must be finite and >= 0 (concept maps are non-negative), got {multipliers}"
        )
    check_batch_size(o.batch_size)
    indices = parse_list(o.image_indices, "--image-indices")
    chosen_concepts = parse_list(concept_indices, "--concept-indices")
    check_selection_options(concept_threshold, concept_top_k, chosen_concepts)
    analysis = open_analysis(o.bundle, o.dataset, o.data_dir, o.split, o.device, quiet=o.quiet)
    selection = resolve_selection(
        analysis.models.n_concepts, concept_threshold, concept_top_k, chosen_concepts
    )
    image_ids = choose_images(len(analysis.data), indices, o.seed, split=f"the {o.split}")
    plan = plan_amplify(analysis, image_ids, selection, factors, o.seed, o.batch_size)
    for line in plan.empty_lines():
        typer.echo(line)
    config = {"bundle": str(o.bundle), "bundle_hash": analysis.models.content_hash, "dataset": analysis.spec.dataset,
              "split": o.split, "images": image_ids, "selection": selection.describe(), "multipliers": factors,
              "seed": o.seed}  # fmt: skip
    run_dir = results_dir("amplify", o, [o.bundle, o.data_dir], config)
    summary = run_amplify(plan, analysis, run_dir, o.batch_size, show=o.show, quiet=o.quiet)
    mark_run(run_dir, status="finished")
    for m in summary["mean_p_selected"]:
        typer.echo(
            f"x{m}: mean p selected {summary['mean_p_selected'][m]:.3f}  random {summary['mean_p_random'][m]:.3f}"
        )
    typer.echo(f"results: {run_dir}")
