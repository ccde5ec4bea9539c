"""VisCoIN training-step throughput: ours, and with --reference the reference VisCoIN's step side by side at
equal size, each in its own process; prints images/s (real + generated), peak GPU memory and the ratio.

    python bench/sidebyside.py fetch viscoin      # GnRlLeclerc/VisCoIN 223811c + NVlabs d72cc7d, into .bench-cache/
    python bench/bench_viscoin.py --device cpu --size 32 --reference .bench-cache/reference/viscoin   # a CPU check
    python bench/bench_viscoin.py --device cuda --reference .bench-cache/reference/viscoin --batch 8   # the issue's row
    python bench/bench_viscoin.py --device cuda --reference ... --batch 32 --impls ref,ours,ours-amp

Both run with random weights on random "real" images already on the device (no data loading), at the issue's
sizes on CUDA (256 px, ResNet-50 f, K=256, Psi latent 512, G z/w 512 with a 2-layer mapping and channel_base
32768 as in the reference's README, LPIPS-VGG on with beta 3) and tiny ones on the CPU; every size is an option.
- ref: the reference's own `train_viscoin` loop for warm-up + timed iterations, its tqdm replaced by a timer
  (one sync per iteration boundary), its test and checkpoint hooks stubbed; HF ResNet-50 built offline from
  microsoft/resnet-50's config; the `lpips` package with a random VGG (or, without the package, the same
  computation written out here); NVlabs ops compiled if they build, else NVlabs' own fallback (reported).
- ours / ours-amp: the project's VisCoIN step, `training.viscoin.viscoin_step` (the function `train viscoin`
  calls), on the models as the trainer prepares them (`step_models`: channels_last on CUDA; fused Adam),
  in float32 / under bf16 autocast. `--compile` and `--amp-lpips` time those opt-in settings.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sidebyside; not the project root (see run_ref)
import sidebyside as sbs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# microsoft/resnet-50's config.json: what the reference's ResNetConfig.from_pretrained fetches online
RESNET50_CONFIG = dict(num_channels=3, embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
                       layer_type="bottleneck", hidden_act="relu", downsample_in_first_stage=False)  # fmt: skip
GPU_SIZES = dict(size=256, batch=8, concepts=256, latent=512, z_dim=512, channel_base=32768, channel_max=512,
                 steps=10, warmup=3)  # fmt: skip
CPU_SIZES = dict(size=32, batch=2, concepts=16, latent=32, z_dim=64, channel_base=1024, channel_max=64,
                 steps=2, warmup=1)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--reference", help="the reference checkout (bench/sidebyside.py fetch viscoin); none: ours only"
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--impls", default=None, help="comma list of ref, ours, ours-amp (default: all that apply)"
    )
    p.add_argument("--amp", action="store_true", help="ours in bf16 autocast only (no float32 row)")
    for name in GPU_SIZES:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                       help=f"default {GPU_SIZES[name]} on CUDA, {CPU_SIZES[name]} on the CPU")  # fmt: skip
    p.add_argument("--map-layers", type=int, default=2, help="G's mapping layers (the reference's README: 2)")
    p.add_argument("--classes", type=int, default=200)
    p.add_argument(
        "--arch", default="resnet50", help="ours' f (ref: HF ResNet-50 always; equal sizes need resnet50)"
    )
    p.add_argument(
        "--lpips", choices=("on", "off"), default="on", help="the beta * LPIPS-VGG term, both sides"
    )
    p.add_argument("--compile", action="store_true", help="ours: torch.compile f and the trio (cfg.compile)")
    p.add_argument("--amp-lpips", action="store_true", help="ours-amp: LPIPS under bf16 too (cfg.amp_lpips)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in the workers (0: torch's)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per worker")
    p.add_argument("--worker", choices=("ref", "ours"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return args


def worker_setup(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = sbs.resolve_device(args.device)
    sbs.fill_sizes(args, GPU_SIZES, CPU_SIZES, dev.type == "cpu")
    args.warmup = max(1, args.warmup)
    return dev


# ----- the reference -----


def lpips_stand_in() -> types.ModuleType:
    """Module `lpips` with `LPIPS(net="vgg")` computing what lpips 0.1 computes (scaling layer, VGG-16 taps
    relu1_2..relu5_3, unit-normalised squared differences, dropout + 1x1 heads, spatial mean, sum), random
    weights: for machines without the package. Like the package: trunk frozen, heads trainable but unused."""
    import torch
    import torchvision
    from torch import nn

    class LPIPS(nn.Module):
        def __init__(self, net="vgg", **kwargs):
            super().__init__()
            self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
            self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])
            features = torchvision.models.vgg16(weights=None).features
            self.slices = nn.ModuleList(
                features[a:b] for a, b in ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
            )
            self.slices.requires_grad_(False)
            self.lins = nn.ModuleList(nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))
                                      for c in (64, 128, 256, 512, 512))  # fmt: skip
            self.eval()

        def forward(self, in0, in1, retPerLayer=False, normalize=False):  # noqa: N803 (the package's name)
            x0, x1, value = (in0 - self.shift) / self.scale, (in1 - self.shift) / self.scale, 0
            for layer, lin in zip(self.slices, self.lins, strict=True):
                x0, x1 = layer(x0), layer(x1)
                n0 = x0 / (x0.square().sum(1, keepdim=True).sqrt() + 1e-10)
                n1 = x1 / (x1.square().sum(1, keepdim=True).sqrt() + 1e-10)
                value = value + lin((n0 - n1) ** 2).mean([2, 3], keepdim=True)
            return value

    module = types.ModuleType("lpips")
    module.LPIPS = LPIPS
    module.__stand_in__ = True
    return module


def run_ref(args) -> None:
    """The reference's own training loop, timed per iteration. The project root stays off sys.path: its
    `training` package would shadow NVlabs' (which the reference puts on the path)."""
    stubbed = sbs.stub_reference_imports()
    if args.lpips == "on" and not sbs.has_module("lpips"):
        sys.modules["lpips"] = lpips_stand_in()
        stubbed.append("lpips (stand-in)")
    os.environ.setdefault("MPLBACKEND", "Agg")
    ref = Path(args.reference).resolve()
    if (
        not (ref / "viscoin" / "training" / "viscoin.py").is_file()
        or not (ref / "stylegan2_ada" / "training").is_dir()
    ):
        sys.exit(f"--reference {ref} is not a VisCoIN checkout with its stylegan2_ada submodule: "
                 "run python bench/sidebyside.py fetch viscoin")  # fmt: skip
    sys.path.insert(0, str(ref))
    dev = worker_setup(args)
    import viscoin.models.classifiers as rcls

    class OfflineResNetConfig(rcls.ResNetConfig):
        @classmethod
        def from_pretrained(cls, *a, **k):
            return rcls.ResNetConfig(**RESNET50_CONFIG)

    rcls.ResNetConfig = OfflineResNetConfig

    import viscoin.models.gan as rgan
    import viscoin.training.losses as rloss
    import viscoin.training.viscoin as rv
    from viscoin.models.concept_extractors import ConceptExtractor
    from viscoin.models.explainers import Explainer

    K, B, S = args.concepts, args.batch, args.size
    classifier = rcls.Classifier(output_classes=args.classes, pretrained=False)
    concept_extractor = ConceptExtractor(n_concepts=K, latent_channels=args.latent)
    explainer = Explainer(n_concepts=K, n_classes=args.classes)
    G = rv.Generator(z_dim=args.z_dim, c_dim=0, w_dim=args.z_dim, img_resolution=S, img_channels=3,
                     mapping_kwargs=dict(num_layers=args.map_layers, w_avg_beta=0.995),
                     synthesis_kwargs=dict(channel_base=args.channel_base, channel_max=args.channel_max,
                                           num_fp16_res=0, conv_clamp=None))  # fmt: skip
    G = G.eval().requires_grad_(False)
    gan = rgan.GeneratorAdapted.from_gan(G, z_dim=K, w_dim=args.z_dim)
    if gan.num_ws != G.synthesis.num_ws:  # from_gan sizes its mapping for 256 px (14 ws)
        gan.mapping = rgan.MappingNetworkAdapted(z1_dim=9 * K, z2_dim=9 * K, w_dim=args.z_dim,
                                                 num_ws=G.synthesis.num_ws, **rgan._default_viscoin_mapping_kwargs)  # fmt: skip
        gan.num_ws = G.synthesis.num_ws
    beta = 3.0 if args.lpips == "on" else 0.0
    if args.lpips == "on":  # a random VGG instead of the download: the same network and computation
        import lpips

        stand_in = getattr(lpips, "__stand_in__", False)
        rloss._lpips_network = (
            lpips.LPIPS(net="vgg") if stand_in else lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
        )
    else:
        rloss.lpips_loss = lambda rec, orig: rec.new_zeros(())
    real = (torch.rand(B, 3, S, S) * 2 - 1).to(dev)
    labels = torch.randint(0, args.classes, (B,)).to(dev)
    params = rv.VisCoINTrainingParams(iterations=args.warmup + args.steps, batch_size=B, cd_fid_iteration=-1,
                                      beta=beta)  # fmt: skip  # all loss terms on from the first step
    params.device = str(dev)
    marks: list[float] = []

    def timed_range(iterable, *a, **k):  # the loop's tqdm: a timestamp (after a sync) at each boundary
        for i in iterable:
            sbs.sync(dev)
            marks.append(time.perf_counter())
            yield i
        sbs.sync(dev)
        marks.append(time.perf_counter())

    rv.tqdm = timed_range
    rv.test_viscoin = lambda *a, **k: types.SimpleNamespace()  # its i % 2000 == 0 hook (a warm-up step)
    rv.save_viscoin = lambda *a, **k: None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rv.train_viscoin(classifier, concept_extractor, explainer, gan, G, [(real, labels)], None, params)
    seconds = [b - a for a, b in zip(marks[:-1], marks[1:], strict=True)][args.warmup :]
    sbs.report("ref", dev, seconds, 2 * B, {
        "params": {"f": sbs.count(classifier), "psi": sbs.count(concept_extractor), "theta": sbs.count(explainer),
                   "omega trainable": sbs.count(gan.mapping), "synthesis": sbs.count(gan.synthesis)},
        "nvlabs_ops": sbs.nvlabs_op_paths(("torch_utils.ops.", "stylegan2_ada.torch_utils.ops.")),
        "stubbed": stubbed, "precision": "float32 (no AMP)",
    })  # fmt: skip


# ----- ours -----


def build_ours(args, dev) -> types.SimpleNamespace:
    """The project's VisCoIN parts at the bench's sizes, as `train_viscoin` builds and prepares them."""
    sys.path.insert(0, str(ROOT))
    import models.lpips as plpips
    from core.config import build
    from core.device import autotune
    from models.classifiers import Classifier
    from models.stylegan2 import Generator
    from models.viscoin import ConceptDecoder, ConceptExtractor, Explainer
    from testing.viscoin.evaluate import load_lpips
    from training.viscoin import VisCoINConfig, VisCoINNet, _lr_factor, build_optimisers, step_models

    autotune(dev)  # as train_viscoin: cuDNN's fastest algorithms on CUDA
    K = args.concepts
    cfg = build(VisCoINConfig, dict(
        n_concepts=K, latent_channels=args.latent, batch_size=args.batch, iterations=100_000, amp=args.amp,
        beta=3.0 if args.lpips == "on" else 0.0, warmup=0, compile=args.compile, amp_lpips=args.amp_lpips,
        lpips_weights="random" if args.lpips == "on" else "none",
    ))  # fmt: skip
    classifier = Classifier(args.arch, args.classes).to(dev).eval().requires_grad_(False)
    G = Generator(z_dim=args.z_dim, c_dim=0, w_dim=args.z_dim, img_resolution=args.size, img_channels=3,
                  mapping_kwargs=dict(num_layers=args.map_layers, w_avg_beta=0.995),
                  synthesis_kwargs=dict(channel_base=args.channel_base, channel_max=args.channel_max))  # fmt: skip
    G = G.to(dev).eval().requires_grad_(False)
    extractor = ConceptExtractor(classifier.feature_channels, K, args.latent, cfg.grid)
    explainer = Explainer(K, args.classes)
    decoder = ConceptDecoder.from_generator(G, K, cfg.grid, lr_multiplier=cfg.decoder_lr_multiplier,
                                            learn_w_avg=cfg.learn_w_avg)  # fmt: skip
    net = VisCoINNet(extractor, explainer, decoder).to(dev).train()
    optimisers = build_optimisers(net, cfg)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, _lr_factor(cfg)) for o in optimisers]
    if cfg.lpips_weights != "none" and not sbs.has_module("lpips"):  # the heads file comes with the package
        heads = Path(tempfile.mkdtemp(prefix="bench_viscoin_")) / "vgg.pth"
        torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) * 0.1 for i, c in enumerate(plpips.CHANNELS)},
                   heads)  # fmt: skip
        plpips._heads_file = lambda: heads
    models = step_models(classifier, G, net, load_lpips(cfg.lpips_weights, dev), cfg)
    return types.SimpleNamespace(cfg=cfg, models=models, optimisers=optimisers, schedules=schedules)


def run_ours(args) -> None:
    """`viscoin_step` and the schedules' step, as `train viscoin` runs them per step (the batch already on
    the device, in the trainer's memory format), timed per step between syncs."""
    dev = worker_setup(args)
    m = build_ours(args, dev)  # puts the project on sys.path
    from core.seeding import derive_seed
    from training.viscoin import viscoin_step

    real = torch.rand(args.batch, 3, args.size, args.size, device=dev) * 2 - 1
    if dev.type == "cuda":
        real = real.contiguous(memory_format=torch.channels_last)
        torch.cuda.reset_peak_memory_stats(dev)
    seconds = []
    for step in range(args.warmup + args.steps):
        sbs.sync(dev)
        start = time.perf_counter()
        torch.manual_seed(derive_seed(m.cfg.seed, "step", step, 0))
        viscoin_step(m.models, real, m.optimisers, m.cfg, step)
        for schedule in m.schedules:
            schedule.step()
        sbs.sync(dev)
        seconds.append(time.perf_counter() - start)
    net = m.models.net
    decoder = net.decoder
    sbs.report("ours-amp" if args.amp else "ours", dev, seconds[args.warmup :], 2 * args.batch, {
        "params": {"f": sbs.count(m.models.classifier), "psi": sbs.count(net.extractor),
                   "theta": sbs.count(net.explainer), "omega trainable": sbs.count(decoder, trainable_only=True),
                   "synthesis": sbs.count(decoder.synthesis)},
        "precision": ("bf16 autocast" + (", LPIPS too" if args.amp_lpips else ", LPIPS float32")
                      if args.amp and dev.type == "cuda" else "float32"),
        "channels_last": dev.type == "cuda", "compiled": args.compile,
    })  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        (run_ref if args.worker == "ref" else run_ours)(args)
        return 0
    flags = {
        "ref": ["--worker", "ref"],
        "ours": ["--worker", "ours"],
        "ours-amp": ["--worker", "ours", "--amp"],
    }
    default = (["ref"] if args.reference else []) + (["ours-amp"] if args.amp else ["ours", "ours-amp"])
    device, impls = sbs.plan(args, GPU_SIZES, CPU_SIZES, flags, default, "viscoin")
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--amp"]
    print(f"torch {torch.__version__}, {device}; VisCoIN step at {args.size} px, batch {args.batch} real + "
          f"{args.batch} generated, K={args.concepts}, Psi latent {args.latent}, ResNet-50 f, G z/w {args.z_dim} "
          f"channel_base {args.channel_base} channel_max {args.channel_max}, LPIPS {args.lpips}; median of "
          f"{args.steps} steps after {args.warmup}", flush=True)  # fmt: skip
    results = sbs.run_workers(Path(__file__).resolve(), argv, impls, args.timeout)
    return sbs.summarise(
        results, "ref", ("params", "precision", "channels_last", "compiled", "nvlabs_ops", "stubbed")
    )


if __name__ == "__main__":
    sys.exit(main())
