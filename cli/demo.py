"""`demo`: the whole VisCoIN pipeline on the built-in synthetic species world (CPU or GPU budget)."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import Device, Name, Out, Quiet, run_dir_for


def demo(
    world: Annotated[
        str, typer.Option(help="Synthetic world preset: default, small or bioscan.")
    ] = "default",
    image_size: Annotated[
        int | None,
        typer.Option(help="Resolution of every model, a power of two (default: 32 on CPU, 64 on a GPU)."),
    ] = None,
    classifier_epochs: Annotated[
        int | None, typer.Option(help="Classifier epochs (default: the tiny preset's).")
    ] = None,
    gan_kimg: Annotated[
        float | None,
        typer.Option(
            help="StyleGAN2 training length in thousands of images (default: 28 on CPU, 200 on a GPU)."
        ),
    ] = None,
    viscoin_iterations: Annotated[int | None, typer.Option(help="VisCoIN optimiser steps.")] = None,
    device: Device = "auto",
    out: Out = None,
    name: Name = None,
    quiet: Quiet = False,
) -> None:
    """World -> classifier -> StyleGAN2 -> VisCoIN -> test -> concepts -> amplify, and where the figures are.

    On CPU: 32 px, a tiny GAN, about 10 minutes on two cores. With a CUDA device (--device cuda, or auto on a
    GPU node): 64 px and a larger, longer-trained GAN whose reconstructions keep pose, position and colours."""
    from training.demo import run_demo

    run_dir = run_dir_for("demo", out, name)
    r = run_demo(run_dir, world=world, image_size=image_size, classifier_epochs=classifier_epochs, gan_kimg=gan_kimg,
                 viscoin_iterations=viscoin_iterations, device=device, quiet=quiet)  # fmt: skip
    v = r["viscoin"]
    typer.echo(f"\ndemo finished in {r['seconds'] / 60:.1f} min ({r['budget']} budget, {r['image_size']} px): "
               f"classifier test top-1 {r['classifier_test_top1']:.3f}")  # fmt: skip
    lpips = (f"LPIPS {v['lpips']:.3f}" if v.get("lpips") is not None
             else "LPIPS not computed (VGG-16 weights not cached: `python main.py prefetch weights vgg16`)")  # fmt: skip
    typer.echo(f"VisCoIN on test: accuracy f {v['accuracy_f']:.3f}, Theta {v['accuracy_theta']:.3f}, "
               f"fidelity {v['fidelity']:.3f}")  # fmt: skip
    typer.echo(f"reconstructions: L1 {v['l1']:.3f}, {lpips}, f recognises the species in "
               f"{v['accuracy_f_reconstructions']:.1%} of reconstructions")  # fmt: skip
    consistency = "n/a" if v.get("consistency") is None else f"{v['consistency']:.3f}"
    typer.echo(f"faithfulness {v['faithfulness']:.3f} (random baseline {v['faithfulness_random']:.3f}, tau "
               f"{v['faithfulness_threshold']:g}), consistency {consistency} (chance 0.5), concept-attribute "
               f"AUC {r['alignment']:.3f} (null {v['alignment_null_mean']:.3f}), dead concepts {r['dead_concepts']}")  # fmt: skip
    typer.echo("figures:\n  " + "\n  ".join(r["figures"]))
