"""VisCoIN commands: `train viscoin`, `test viscoin` and `to-pickle` (registered by main.py / cli groups)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import typer

from cli.common import (
    DATA,
    EVALUATION_OPTIONS,
    HARDWARE,
    MODEL,
    OPTIM,
    OUTPUT,
    DataDir,
    Overwrite,
    Shared,
    TrainOptions,
    run_dir_for,
    training_command,
    with_options,
)
from core.errors import UserError

# Settings a resumed run may change besides the hardware and log cadence; everything else must match.
RESUMABLE = {"iterations", "amp_lpips", "compile", "eval_every", "checkpoint_every"}
Bundle = Annotated[
    Path,
    typer.Option(
        "--bundle",
        "-b",
        exists=True,
        help="to-pickle bundle, VisCoIN checkpoint or training run directory.",
        rich_help_panel=MODEL,
    ),
]


@training_command(
    "train viscoin",
    data=("dataset", "data_dir", "world", "val_fraction", "bbox_crop", "skip_bad_images"),
    helps={
        "log_every": "Optimiser steps between log lines.",
        "preset": "Recipe from training/presets/viscoin.yaml (world->tiny, cub->cub).",
        "batch_size": "Real images per step (as many generated ones are added).",
        "lr": "Learning rate of both optimisers.",
        "eval_every": "Optimiser steps between evaluations.",
    },
)
def train_viscoin_command(
    options: TrainOptions,
    classifier: Annotated[
        Path | None,
        typer.Option(
            help="Trained classifier (.safetensors or run dir); default checkpoints/<dataset>/classifier.safetensors.",
            rich_help_panel=MODEL,
        ),
    ] = None,
    generator: Annotated[
        Path | None,
        typer.Option(
            help="Pretrained StyleGAN2 (.safetensors or train-gan run dir); default checkpoints/<dataset>/gan.safetensors.",
            rich_help_panel=MODEL,
        ),
    ] = None,
    preset: Shared = None,
    n_concepts: Annotated[
        int | None, typer.Option("--n-concepts", "-k", help="Number of concepts K.", rich_help_panel=MODEL)
    ] = None,
    learn_w_avg: Annotated[
        bool | None,
        typer.Option(
            "--learn-w-avg", help="Learn the W offset instead of keeping G's w_avg.", rich_help_panel=MODEL
        ),
    ] = None,
    decoder_lr_multiplier: Annotated[
        float | None,
        typer.Option(
            help="Equalised-LR multiplier of Omega's heads (reference 0.01; larger learns faster).",
            rich_help_panel=MODEL,
        ),
    ] = None,
    lpips_weights: Annotated[
        str | None,
        typer.Option(help="VGG-16 weights for LPIPS: imagenet, a path, or none.", rich_help_panel=MODEL),
    ] = None,
    batch_size: Shared = None,
    iterations: Annotated[int | None, typer.Option(help="Optimiser steps.", rich_help_panel=OPTIM)] = None,
    grad_accum: Annotated[
        int | None, typer.Option(help="Micro-batches per optimiser step.", rich_help_panel=OPTIM)
    ] = None,
    lr: Shared = None,
    alpha: Annotated[
        float | None, typer.Option(help="Output-fidelity weight.", rich_help_panel=OPTIM)
    ] = None,
    beta: Annotated[float | None, typer.Option(help="LPIPS weight.", rich_help_panel=OPTIM)] = None,
    gamma: Annotated[
        float | None, typer.Option(help="Reconstruction-classification weight.", rich_help_panel=OPTIM)
    ] = None,
    delta: Annotated[float | None, typer.Option(help="Sparsity weight.", rich_help_panel=OPTIM)] = None,
    w_reg: Annotated[
        float | None, typer.Option(help="Weight of the ||w - w_avg||^2 regulariser.", rich_help_panel=OPTIM)
    ] = None,
    eval_every: Shared = None,
    eval_images: Annotated[
        int | None, typer.Option(help="Size of the fixed validation subset.", rich_help_panel=OUTPUT)
    ] = None,
    select_metric: Annotated[
        str | None,
        typer.Option(
            help="Validation metric that picks best.safetensors: fidelity (default), accuracy_theta, "
            "accuracy_f_reconstructions, faithfulness (higher wins), l1, l2, lpips (lower wins); ties: later step.",
            rich_help_panel=OUTPUT,
        ),
    ] = None,
    checkpoint_every: Annotated[
        int | None, typer.Option(help="Optimiser steps between resume checkpoints.", rich_help_panel=OUTPUT)
    ] = None,
    amp_lpips: Annotated[
        bool | None,
        typer.Option(
            "--amp-lpips/--no-amp-lpips",
            help="LPIPS under bf16 too (faster; its input gradients moved 15-25% in bf16 on CPU: opt-in).",
            rich_help_panel=HARDWARE,
        ),
    ] = None,
    compile: Shared = None,
) -> None:
    """Train VisCoIN's concept extractor, explainer and concept decoder around a classifier and a StyleGAN2."""
    from training.viscoin import VisCoINConfig, resolve_inputs, train_viscoin

    settings = dict(
        classifier=classifier, generator=generator, n_concepts=n_concepts, learn_w_avg=learn_w_avg,
        decoder_lr_multiplier=decoder_lr_multiplier, lpips_weights=lpips_weights, batch_size=batch_size,
        iterations=iterations, grad_accum=grad_accum, lr=lr, alpha=alpha, beta=beta, gamma=gamma, delta=delta,
        w_reg=w_reg, eval_every=eval_every, eval_images=eval_images, select_metric=select_metric,
        checkpoint_every=checkpoint_every, amp_lpips=amp_lpips, compile=compile,
    )  # fmt: skip

    def inputs(cfg) -> list:
        lpips_file = None if cfg.lpips_weights in ("none", "imagenet", "random") else cfg.lpips_weights
        return [*resolve_inputs(cfg), lpips_file]

    _, run_dir, summary = options.train(
        VisCoINConfig, preset, settings, RESUMABLE, train_viscoin,
        inputs=inputs, check=resolve_inputs,
    )  # fmt: skip
    if summary is not None:
        typer.echo(
            f"finished {summary['steps']} steps; best at step {summary['best']['step']}; run: {run_dir}"
        )


@with_options("batch_size", "device", "amp", "num_workers", "out", "name", "overwrite", "show", "quiet",
              defaults={"batch_size": 32}, helps={"dataset": "Dataset (default: the bundle's)."},
              table=EVALUATION_OPTIONS)  # fmt: skip
def test_viscoin_command(
    o: SimpleNamespace,
    bundle: Bundle,
    split: Shared = "test",
    dataset: Shared = None,
    data_dir: DataDir = None,
    max_images: Annotated[
        int | None, typer.Option(help="Evaluate only the first N images of the split.", rich_help_panel=DATA)
    ] = None,
    concept_threshold: Annotated[
        float,
        typer.Option(
            help="Faithfulness removes the concepts whose relevance / max|relevance| exceeds this tau (the "
            "paper's rule; `amplify` selects with the same default).",
            rich_help_panel=MODEL,
        ),
    ] = 0.2,
    consistency_images: Annotated[
        int,
        typer.Option(
            help="Images (the first of the split) whose concepts are removed one by one for the consistency "
            "metric; 0 skips it (K decodes per image).",
            rich_help_panel=MODEL,
        ),
    ] = 64,
    lpips_weights: Annotated[
        str | None,
        typer.Option(
            help="VGG-16 weights for LPIPS: imagenet, a path or none (default: as trained).",
            rich_help_panel=MODEL,
        ),
    ] = None,
    fid_network: Annotated[
        str,
        typer.Option(
            help="fid-inception: pytorch-fid's TF-ported Inception (comparable with papers); torchvision: "
            "torchvision's ImageNet Inception-v3 (not comparable).",
            rich_help_panel=MODEL,
        ),
    ] = "fid-inception",
    fid_weights: Annotated[
        str,
        typer.Option(
            help="FID: none (skip), pretrained (the network's published weights; `prefetch weights "
            "fid-inception` caches them), a path, or random (smoke tests).",
            rich_help_panel=MODEL,
        ),
    ] = "none",
) -> None:
    """Accuracy of f and Theta, fidelity, reconstruction (L1, L2, LPIPS, FID), faithfulness beside its random
    baseline, consistency, sparsity, and concept-attribute alignment beside its shuffled-attribute null."""
    from datasets.registry import canonical_name
    from testing.fid import fid_line
    from testing.viscoin.report import run_viscoin_test

    dataset = canonical_name(dataset) if dataset else None
    run_dir = run_dir_for("test-viscoin", o.out, o.name)
    m = run_viscoin_test(bundle, run_dir, split=split, dataset=dataset, data_dir=str(data_dir) if data_dir else None,
                         batch_size=o.batch_size, max_images=max_images, threshold=concept_threshold,
                         consistency_images=consistency_images, lpips_weights=lpips_weights, fid_network=fid_network,
                         fid_weights=fid_weights, device=o.device, num_workers=o.num_workers, amp=o.amp, show=o.show,
                         quiet=o.quiet, overwrite=o.overwrite)  # fmt: skip
    typer.echo(f"{m['dataset']}/{split}, {m['n']} images, K={m['n_concepts']}")
    typer.echo(
        f"  accuracy f {m['accuracy_f']:.4f}   accuracy Theta {m['accuracy_theta']:.4f}   fidelity {m['fidelity']:.4f}"
    )
    rec = f"  reconstruction L1 {m['l1']:.4f}   L2 {m['l2']:.4f}   f's accuracy on them {m['accuracy_f_reconstructions']:.4f}"
    if "lpips" in m:
        rec += f"   LPIPS {m['lpips']:.4f} (VGG-16 {m['lpips_backbone']})"
    typer.echo(rec)
    if "fid" in m:
        typer.echo("  " + fid_line(m))
    typer.echo(f"  faithfulness {m['faithfulness']:.4f} (drop in f's p(class) when the concepts with normalised "
               f"relevance > {m['faithfulness_threshold']:g} are removed, {m['faithfulness_removed']:.1f} per image)"
               f"   random baseline {m['faithfulness_random']:.4f} (as many random concepts removed)")  # fmt: skip
    if m.get("consistency") is not None:
        typer.echo(f"  consistency {m['consistency']:.4f} (held-out accuracy telling a concept's removal apart, chance "
                   f"0.5; {m['consistency_concepts']} concepts over {m['consistency_images']} images)")  # fmt: skip
    typer.echo(f"  active concepts per image {m['active_concepts']:.2f}")
    if "alignment_mean_best_auc" in m:
        typer.echo(f"  concept-attribute alignment: mean best AUC {m['alignment_mean_best_auc']:.3f}   null (shuffled "
                   f"attributes) {m['alignment_null_mean']:.3f}, 95th percentile {m['alignment_null_p95']:.3f}")  # fmt: skip
    typer.echo(f"results: {run_dir}")


def to_pickle(
    source: Annotated[
        Path, typer.Argument(exists=True, help="VisCoIN training run directory or checkpoint.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle file to write (.pt).")],
    overwrite: Overwrite = False,
) -> None:
    """Export a trained ensemble (classifier, Psi, Theta, Omega + configs) as one file, loadable with
    torch.load(weights_only=True)."""
    from core.rundir import check_output_file
    from models.viscoin_io import is_bundle, load_viscoin, save_bundle

    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give the bundle's file name, e.g. {out / 'viscoin.pt'}")
    if out.resolve() == source.resolve():
        raise UserError(f"--out {out} would replace the input {source}; choose another file")
    check_output_file(out, overwrite, is_bundle, "a VisCoIN bundle written by to-pickle")
    models = load_viscoin(source)
    save_bundle(models, out)
    typer.echo(f"bundle: {out} (K={models.n_concepts}, {models.num_classes} classes, {models.image_size} px)")
