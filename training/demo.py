"""The quickstart pipeline on the synthetic world: world -> classifier -> StyleGAN2 -> VisCoIN -> test ->
concept analytics -> amplification, each stage in a sub-folder of one run directory.

The budget follows the device: on CPU 32 px and a 28 kimg tiny GAN (about 10 minutes on two cores, the
reconstructions are coarse); on a CUDA GPU 64 px and a `world`-preset GAN trained long enough for
reconstructions that keep the input's position, pose and colours (planned for about 5 minutes on one H100).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from core.rundir import mark_run, prepare_run_dir
from testing.runlogs import plot_run_log

STAGES = 7


@dataclass(frozen=True)
class DemoBudget:
    """What the demo trains: resolution, the presets of each stage and their lengths."""

    name: str
    image_size: int
    classifier_epochs: int | None  # None: the tiny preset's
    gan_preset: str
    gan_kimg: float
    gan_overrides: dict
    viscoin_iterations: int | None  # None: the tiny preset's
    viscoin_overrides: dict


BUDGETS = {
    # two CPU cores: about 7 minutes of GAN training at 32 px, 10 minutes in all
    "cpu": DemoBudget("cpu", 32, None, "tiny", 28.0, {}, None, {}),
    # one GPU: a medium 64 px StyleGAN2 (the world preset without path-length regularisation, which costs a
    # quarter of the step for little at this length) for 200 kimg, and 4000 VisCoIN steps at batch 16
    "cuda": DemoBudget("cuda", 64, 12, "world", 200.0,
                       {"pl_weight": 0.0, "snapshot_kimg": 50, "metric_images": 500, "grid_size": 32},
                       4000, {"batch_size": 16, "eval_every": 1000, "checkpoint_every": 1000, "eval_images": 256}),
}  # fmt: skip


def demo_budget(device: str) -> DemoBudget:
    """The GPU budget when `device` resolves to CUDA (auto on a GPU node, cuda, cuda:N), else the CPU one."""
    from core.device import resolve_device

    return BUDGETS["cuda" if resolve_device(device).type == "cuda" else "cpu"]


def lpips_weights_cached() -> bool:
    """Whether LPIPS's VGG-16 ImageNet weights are in the hub cache (the demo never downloads them)."""
    import os

    from core.weights import hub_dir
    from models.classifiers import imagenet_url

    return (hub_dir() / os.path.basename(imagenet_url("vgg16"))).is_file()


def run_demo(
    out: Path,
    world: str = "default",
    image_size: int | None = None,
    classifier_epochs: int | None = None,
    gan_kimg: float | None = None,
    viscoin_iterations: int | None = None,
    device: str = "auto",
    quiet: bool = False,
) -> dict:
    """Run every stage into `out` with the device's budget (arguments given override it); returns headline
    numbers and the paths a user should look at."""
    from testing.classifier import run_classifier_test
    from testing.viscoin.amplify import choose_images, plan_amplify, resolve_selection, run_amplify
    from testing.viscoin.concepts import open_analysis, run_concepts
    from testing.viscoin.report import run_viscoin_test
    from training import classifier as tc
    from training import viscoin as tv
    from training.gan import trainer as tg

    budget = demo_budget(device)
    image_size = image_size or budget.image_size
    lpips = "imagenet" if budget.name == "cuda" and lpips_weights_cached() else "none"
    prepare_run_dir(out, "demo")
    start = time.time()

    def say(stage: int, text: str) -> None:
        if not quiet:
            print(f"[{stage}/{STAGES} {time.time() - start:5.0f}s] {text}", flush=True)

    common = {"dataset": "world", "world": world, "device": device}
    say(1, f"{budget.name} budget, {image_size} px; world '{world}' + classifier -> {out / 'classifier'}")
    cfg = tc.ClassifierConfig.preset(
        "tiny",
        {**common, "image_size": image_size, "epochs": classifier_epochs or budget.classifier_epochs},
    )
    clf_dir = prepare_run_dir(out / "classifier", "train classifier")
    tc.train_classifier(cfg, clf_dir, quiet=quiet)
    clf_test = run_classifier_test(
        clf_dir / "best.safetensors", out / "classifier-test", device=device, quiet=True
    )

    say(2, f"StyleGAN2 -> {out / 'gan'}")
    gan_kimg = gan_kimg if gan_kimg is not None else budget.gan_kimg
    gan_cfg = tg.GanConfig.preset(
        budget.gan_preset,
        {
            **common,
            **budget.gan_overrides,
            "image_size": image_size,
            "kimg": gan_kimg,
            "metric_classifier": str(clf_dir / "best.safetensors"),
        },
    )
    gan_dir = prepare_run_dir(out / "gan", "train gan")
    tg.train_gan(gan_cfg, gan_dir, quiet=quiet)

    say(3, f"VisCoIN -> {out / 'viscoin'}")
    vc_cfg = tv.VisCoINConfig.preset(
        "tiny",
        {
            **common,
            **budget.viscoin_overrides,
            "classifier": str(clf_dir),
            "generator": str(gan_dir),
            "iterations": viscoin_iterations or budget.viscoin_iterations,
            "lpips_weights": lpips,
            "beta": 1.0 if lpips != "none" else 0.0,
        },
    )
    vc_dir = prepare_run_dir(out / "viscoin", "train viscoin")
    tv.train_viscoin(vc_cfg, vc_dir, quiet=quiet)

    say(4, f"test VisCoIN -> {out / 'viscoin-test'}")
    metrics = run_viscoin_test(vc_dir, out / "viscoin-test", device=device, quiet=quiet, lpips_weights=lpips)

    say(5, f"concept analytics -> {out / 'concepts'}")
    analysis = open_analysis(vc_dir, split="test", device=device, quiet=True)
    concepts = run_concepts(analysis, prepare_run_dir(out / "concepts", "concepts"), quiet=quiet)

    say(6, f"amplify -> {out / 'amplify'}")
    selection = resolve_selection(analysis.models.n_concepts)  # the paper's rule, as `test viscoin`
    images = choose_images(len(analysis.data), None, seed=0)
    plan = plan_amplify(analysis, images, selection, [0.0, 1.0, 2.0, 4.0])
    amplify = run_amplify(plan, analysis, prepare_run_dir(out / "amplify", "amplify"), quiet=quiet)

    say(7, "training curves")
    curves = [plot_run_log(d)["figure"] for d in (clf_dir, gan_dir, vc_dir)]
    mark_run(out, status="finished")
    keys = ("accuracy_f", "accuracy_theta", "fidelity", "accuracy_f_reconstructions", "l1", "lpips", "faithfulness",
            "faithfulness_random", "faithfulness_threshold", "consistency", "alignment_mean_best_auc",
            "alignment_null_mean")  # fmt: skip
    return {
        "seconds": time.time() - start,
        "budget": budget.name,
        "image_size": image_size,
        "classifier_test_top1": clf_test["top1"],
        "viscoin": {k: metrics.get(k) for k in keys},
        "alignment": metrics.get("alignment_mean_best_auc"),
        "dead_concepts": concepts["n_dead"],
        "amplify": amplify,
        "figures": [
            str(out / "viscoin-test" / "reconstructions.png"),
            str(out / "viscoin-test" / "metrics.png"),
            str(out / "amplify" / "amplify.png"),
            str(out / "concepts"),
            str(gan_dir),
            *map(str, curves),
        ],
    }
