"""Host syncs per training step of each trainer's real loop (issue 15: a step that waits for the GPU at every
`.item()` cannot keep it busy). Runs `train classifier`, `train gan` and `train viscoin` for a few steps at
tiny size on the small world and reports every sync made by the training loop (evaluation, snapshots and
checkpoint writing left out, set-up included), by call site, with its count per step.

    python bench/bench_syncs.py --device cpu            # project-code conversions that sync on a GPU
    python bench/bench_syncs.py --device cuda           # what torch's sync debug mode reports on a GPU

On the CPU nothing synchronises: `core.syncs` counts the conversions (`item`, `bool`, `float`, `tolist`...)
that the project's code makes, which are the syncs on a GPU; on CUDA it counts what torch reports.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRAINERS = ("classifier", "gan", "viscoin")
LOOPS = {"train_classifier", "train_gan", "train_viscoin"}  # a sync counts when one of these is on the stack
# evaluation, snapshots and checkpoint writing
LEFT_OUT = {"evaluate_classifier", "evaluate_viscoin", "snapshot", "Evaluator.__init__", "Evaluator.__call__",
            "save", "save_resume", "save_mid_epoch", "save_weights", "save_generator", "save_grid",
            "fixed_subset", "resolve_meta"}  # fmt: skip
# conversions of host tensors, which the CPU count cannot tell from device ones: a host generator's draw of
# batch indices, the loader's geometry rows
HOST_SIDE = {"StepBatches.__iter__", "to_model_images"}


def site_of(frame, left_out: set[str]) -> str | None:
    """`file:line function` of the innermost project frame, when a training loop and no `left_out` function
    is on the stack; else None."""
    names, site = [], None
    while frame is not None:
        code = frame.f_code
        if code.co_filename.startswith(str(ROOT)) and "site-packages" not in code.co_filename:
            names.append(code.co_qualname)
            if site is None:
                site = f"{Path(code.co_filename).relative_to(ROOT)}:{frame.f_lineno} {code.co_qualname}"
        frame = frame.f_back
    return site if LOOPS & set(names) and not left_out & set(names) else None


def run_counted(train, cfg, run_dir: Path, device) -> Counter:
    from core.syncs import watch_syncs

    sites: Counter = Counter()
    left_out = LEFT_OUT if device.type == "cuda" else LEFT_OUT | HOST_SIDE

    def on_sync(kind, frame):
        site = site_of(frame, left_out)
        if site is not None:
            sites[f"{site} ({kind})"] += 1

    with watch_syncs(device, on_sync):
        train(cfg, run_dir, quiet=True)
    return sites


def report(name: str, sites: Counter, steps: int, log_every: int) -> None:
    total = sum(sites.values())
    print(
        f"\n{name}: {steps} steps, a log line every {log_every}: {total} syncs, {total / steps:.2f} per step"
    )
    for site, count in sites.most_common():
        print(f"  {count:5d}  ({count / steps:5.2f}/step)  {site}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--trainers", default=",".join(TRAINERS))
    parser.add_argument("--steps", type=int, default=24, help="training steps of the GAN and VisCoIN")
    parser.add_argument("--log-every", type=int, default=8)
    args = parser.parse_args(argv)

    import os

    import torch

    from core.device import resolve_device

    os.environ.setdefault("BIOVIS_DATA", str(Path(tempfile.gettempdir()) / "biovis-bench-data"))
    device = resolve_device(args.device)
    common = dict(dataset="world", world="small", device=str(device), num_workers=0, log_every=args.log_every)
    print(f"torch {torch.__version__}, {device}; tiny presets on the small world at 32 px")
    with tempfile.TemporaryDirectory(prefix="bench_syncs_") as tmp:
        tmp = Path(tmp)
        from training import classifier as tc

        cfg = tc.ClassifierConfig.preset("tiny", {**common, "epochs": 1, "batch_size": 2})
        sites = run_counted(tc.train_classifier, cfg, tmp / "clf", device)
        steps = int(__import__("json").loads((tmp / "clf" / "summary.json").read_text())["steps"])
        if "classifier" in args.trainers:
            report("train classifier", sites, steps, args.log_every)
        if "gan" in args.trainers:
            from training.gan import trainer as tg

            kimg = args.steps * 8 / 1000
            extras = dict(pl_weight=2.0, style_mixing=0.9, aug="ada")  # the `cub` recipe's, at tiny size
            cfg = tg.GanConfig.preset("tiny",
                                      {**common, **extras, "kimg": kimg, "snapshot_kimg": kimg})  # fmt: skip
            report(
                "train gan", run_counted(tg.train_gan, cfg, tmp / "gan", device), args.steps, args.log_every
            )
        if "viscoin" in args.trainers:
            from models.stylegan2.checkpoint import save_generator
            from models.stylegan2.networks import Generator
            from training import viscoin as tv

            torch.manual_seed(0)
            G = Generator(z_dim=64, c_dim=0, w_dim=64, img_resolution=32, img_channels=3,
                          mapping_kwargs=dict(num_layers=2),
                          synthesis_kwargs=dict(channel_base=1024, channel_max=64))  # fmt: skip
            save_generator(tmp / "gan.safetensors", G, {"dataset": "world", "source": "random (bench)"})
            cfg = tv.VisCoINConfig.preset("tiny", {
                **common, "classifier": str(tmp / "clf"), "generator": str(tmp / "gan.safetensors"),
                "iterations": args.steps, "eval_every": args.steps, "checkpoint_every": args.steps,
                "eval_images": 8, "warmup": 0,
            })  # fmt: skip
            sites = run_counted(tv.train_viscoin, cfg, tmp / "viscoin", device)
            report("train viscoin", sites, args.steps, args.log_every)


if __name__ == "__main__":
    main()
