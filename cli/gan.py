"""StyleGAN2 commands: `train gan` and `import-gan` (NVlabs snapshot -> safetensors); `generate gan` is in cli/generate.py."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import (
    MODEL,
    OPTIM,
    OUTPUT,
    Shared,
    TrainOptions,
    check_classifier_checkpoint,
    training_command,
)
from core.errors import UserError

# Settings a resumed run may change besides the hardware and log cadence; everything else must match.
RESUMABLE = {"kimg", "snapshot_kimg"}


@training_command(
    "train gan",
    data=("dataset", "data_dir", "world", "image_size", "skip_bad_images"),
    helps={
        "image_size": "Resolution in pixels, a power of two.",
        "preset": "Recipe from training/presets/gan.yaml: tiny, world, cub (default per dataset: world->world, "
        "cub and folder->cub).",
        "batch_size": "Images per step over all processes.",
        "lr": "Adam learning rate.",
    },
)
def train_gan(
    options: TrainOptions,
    mirror: Shared = None,
    preset: Shared = None,
    channel_base: Annotated[int | None, typer.Option(help="Channel budget.", rich_help_panel=MODEL)] = None,
    channel_max: Annotated[int | None, typer.Option(help="Channels cap.", rich_help_panel=MODEL)] = None,
    mapping_layers: Annotated[int | None, typer.Option(help="Mapping depth.", rich_help_panel=MODEL)] = None,
    batch_size: Shared = None,
    kimg: Annotated[
        float | None, typer.Option(help="Training length in kimg.", rich_help_panel=OPTIM)
    ] = None,
    lr: Shared = None,
    gamma: Annotated[float | None, typer.Option(help="R1 weight.", rich_help_panel=OPTIM)] = None,
    pl_weight: Annotated[
        float | None, typer.Option(help="Path-length weight (0 = off).", rich_help_panel=OPTIM)
    ] = None,
    style_mixing: Annotated[
        float | None, typer.Option(help="Style-mixing probability.", rich_help_panel=OPTIM)
    ] = None,
    ema_kimg: Annotated[
        float | None, typer.Option(help="G EMA half-life, kimg.", rich_help_panel=OPTIM)
    ] = None,
    mbstd_group: Annotated[
        int | None, typer.Option(help="Minibatch-stddev group.", rich_help_panel=MODEL)
    ] = None,
    aug: Annotated[
        str | None,
        typer.Option(
            help="Discriminator augmentation (NVlabs' bgc transforms on reals and fakes): ada (p adapts so that "
            "E[sign D(real)] stays near --ada-target), fixed (p = --aug-p), none.",
            rich_help_panel=OPTIM,
        ),
    ] = None,
    aug_p: Annotated[
        float | None,
        typer.Option(
            help="Augmentation probability for --aug fixed (ada: its starting p).", rich_help_panel=OPTIM
        ),
    ] = None,
    ada_target: Annotated[
        float | None, typer.Option(help="ADA target r_t (NVlabs 0.6).", rich_help_panel=OPTIM)
    ] = None,
    ada_kimg: Annotated[
        float | None,
        typer.Option(help="ADA speed: kimg for p to move by 1 (NVlabs 500).", rich_help_panel=OPTIM),
    ] = None,
    snapshot_kimg: Annotated[
        float | None, typer.Option(help="kimg between grids, metric and checkpoints.", rich_help_panel=OUTPUT)
    ] = None,
    metric_images: Annotated[
        int | None, typer.Option(help="Real/fake images for the Fréchet distance.", rich_help_panel=OUTPUT)
    ] = None,
    metric_classifier: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            help="Classifier checkpoint whose features the Fréchet distance uses (default: random ResNet-18).",
            rich_help_panel=OUTPUT,
        ),
    ] = None,
) -> None:
    """Train a StyleGAN2 (G_ema.safetensors, sample grids, Fréchet distance in log.jsonl, resume, DDP)."""
    from training.gan.trainer import GanConfig
    from training.gan.trainer import train_gan as run_training

    settings = dict(
        mirror=mirror, channel_base=channel_base, channel_max=channel_max, mapping_layers=mapping_layers,
        batch_size=batch_size, kimg=kimg, lr=lr, gamma=gamma, pl_weight=pl_weight, style_mixing=style_mixing,
        ema_kimg=ema_kimg, mbstd_group=mbstd_group, aug=aug, aug_p=aug_p, ada_target=ada_target, ada_kimg=ada_kimg,
        snapshot_kimg=snapshot_kimg, metric_images=metric_images, metric_classifier=metric_classifier,
    )  # fmt: skip
    cfg, run_dir, summary = options.train(
        GanConfig, preset, settings, RESUMABLE, run_training,
        inputs=lambda cfg: [cfg.metric_classifier],
        check=lambda cfg: check_classifier_checkpoint(cfg.metric_classifier, "--metric-classifier"),
    )  # fmt: skip
    if summary is not None:
        best = summary["best"]
        if best.get("fd") is not None:
            typer.echo(f"best {best['metric']} {best['fd']:.4f} at {best['kimg']:.1f} kimg")
        typer.echo(f"generator: {run_dir / 'G_ema.safetensors'}  ({cfg.data.image_size} px); run: {run_dir}")


def import_gan(
    snapshot: Annotated[
        Path, typer.Argument(help="NVlabs stylegan2-ada-pytorch snapshot (.pkl); no code in it is executed.")
    ],
    out: Annotated[
        Path | None,
        typer.Option(help="Output .safetensors (default checkpoints/stylegan2/<snapshot name>.safetensors)."),
    ] = None,
    dataset: Annotated[
        str | None, typer.Option("--dataset", "-d", help="Dataset name recorded as provenance.")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
) -> None:
    """Convert an NVlabs StyleGAN2-ADA snapshot's G_ema into a safetensors + YAML generator checkpoint."""
    from core.checkpoint import file_hash, read_meta, sidecar_path, sniff_format
    from core.rundir import check_output_file
    from models.stylegan2.checkpoint import save_generator
    from models.stylegan2.nvlabs_import import load_nvlabs_generator

    out = out or Path("checkpoints") / "stylegan2" / f"{snapshot.stem}.safetensors"
    if out.suffix != ".safetensors":
        raise UserError(f"--out must end in .safetensors, got {out}")

    def imported(_) -> bool:  # a generator that import-gan wrote: its sidecar says so
        source = str(read_meta(out).get("source", ""))
        return source.startswith("import-gan ") and (not out.exists() or sniff_format(out) == "safetensors")

    for path in (out, sidecar_path(out)):
        check_output_file(path, overwrite, imported, "a generator written by import-gan")
    G = load_nvlabs_generator(snapshot)
    digest = file_hash(snapshot, length=64)
    meta = {"source": f"import-gan {digest}", "snapshot": snapshot.name, "snapshot_sha256": digest}
    if dataset:
        meta["dataset"] = {"name": dataset}
    save_generator(out, G, meta)
    typer.echo(f"generator {G.img_resolution} px, z {G.z_dim}, w {G.w_dim}, {G.num_ws} ws -> {out}")
