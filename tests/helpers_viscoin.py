"""A tiny trained VisCoIN ensemble on the small world at 32 px, built in-process in about 10-30 s on CPU.

Classifier: the `tiny` preset for one epoch. Generator: a random tiny StyleGAN2 (no GAN training needed for
analysis tests). VisCoIN: the `tiny` preset for a few iterations, then exported as a one-file bundle.
`invoke` runs the analysis commands in-process through a Typer app assembled as main.py registers them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import typer
from typer.testing import CliRunner

from core.errors import UserError


@dataclass
class TinyViscoin:
    run_dir: Path  # the VisCoIN training run (best/final.safetensors)
    bundle: Path  # its one-file bundle
    classifier: Path
    generator: Path


def tiny_generator(path: Path, seed: int = 0) -> Path:
    """A randomly initialised 32 px StyleGAN2 generator saved as a checkpoint."""
    from models.stylegan2.checkpoint import save_generator
    from models.stylegan2.networks import Generator

    torch.manual_seed(seed)
    G = Generator(z_dim=64, c_dim=0, w_dim=64, img_resolution=32, img_channels=3,
                  mapping_kwargs=dict(num_layers=2), synthesis_kwargs=dict(channel_base=1024, channel_max=64))  # fmt: skip
    return save_generator(path, G, {"dataset": "world", "source": "random (tests)"})


def build_tiny_viscoin(root: Path, iterations: int = 6) -> TinyViscoin:
    """Train f (1 epoch) and VisCoIN (`iterations` steps) on the small world; export the bundle."""
    from core.rundir import prepare_run_dir
    from models.viscoin_io import load_viscoin, save_bundle
    from training import classifier as clf_training
    from training import viscoin as vc_training

    clf_dir = prepare_run_dir(root / "clf", "train classifier")
    clf_cfg = clf_training.ClassifierConfig.preset(
        "tiny",
        dict(dataset="world", world="small", image_size=32, epochs=1, batch_size=16, device="cpu", amp=False),
    )
    clf_training.train_classifier(clf_cfg, clf_dir, quiet=True)
    generator = tiny_generator(root / "gan.safetensors")
    run_dir = prepare_run_dir(root / "viscoin", "train viscoin")
    cfg = vc_training.VisCoINConfig.preset(
        "tiny",
        dict(
            dataset="world",
            world="small",
            classifier=str(clf_dir),
            generator=str(generator),
            iterations=iterations,
            eval_every=iterations,
            checkpoint_every=iterations,
            warmup=iterations // 2,
            eval_images=16,
            device="cpu",
            amp=False,
        ),
    )
    vc_training.train_viscoin(cfg, run_dir, quiet=True)
    bundle = save_bundle(load_viscoin(run_dir), root / "viscoin.pt")
    return TinyViscoin(run_dir, bundle, clf_dir, generator)


_BUILT: dict[Path, TinyViscoin] = {}


def session_viscoin(tmp_path_factory) -> TinyViscoin:
    """One ensemble per test session, shared by every module that asks (needs the small world's data root)."""
    root = tmp_path_factory.getbasetemp() / "tiny-viscoin"
    if root not in _BUILT:
        _BUILT[root] = build_tiny_viscoin(root)
    return _BUILT[root]


def make_app() -> typer.Typer:
    """The commands as main.py registers them."""
    from cli import amplify as amplify_cli
    from cli import concepts as concepts_cli

    app = typer.Typer()
    app.add_typer(concepts_cli.app, name="concepts")
    app.command("amplify")(amplify_cli.amplify)
    return app


def invoke(*args: str) -> tuple[int, str]:
    """Run the assembled app in-process as `main.main` does: a UserError is one line and exit code 2."""
    from conftest import record_command

    record_command(args)
    result = CliRunner().invoke(make_app(), [str(a) for a in args])
    if isinstance(result.exception, UserError):
        return 2, result.exception.message
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def assert_only_viscoin_trained(before: dict, after: dict) -> None:
    """After VisCoIN steps: Omega's copy of G (synthesis, w_avg) is frozen; its heads and Psi have moved."""
    for key, value in after.items():
        if key.startswith("decoder.synthesis.") or key == "decoder.w_avg":
            assert torch.equal(value, before[key]), key
    for key in ("extractor.conv5.weight", "decoder.heads.0.weight"):
        assert not torch.equal(after[key], before[key]), key
