"""StyleGAN2 training iterations, ours side by side with NVlabs stylegan2-ada-pytorch's, each in its own process:
images/s, ms per iteration, peak GPU memory and the ratio, regularisers amortised over whole cycles.

    python bench/sidebyside.py fetch nvlabs              # NVlabs d72cc7d into .bench-cache/reference/nvlabs
    python bench/bench_gan_step.py --device cpu --size 32 --reference .bench-cache/reference/nvlabs   # a CPU check
    python bench/bench_gan_step.py --device cuda --reference .bench-cache/reference/nvlabs            # the issue's row

Sizes: paper256 on CUDA (256 px, batch 32, z/w 512, mapping 8, channel_base 16384, channel_max 512, mbstd 8,
conv_clamp 256), tiny on the CPU; every size is an option. One cycle is --iters iterations (16: one D R1 cycle,
four G path-length cycles); images/s = batch x iters / cycle seconds, median over --cycles after a warm-up
cycle; a sync at cycle boundaries only. Real images are random and already in (pinned) host memory.
- ref: the body of NVlabs' `training_loop.py` `while True:` loop, call for call (the data-fetch lines, each due
  phase Gmain/Greg/Dmain/Dreg with `StyleGAN2Loss.accumulate_gradients`, nan_to_num of the gradients, the Adam
  step, the G_ema update), networks with `num_fp16_res` --fp16-res (train.py: 4) and conv_clamp 256, cudnn
  benchmark on, TF32 off, as its training loop sets them; NVlabs' compiled ops if they build, else its fallback
  (reported). ref-aug adds AugmentPipe 'bgc' at fixed p (on torch >= 1.10 its R1 pass fails: NVlabs'
  grid_sample gradfix predates it).
- ours / ours-amp: the body of `training/gan/trainer.py`'s loop around its importable `train_step` (per-step seed, the
  uint8 batch to the device as reals by `real_batch`: [-1, 1], mirror, channels_last on CUDA; train_step),
  `cub` preset with these sizes, float32 / bf16 autocast (every phase, the regularisers included).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import types
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sidebyside; not the project root (see run_ref)
import sidebyside as sbs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GPU_SIZES = dict(size=256, batch=32, z_dim=512, map_layers=8, channel_base=16384, channel_max=512, mbstd=8,
                 fp16_res=4, iters=16, cycles=3)  # fmt: skip
CPU_SIZES = dict(size=32, batch=4, z_dim=64, map_layers=2, channel_base=1024, channel_max=64, mbstd=4,
                 fp16_res=0, iters=2, cycles=1)  # fmt: skip
BGC = dict(xflip=1, rotate90=1, xint=1, scale=1, rotate=1, aniso=1, xfrac=1, brightness=1, contrast=1, lumaflip=1,
           hue=1, saturation=1)  # fmt: skip  # NVlabs train.py augpipe_specs['bgc']


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", help="NVlabs checkout (bench/sidebyside.py fetch nvlabs); none: ours only")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--impls",
        default=None,
        help="comma list of ref, ref-aug, ours, ours-amp (default: ref, ours, ours-amp)",
    )
    for name in GPU_SIZES:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                       help=f"default {GPU_SIZES[name]} on CUDA, {CPU_SIZES[name]} on the CPU")  # fmt: skip
    p.add_argument(
        "--ours-aug", default="none", help="ours: GanConfig.aug (none as ref; ada as the cub preset)"
    )
    p.add_argument("--aug-p", type=float, default=0.2, help="ref-aug: fixed AugmentPipe p")
    p.add_argument(
        "--no-plugins", action="store_true", help="ref: NVlabs' fallback ops without trying to build"
    )
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in the workers (0: torch's)")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per worker")
    p.add_argument("--worker", choices=("ref", "ours"), help=argparse.SUPPRESS)
    p.add_argument("--aug", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--amp", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def cycles(args, dev, iteration) -> list[float]:
    """Seconds of each timed cycle of `args.iters` iterations, after one warm-up cycle."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    seconds = []
    for _ in range(1 + args.cycles):
        sbs.sync(dev)
        start = time.perf_counter()
        for _ in range(args.iters):
            iteration()
        sbs.sync(dev)
        seconds.append(time.perf_counter() - start)
    return seconds[1:]


def worker_setup(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = sbs.resolve_device(args.device)
    sbs.fill_sizes(args, GPU_SIZES, CPU_SIZES, dev.type == "cpu")
    return dev


def run_ref(args) -> None:
    """NVlabs training_loop.py's iteration (the project root stays off sys.path: its `training` package would
    shadow NVlabs')."""
    import numpy as np

    stubbed = sbs.stub_reference_imports()
    ref = Path(args.reference).resolve()
    if not (ref / "training" / "loss.py").is_file():
        sys.exit(f"--reference {ref} is not an NVlabs checkout: run python bench/sidebyside.py fetch nvlabs")
    sys.path.insert(0, str(ref))
    dev = worker_setup(args)
    np.random.seed(0)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    from torch_utils import misc
    from torch_utils.ops import conv2d_gradfix, grid_sample_gradfix

    from training.gan.augment import AugmentPipe
    from training.loss import StyleGAN2Loss
    from training.networks import Discriminator, Generator

    conv2d_gradfix.enabled = grid_sample_gradfix.enabled = True
    warnings.filterwarnings("once", message=".*gradfix not supported.*")
    if args.no_plugins:
        from torch_utils.ops import bias_act, upfirdn2d

        for module in (bias_act, upfirdn2d):
            module._inited, module._plugin = True, None
    B, S = args.batch, args.size
    common = dict(c_dim=0, img_resolution=S, img_channels=3)
    G = Generator(z_dim=args.z_dim, w_dim=args.z_dim, mapping_kwargs=dict(num_layers=args.map_layers),
                  synthesis_kwargs=dict(channel_base=args.channel_base, channel_max=args.channel_max,
                                        num_fp16_res=args.fp16_res, conv_clamp=256), **common)  # fmt: skip
    D = Discriminator(channel_base=args.channel_base, channel_max=args.channel_max, num_fp16_res=args.fp16_res,
                      conv_clamp=256, block_kwargs={}, mapping_kwargs={},
                      epilogue_kwargs=dict(mbstd_group_size=args.mbstd), **common)  # fmt: skip
    G, D = G.train().requires_grad_(False).to(dev), D.train().requires_grad_(False).to(dev)
    G_ema = copy.deepcopy(G).eval()
    augment = None
    if args.aug:
        augment = AugmentPipe(**BGC).train().requires_grad_(False).to(dev)
        augment.p.copy_(torch.as_tensor(args.aug_p))
    loss = StyleGAN2Loss(device=dev, G_mapping=G.mapping, G_synthesis=G.synthesis, D=D, augment_pipe=augment,
                         r1_gamma=1.0)  # fmt: skip  # pl_weight 2, style mixing 0.9, pl batch shrink 2: its defaults
    phases = []
    for name, module, interval in (("G", G, 4), ("D", D, 16)):
        ratio = interval / (interval + 1)
        opt = torch.optim.Adam(
            module.parameters(), lr=0.0025 * ratio, betas=[b**ratio for b in (0, 0.99)], eps=1e-8
        )
        phases += [types.SimpleNamespace(name=name + "main", module=module, opt=opt, interval=1),
                   types.SimpleNamespace(name=name + "reg", module=module, opt=opt, interval=interval)]  # fmt: skip
    reals = torch.randint(0, 256, (B, 3, S, S), dtype=torch.uint8)  # what its DataLoader yields
    labels = torch.zeros(B, 0)
    if dev.type == "cuda":
        reals, labels = reals.pin_memory(), labels.pin_memory()
    state = dict(nimg=0, batch_idx=0)

    def iteration() -> None:  # training_loop.py's `while True:` body up to the ADA heuristic (1 GPU)
        real_img = (reals.to(dev).to(torch.float32) / 127.5 - 1).split(B)
        real_c = labels.to(dev).split(B)
        all_z = torch.randn([len(phases) * B, G.z_dim], device=dev)
        all_z = [z.split(B) for z in all_z.split(B)]
        all_c = torch.from_numpy(np.stack([np.zeros([0], dtype=np.float32) for _ in range(len(phases) * B)]))
        all_c = (all_c.pin_memory() if dev.type == "cuda" else all_c).to(dev)
        all_c = [c.split(B) for c in all_c.split(B)]
        for phase, gen_z, gen_c in zip(phases, all_z, all_c, strict=True):
            if state["batch_idx"] % phase.interval != 0:
                continue
            phase.opt.zero_grad(set_to_none=True)
            phase.module.requires_grad_(True)
            for r_img, r_c, z, c in zip(real_img, real_c, gen_z, gen_c, strict=True):
                loss.accumulate_gradients(phase=phase.name, real_img=r_img, real_c=r_c, gen_z=z, gen_c=c, sync=True,
                                          gain=phase.interval)  # fmt: skip
            phase.module.requires_grad_(False)
            for param in phase.module.parameters():
                if param.grad is not None:
                    misc.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
            phase.opt.step()
        beta = 0.5 ** (B / (20 * 1000))  # ema_kimg 20, no ramp-up (paper256)
        for p_ema, p in zip(G_ema.parameters(), G.parameters(), strict=True):
            p_ema.copy_(p.lerp(p_ema, beta))
        for b_ema, b in zip(G_ema.buffers(), G.buffers(), strict=True):
            b_ema.copy_(b)
        state["nimg"] += B
        state["batch_idx"] += 1

    seconds = cycles(args, dev, iteration)
    sbs.report("ref-aug" if args.aug else "ref", dev, seconds, B * args.iters, {
        "params": {"G": sbs.count(G), "D": sbs.count(D)},
        "precision": f"fp16 in the {args.fp16_res} highest-resolution blocks, float32 elsewhere; TF32 off",
        "augment": f"AugmentPipe bgc, p {args.aug_p}" if args.aug else "none",
        "nvlabs_ops": sbs.nvlabs_op_paths(), "stubbed": stubbed,
    })  # fmt: skip


def run_ours(args) -> None:
    sys.path.insert(0, str(ROOT))
    dev = worker_setup(args)
    from core.device import autotune
    from core.seeding import derive_seed
    from training.gan.trainer import GanConfig, new_state, real_batch, train_step

    overrides = dict(image_size=args.size, batch_size=args.batch, z_dim=args.z_dim, w_dim=args.z_dim,
                     mapping_layers=args.map_layers, channel_base=args.channel_base, channel_max=args.channel_max,
                     mbstd_group=args.mbstd, amp=args.amp, device=str(dev), aug=args.ours_aug)  # fmt: skip
    cfg = GanConfig.preset("cub", overrides)
    cfg.validate()
    autotune(dev)  # as train_gan: cuDNN's fastest algorithms on CUDA
    s = new_state(cfg, dev)
    group = min(cfg.mbstd_group, cfg.batch_size)
    shape = (cfg.batch_size, 3, cfg.data.image_size, cfg.data.image_size)
    reals = torch.randint(0, 256, shape, dtype=torch.uint8)  # the loader's batch (Uint8Images squares)
    if dev.type == "cuda":
        reals = reals.pin_memory()
    window = []

    def iteration() -> None:  # train_gan's loop body around train_step, minus its log and snapshot blocks
        torch.manual_seed(derive_seed(cfg.seed, "step", s.step, 0))
        out = train_step(s, real_batch({"image": reals}, dev, cfg, group), cfg, 1, cfg.hardware.amp)
        window.append(out.pop("window"))

    seconds = cycles(args, dev, iteration)
    sbs.report("ours-amp" if args.amp else "ours", dev, seconds, cfg.batch_size * args.iters, {
        "params": {"G": sbs.count(s.G), "D": sbs.count(s.D)},
        "precision": "bf16 autocast, regularisers too" if cfg.hardware.amp and dev.type == "cuda" else "float32",
        "augment": cfg.aug,
    })  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        (run_ref if args.worker == "ref" else run_ours)(args)
        return 0
    flags = {"ref": ["--worker", "ref"], "ref-aug": ["--worker", "ref", "--aug"], "ours": ["--worker", "ours"],
             "ours-amp": ["--worker", "ours", "--amp"]}  # fmt: skip
    default = (["ref"] if args.reference else []) + ["ours", "ours-amp"]
    device, impls = sbs.plan(args, GPU_SIZES, CPU_SIZES, flags, default, "nvlabs")
    argv = list(sys.argv[1:] if argv is None else argv)
    print(f"torch {torch.__version__}, {device}; StyleGAN2 iterations at {args.size} px, batch {args.batch}, z/w "
          f"{args.z_dim}, mapping {args.map_layers}, channel_base {args.channel_base}, channel_max {args.channel_max}, "
          f"mbstd {args.mbstd}; G reg every 4, D reg every 16; {args.iters} iterations a cycle, median of "
          f"{args.cycles} cycles", flush=True)  # fmt: skip
    results = sbs.run_workers(Path(__file__).resolve(), argv, impls, args.timeout)
    return sbs.summarise(results, "ref", ("params", "precision", "augment", "nvlabs_ops", "stubbed"))


if __name__ == "__main__":
    sys.exit(main())
