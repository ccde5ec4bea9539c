"""`demo`: the whole pipeline on the built-in synthetic species world, on CPU in a few minutes."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import Device, Name, Out, Quiet, run_dir_for


def demo(
    world: Annotated[str, typer.Option(help="Synthetic world preset: default or small.")] = "default",
    epochs: Annotated[
        int | None, typer.Option(help="Classifier epochs (default: the tiny preset's).")
    ] = None,
    device: Device = "auto",
    out: Out = None,
    name: Name = None,
    quiet: Quiet = False,
) -> None:
    """Build the synthetic world, train and test a classifier, and plot its logs."""
    from training.demo import run_demo

    run_dir = run_dir_for("demo", out, name)
    result = run_demo(run_dir, world=world, epochs=epochs, device=device, quiet=quiet)
    typer.echo(
        f"\ndemo finished: val top-1 {result['val_top1']:.3f}, test top-1 {result['test_top1']:.3f}, "
        f"test top-5 {result['test_top5']:.3f}"
    )
    typer.echo("figures:\n  " + "\n  ".join(result["figures"]))
    typer.echo("numbers:\n  " + "\n  ".join(result["tables"]))
