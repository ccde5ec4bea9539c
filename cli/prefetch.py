"""`prefetch`: fill the caches on a machine with internet (a login node) before jobs run offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import CONTEXT

app = typer.Typer(
    help="Download datasets and weights into their caches (run on a login node).",
    no_args_is_help=True,
    context_settings=CONTEXT,
)


@app.command("cub")
def cub(force: Annotated[bool, typer.Option(help="Download again even if cached.")] = False) -> None:
    """CUB-200-2011 (pinned Kaggle version) into the kagglehub cache ($KAGGLEHUB_CACHE)."""
    from datasets.cub import find_cub_root, read_cub_meta
    from datasets.kaggle import cub_handle, download_cub

    root = find_cub_root(download_cub(force=force))
    meta = read_cub_meta(root)
    typer.echo(f"{cub_handle()}: {len(meta.paths)} images, {meta.num_classes} classes at {root}")


@app.command("world")
def world(
    preset: Annotated[str, typer.Option(help="World preset: default, small or bioscan.")] = "default",
    data_dir: Annotated[
        Path | None, typer.Option(help="Data root (default $BIOVIS_DATA or ~/.cache/biovis/data).")
    ] = None,
) -> None:
    """Generate the synthetic species world (deterministic; done once per preset)."""
    from datasets.cub import read_cub_meta
    from datasets.registry import ensure_world_root

    root = ensure_world_root(preset, data_dir)
    meta = read_cub_meta(root)
    typer.echo(f"world '{preset}': {len(meta.paths)} images, {meta.num_classes} species at {root}")


@app.command("weights")
def weights(
    arch: Annotated[
        str,
        typer.Argument(
            help="fid-inception (pytorch-fid's TF-ported FID Inception, for `test viscoin`), or a torchvision "
            "model: resnet18/34/50, vgg16 (LPIPS), inception_v3 (--fid-network torchvision), vit_b_16."
        ),
    ],
) -> None:
    """Weights into the torch hub cache ($TORCH_HOME), checked against their sha256: the FID Inception or
    torchvision's ImageNet weights."""
    from core.weights import cached_file

    hint = "check this machine's internet access (proxy, firewall) or copy the file into the cache by hand"
    if arch == "fid-inception":
        from testing.fid import FID_WEIGHTS_SHA256, FID_WEIGHTS_URL

        path = cached_file(FID_WEIGHTS_URL, "FID Inception weights", hint, FID_WEIGHTS_SHA256)
    else:
        from models.classifiers import imagenet_url

        path = cached_file(imagenet_url(arch), f"ImageNet weights for {arch}", hint)
    typer.echo(f"{arch}: {path} ({path.stat().st_size / 2**20:.0f} MiB, sha256 checked)")


def download_targets() -> list[str]:
    """Every download a command can make: the datasets, then each pretrained network the project uses
    (classifier and VDNA-extractor backbones, LPIPS's VGG-16, the retrieval ViT, the FID Inception)."""
    from importlib.util import find_spec

    from models.classifiers import ARCHS as CLASSIFIERS
    from models.extractors import ARCHS as EXTRACTORS

    networks = sorted({arch for arch in (*CLASSIFIERS, *EXTRACTORS, "vgg16", "vit_b_16") if arch != "tiny"})
    fid = ["fid-inception"] if find_spec("testing.fid") else []
    return ["world", "cub", *networks, *fid]


@app.command("all")
def all_targets(
    with_cub: Annotated[bool, typer.Option("--cub/--no-cub", help="Include CUB-200-2011 (1.1 GB).")] = True,
    dry_run: Annotated[bool, typer.Option(help="List what would be fetched; fetch nothing.")] = False,
) -> None:
    """Everything any command may download (datasets and weights), so that jobs run with the network off."""
    targets = [t for t in download_targets() if with_cub or t != "cub"]
    if dry_run:
        typer.echo("\n".join(targets))
        return
    for target in targets:
        if target == "world":
            world()
        elif target == "cub":
            cub()
        else:
            weights(target)
