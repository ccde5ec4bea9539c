"""Benchmark StyleGAN2 training throughput: images/s of full training steps at 64 px (`world` preset).

Times `training.gan.trainer.train_step` (G main, G path-length reg, D main, D R1 reg, EMA) on random "real" images
so that data loading is left out, and prints images/s for the plain step and for one with both lazy
regularisers due, plus the amortised rate over an r1_interval cycle. bf16 autocast is used on CUDA unless
`--no-amp`.

    python bench/bench_gan_training.py                       # cuda when available, else cpu
    python bench/bench_gan_training.py --device cpu --batch 32 --steps 2   # the preset's batch on CPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def _timed(fn, device: torch.device, steps: int, warmup: int = 0) -> float:
    """Mean seconds per call of `fn` over `steps` calls after `warmup` untimed ones (synchronising on CUDA)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument(
        "--preset", default="world", help="preset of training/presets/gan.yaml (default: world)"
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="images per step (default: preset's; 8 on CPU)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per measurement (default: 3; 1 on CPU)"
    )
    parser.add_argument("--no-amp", action="store_true", help="float32 on CUDA too")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from core.device import resolve_device
    from training.gan.trainer import GanConfig, new_state, train_step

    device = resolve_device(args.device)
    cpu = device.type == "cpu"
    overrides = {"batch_size": args.batch or (8 if cpu else None), "device": str(device)}
    steps = args.steps or (1 if cpu else 3)
    cfg = GanConfig.preset(args.preset, overrides)
    cfg.validate()
    amp = device.type == "cuda" and not args.no_amp
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    state = new_state(cfg, device)
    real = torch.rand(cfg.batch_size, 3, cfg.data.image_size, cfg.data.image_size, device=device) * 2 - 1
    n_params = sum(p.numel() for p in state.G.parameters()), sum(p.numel() for p in state.D.parameters())
    print(
        f"device {device} ({torch.get_num_threads()} CPU threads), preset {args.preset}: {cfg.data.image_size} px, "
        f"batch {cfg.batch_size}, G {n_params[0] / 1e6:.2f}M / D {n_params[1] / 1e6:.2f}M parameters, "
        f"amp {'bf16' if amp else 'off'}"
    )

    def at_step(step: int):
        def run() -> None:  # lazy regularisers run when step % interval == 0
            state.step = step
            train_step(state, real, cfg, 1, amp)

        return run

    pl_on = cfg.pl_weight > 0
    at_step(1)()
    at_step(0)()  # warm-up (allocations, cudnn autotuning)
    t_plain = _timed(at_step(1), device, steps)
    t_both = _timed(at_step(0), device, steps)
    t_pl = _timed(at_step(cfg.pl_interval), device, steps) if pl_on else t_plain
    # One R1 cycle: step 0 runs R1 (+ path length), path length alone every pl_interval steps, plain otherwise.
    cycle = cfg.r1_interval
    n_pl = cycle // cfg.pl_interval if pl_on else 0
    amortised = (t_both + max(n_pl - 1, 0) * t_pl + (cycle - max(n_pl, 1)) * t_plain) / cycle
    rows = [("plain step (G main, D main, EMA)", t_plain)]
    if pl_on:
        rows.append(("+ path length", t_pl))
    rows += [
        ("+ path length + R1" if pl_on else "+ R1", t_both),
        (f"amortised over {cycle} steps", amortised),
    ]
    for label, seconds in rows:
        print(f"  {label:<34} {seconds * 1000:9.1f} ms   {cfg.batch_size / seconds:9.1f} images/s")


if __name__ == "__main__":
    main()
