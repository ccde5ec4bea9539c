"""The quickstart pipeline on the synthetic world, on CPU: world -> classifier -> StyleGAN2 -> VisCoIN ->
test -> concept analytics -> amplification, each stage in a sub-folder of one run directory."""

from __future__ import annotations

import time
from pathlib import Path

from core.config import from_preset
from core.rundir import mark_run, prepare_run_dir
from testing.runlogs import plot_run_log

STAGES = 7
DEMO_GAN_KIMG = 28.0  # about 7 minutes on two CPU cores at 32 px


def run_demo(
    out: Path,
    world: str = "default",
    image_size: int = 32,
    classifier_epochs: int | None = None,
    gan_kimg: float | None = None,
    viscoin_iterations: int | None = None,
    device: str = "auto",
    quiet: bool = False,
) -> dict:
    """Run every stage into `out`; returns headline numbers and the paths a user should look at."""
    from testing.amplify import choose_images, plan_amplify, resolve_selection, run_amplify
    from testing.classifier import run_classifier_test
    from testing.concepts import open_analysis, run_concepts
    from testing.viscoin_report import run_viscoin_test
    from training import classifier as tc
    from training import gan as tg
    from training import viscoin as tv

    prepare_run_dir(out, "demo")
    start = time.time()

    def say(stage: int, text: str) -> None:
        if not quiet:
            print(f"[{stage}/{STAGES} {time.time() - start:5.0f}s] {text}", flush=True)

    common = {"dataset": "world", "world": world, "device": device}
    say(1, f"world '{world}' + classifier -> {out / 'classifier'}")
    cfg = from_preset(
        tc.ClassifierConfig,
        tc.PRESETS,
        "tiny",
        {**common, "image_size": image_size, "epochs": classifier_epochs},
    )
    clf_dir = prepare_run_dir(out / "classifier", "train classifier")
    tc.train_classifier(cfg, clf_dir, quiet=quiet)
    clf_test = run_classifier_test(
        clf_dir / "best.safetensors", out / "classifier-test", device=device, quiet=True
    )

    say(2, f"StyleGAN2 -> {out / 'gan'}")
    gan_kimg = gan_kimg if gan_kimg is not None else DEMO_GAN_KIMG
    gan_cfg = from_preset(tg.GanConfig, tg.PRESETS, "tiny", {**common, "image_size": image_size, "kimg": gan_kimg,
                                                             "metric_classifier": str(clf_dir / "best.safetensors")})  # fmt: skip
    gan_dir = prepare_run_dir(out / "gan", "train gan")
    tg.train_gan(gan_cfg, gan_dir, quiet=quiet)

    say(3, f"VisCoIN -> {out / 'viscoin'}")
    vc_cfg = from_preset(tv.VisCoINConfig, tv.PRESETS, "tiny", {**common, "classifier": str(clf_dir),
                                                                "generator": str(gan_dir), "iterations": viscoin_iterations})  # fmt: skip
    vc_dir = prepare_run_dir(out / "viscoin", "train viscoin")
    tv.train_viscoin(vc_cfg, vc_dir, quiet=quiet)

    say(4, f"test VisCoIN -> {out / 'viscoin-test'}")
    metrics = run_viscoin_test(vc_dir, out / "viscoin-test", device=device, quiet=quiet)

    say(5, f"concept analytics -> {out / 'concepts'}")
    analysis = open_analysis(vc_dir, split="test", device=device, quiet=True)
    concepts = run_concepts(analysis, prepare_run_dir(out / "concepts", "concepts"), quiet=quiet)

    say(6, f"amplify -> {out / 'amplify'}")
    selection = resolve_selection(analysis.models.n_concepts)
    images = choose_images(len(analysis.data), None, seed=0)
    plan = plan_amplify(analysis, images, selection, [0.0, 1.0, 2.0, 4.0])
    amplify = run_amplify(plan, analysis, prepare_run_dir(out / "amplify", "amplify"), quiet=quiet)

    say(7, "training curves")
    curves = [plot_run_log(d)["figure"] for d in (clf_dir, gan_dir, vc_dir)]
    mark_run(out, status="finished")
    return {
        "seconds": time.time() - start,
        "classifier_test_top1": clf_test["top1"],
        "viscoin": {
            k: metrics[k]
            for k in (
                "accuracy_f",
                "accuracy_theta",
                "fidelity",
                "accuracy_f_reconstructions",
                "l1",
                "faithfulness",
            )
        },
        "alignment": metrics.get("alignment_mean_best_auc"),
        "dead_concepts": concepts["n_dead"],
        "amplify": amplify,
        "figures": [
            str(out / "viscoin-test" / "reconstructions.png"),
            str(out / "amplify" / "amplify.png"),
            str(out / "concepts"),
            str(gan_dir),
            *map(str, curves),
        ],
    }
