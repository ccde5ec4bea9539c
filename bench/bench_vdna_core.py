"""Benchmark of core.vdna on synthetic ResNet-50-like features: accumulation speed and distance times.

Features mimic the 16 Bottleneck outputs vdna hooks on ResNet-50 (256/512/1024/2048 channels at
56/28/14/7 px, post-ReLU), or only the 4 stage outputs with --stages-only. Histograms are timed with the C
binning kernel (CPU, when it builds) and with the torch ops (CUDA's path); the speed-up and the count check
use the default path. The peer is vdna's own histogram path (float64 normalisation, then one `torch.histc` per
channel), run on the same batch.

    python bench/bench_vdna_core.py [--batch 16] [--small] [--stages-only] [--device cpu]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.vdna import (  # noqa: E402
    VDNA,
    GaussianAccumulator,
    HistogramAccumulator,
    LayerGaussianAccumulator,
    emd,
    fd,
    native,
    nfd,
)

STAGES = ((256, 56, 3), (512, 28, 4), (1024, 14, 6), (2048, 7, 3))  # channels, size, blocks
RELU_MAX = 4.0  # synthetic activation range: ReLU of N(0, 1) scaled, clipped rarely


def layer_shapes(small: bool, stages_only: bool) -> dict[str, tuple[int, int]]:
    shapes = {}
    for stage, (c, s, blocks) in enumerate(STAGES, start=1):
        c, s = (c // 8, max(1, s // 4)) if small else (c, s)
        for block in range(1 if stages_only else blocks):
            shapes[f"layer{stage}_{block}"] = (c, s)
    return shapes


def make_batch(
    shapes: dict[str, tuple[int, int]], batch: int, seed: int, device: str
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(batch, c, s, s, generator=g).mul_(1.2).relu_().to(device)
        for name, (c, s) in shapes.items()
    }


def timed(fn: Callable[[], object], repeats: int, device: str) -> float:
    """Median wall time of `fn` in seconds."""
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def vdna_peer_histogram(
    features: dict[str, torch.Tensor], ranges: dict, bins: int
) -> dict[str, torch.Tensor]:
    """vdna 0.1.1's histogram path for large tensors: float64 normalise, clamp, one histc per channel."""
    out = {}
    for name, x in features.items():
        lo, hi = (v.double().to(x.device) * 1.2 for v in ranges[name])
        mean, std = ((lo + hi) / 2).view(1, -1, 1, 1), ((hi - lo) / 2 + 1e-8).view(1, -1, 1, 1)
        y = torch.clamp((x - mean) / std, -1.0, 1.0)
        h = torch.zeros(x.shape[1], bins, dtype=torch.long, device=x.device)
        for c in range(x.shape[1]):
            h[c] = torch.histc(y[:, c].flatten(), bins=bins, min=-1.0, max=1.0)
        out[name] = h
    return out


def ridged(v: VDNA, ridge: float) -> VDNA:
    """A layer-gaussian VDNA with `ridge` added to every covariance diagonal (full rank)."""
    data = {
        layer: {"mu": d["mu"], "sigma": d["sigma"] + ridge * torch.eye(len(d["mu"]), dtype=torch.float64)}
        for layer, d in v.data.items()
    }
    return dataclasses.replace(v, data=data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16, help="images per feature batch")
    p.add_argument("--bins", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions (median reported)")
    p.add_argument("--small", action="store_true", help="1/8 of the channels at 1/4 of the size")
    p.add_argument("--stages-only", action="store_true", help="4 stage outputs instead of 16 blocks")
    p.add_argument("--no-peer", action="store_true", help="skip vdna's per-channel histc path")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    shapes = layer_shapes(args.small, args.stages_only)
    neurons = {name: c for name, (c, _) in shapes.items()}
    ranges = {name: (torch.zeros(c), torch.full((c,), RELU_MAX)) for name, c in neurons.items()}
    batch_a = make_batch(shapes, args.batch, seed=0, device=args.device)
    batch_b = {name: x * 1.1 + 0.05 for name, x in batch_a.items()}
    positions = sum(args.batch * c * s * s for c, s in shapes.values())
    print(
        f"device={args.device} threads={torch.get_num_threads()} layers={len(shapes)} neurons={sum(neurons.values())} "
        f"batch={args.batch} bins={args.bins} activations/batch={positions / 1e6:.1f}M"
    )

    def rate(label: str, seconds: float) -> None:
        print(f"  {label:<34} {seconds * 1e3:9.1f} ms/batch  {args.batch / seconds:8.1f} images/s")

    print("accumulation (per batch of features):")
    with_kernel = args.device == "cpu" and native.binning_kernel() is not None
    path_times = []  # the default path first
    for label, c_kernel in [("C kernel", True)] * with_kernel + [("torch ops", False)]:
        hist = HistogramAccumulator(neurons, args.bins, ranges, c_kernel=c_kernel)
        hist.update(batch_a)  # warm-up
        path_times.append(timed(lambda hist=hist: hist.update(batch_a), args.repeats, args.device))
        rate(f"histogram-{args.bins} ({label})", path_times[-1])
    t_hist = path_times[0]
    if not args.no_peer:
        t_peer = timed(
            lambda: vdna_peer_histogram(batch_a, ranges, args.bins), max(1, args.repeats // 2), args.device
        )
        rate("vdna peer (per-channel histc)", t_peer)
        print(f"  {'speed-up vs peer':<34} {t_peer / t_hist:9.1f} x")
        peer = vdna_peer_histogram(batch_a, ranges, args.bins)
        fresh = HistogramAccumulator(neurons, args.bins, ranges)
        fresh.update(batch_a)
        mine = fresh.result().data
        diff = max(int((mine[n] - peer[n].cpu()).abs().max()) for n in neurons)
        print(f"  {'max |count difference| vs peer':<34} {diff:9d}")
    for label, cls in (("gaussian", GaussianAccumulator), ("layer-gaussian", LayerGaussianAccumulator)):
        acc = cls(neurons)
        acc.update(batch_a)
        rate(label, timed(lambda acc=acc: acc.update(batch_a), args.repeats, args.device))

    print("compare (two VDNAs):")
    vdnas = {}
    for label, make in (
        ("histogram", lambda: HistogramAccumulator(neurons, args.bins, ranges)),
        ("gaussian", lambda: GaussianAccumulator(neurons)),
        ("layer-gaussian", lambda: LayerGaussianAccumulator(neurons)),
    ):
        pair = []
        for features in (batch_a, batch_b):
            acc = make()
            acc.update(features)
            pair.append(acc.result(feature_extractor_name="synthetic-resnet50"))
        vdnas[label] = pair
    h1, h2 = vdnas["histogram"]
    g1, g2 = vdnas["gaussian"]
    l1, l2 = vdnas["layer-gaussian"]
    # A batch gives rank-deficient covariances (eigh fallback); real VDNAs of thousands of images are full
    # rank (Cholesky path), imitated by adding a ridge.
    f1, f2 = (ridged(v, 0.1) for v in (l1, l2))
    last = list(neurons)[-1]
    cases = (
        ("emd (all neurons, scalar)", lambda: emd(h1, h2)),
        ("emd neuron-wise", lambda: emd(h1, h2, neuron_wise=True)),
        ("nfd (all neurons, scalar)", lambda: nfd(g1, g2)),
        (f"fd {last} (C={neurons[last]}), full rank", lambda: fd(f1, f2, layer=last)),
        (f"fd {last}, rank {args.batch - 1} (fallback)", lambda: fd(l1, l2, layer=last)),
        (f"fd mean of {len(neurons)} layers, full rank", lambda: fd(f1, f2)),
    )
    for label, fn in cases:
        seconds = timed(fn, max(1, args.repeats // 2), "cpu")
        value = fn()
        shown = f"{value:.4f}" if isinstance(value, float) else f"{len(value)} layers"
        print(f"  {label:<34} {seconds * 1e3:9.1f} ms   value={shown}")


if __name__ == "__main__":
    main()
