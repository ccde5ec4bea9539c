"""`demo`: the whole VisCoIN pipeline on the built-in synthetic species world, on CPU."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import Device, Name, Out, Quiet, run_dir_for


def demo(
    world: Annotated[str, typer.Option(help="Synthetic world preset: default or small.")] = "default",
    image_size: Annotated[int, typer.Option(help="Resolution of every model (a power of two).")] = 32,
    classifier_epochs: Annotated[
        int | None, typer.Option(help="Classifier epochs (default: the tiny preset's).")
    ] = None,
    gan_kimg: Annotated[
        float | None, typer.Option(help="StyleGAN2 training length in thousands of images.")
    ] = None,
    viscoin_iterations: Annotated[int | None, typer.Option(help="VisCoIN optimiser steps.")] = None,
    device: Device = "auto",
    out: Out = None,
    name: Name = None,
    quiet: Quiet = False,
) -> None:
    """World -> classifier -> StyleGAN2 -> VisCoIN -> test -> concepts -> amplify, and where the figures are."""
    from training.demo import run_demo

    run_dir = run_dir_for("demo", out, name)
    r = run_demo(run_dir, world=world, image_size=image_size, classifier_epochs=classifier_epochs, gan_kimg=gan_kimg,
                 viscoin_iterations=viscoin_iterations, device=device, quiet=quiet)  # fmt: skip
    v = r["viscoin"]
    typer.echo(
        f"\ndemo finished in {r['seconds'] / 60:.1f} min: classifier test top-1 {r['classifier_test_top1']:.3f}"
    )
    typer.echo(f"VisCoIN on test: accuracy f {v['accuracy_f']:.3f}, Theta {v['accuracy_theta']:.3f}, "
               f"fidelity {v['fidelity']:.3f}, L1 {v['l1']:.3f}, f recognises the species in "
               f"{v['accuracy_f_reconstructions']:.1%} of reconstructions, faithfulness {v['faithfulness']:.3f}, "
               f"concept-attribute AUC {r['alignment']:.3f}, dead concepts {r['dead_concepts']}")  # fmt: skip
    typer.echo("figures:\n  " + "\n  ".join(r["figures"]))
