"""Benchmark the pure-PyTorch StyleGAN2 generator: images/s at 64 and 256 px, and its op-level choices.

Prints, per resolution, generator forward throughput (inference, const noise) with the default modulated
convolution for the device (`--modconv both` times the fused/grouped form against the unfused one), and, at
the op level, the fast up-sampling convolution (strided transposed conv + FIR) against the plain one
(zero-stuffing + FIR + conv) for the top block's conv0.
Networks use the NVlabs `--cfg auto` shape: channel_base 16384, channel_max 512, 2 mapping layers.

    python bench/bench_stylegan2.py                 # cuda when available, else cpu
    python bench/bench_stylegan2.py --device cpu --iters 2 --modconv both
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--channel-base", type=int, default=16384)
    parser.add_argument("--channel-max", type=int, default=512)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--modconv",
        choices=["auto", "fused", "unfused", "both"],
        default="auto",
        help="modulated-conv form to time; auto = the Generator's default for the device (default: auto)",
    )
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.bench_gan_training import _timed
    from models.stylegan2 import Generator
    from models.stylegan2.ops import conv2d_resample, setup_filter

    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    threads = torch.get_num_threads()
    print(f"device={device} torch={torch.__version__} cpu_threads={threads} batch={args.batch}")

    for res in args.resolutions:
        torch.manual_seed(0)
        G = Generator(
            z_dim=512,
            c_dim=0,
            w_dim=512,
            img_resolution=res,
            img_channels=3,
            mapping_kwargs=dict(num_layers=2),
            synthesis_kwargs=dict(
                channel_base=args.channel_base, channel_max=args.channel_max, num_fp16_res=4, conv_clamp=256
            ),
        )
        G = G.eval().requires_grad_(False).to(device)
        z = torch.randn(args.batch, 512, device=device)
        params = sum(p.numel() for p in G.parameters()) / 1e6
        variants = {"auto": None, "fused": True, "unfused": False}
        names = ["fused", "unfused"] if args.modconv == "both" else [args.modconv]
        times = {}
        with torch.inference_mode():
            for name in names:
                call = partial(G, z, noise_mode="const", fused_modconv=variants[name])
                times[name] = _timed(call, device, args.iters, warmup=args.warmup)
        figures = " | ".join(
            f"{name} {args.batch / t:7.2f} img/s ({t * 1e3:8.1f} ms/batch)" for name, t in times.items()
        )
        ratio = f" | unfused/fused time {times['unfused'] / times['fused']:.2f}" if len(times) == 2 else ""
        print(f"G {res:>4}px ({params:.1f} M params, num_ws={G.num_ws}): {figures}{ratio}")

        # The top block's up-sampling conv0, alone: fast (transposed conv + FIR) vs plain (stuff + FIR + conv).
        c_in = min(args.channel_base // (res // 2), args.channel_max)
        c_out = min(args.channel_base // res, args.channel_max)
        x = torch.randn(args.batch, c_in, res // 2, res // 2, device=device)
        w = torch.randn(c_out, c_in, 3, 3, device=device)
        f = setup_filter().to(device)
        with torch.inference_mode():
            op_times = {
                fast: _timed(
                    partial(conv2d_resample, x, w, f=f, up=2, padding=1, flip_weight=False, fast=fast),
                    device,
                    args.iters,
                    warmup=args.warmup,
                )
                for fast in (True, False)
            }
        print(
            f"  up-conv {c_in}->{c_out} @ {res}px: fast {op_times[True] * 1e3:7.1f} ms | "
            f"plain {op_times[False] * 1e3:7.1f} ms | fast/plain speed {op_times[False] / op_times[True]:.2f}x"
        )


if __name__ == "__main__":
    main()
