"""Retrieval speed: exact top-k search (queries/s) with our chunked torch search side by side with faiss'
`IndexFlatIP` on the same float32 keys (checking identical top-5), our search without its bfloat16 candidate
pass where the CPU has one, our search on float16 keys (half the memory; agreement reported), and index
building (records/s embedded per modality from a BIOSCAN HDF5 split).

    python bench/bench_retrieval.py                        # 100k and 1M keys of dim 512, CPU
    python bench/bench_retrieval.py --device cuda          # torch search on the GPU (faiss stays on CPU)
    python bench/bench_retrieval.py --keys 100000 --index-archs tiny:32,vit_b_16:224
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.device import resolve_device  # noqa: E402
from core.search import faiss_available, native_bf16, search  # noqa: E402


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    """Random unit vectors, made in blocks (no second full-size temporary)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 1 << 17):
        block = rng.standard_normal((min(1 << 17, n - start), dim), dtype=np.float32)
        out[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def timed(fns: dict, sync: bool, rounds: int) -> dict[str, tuple[float, object]]:
    """name -> (fastest of `rounds` runs after a warm-up, result). The functions take turns in every round, so
    that a slow spell of a shared machine hits them alike; the minimum is the stable figure there."""
    results = {name: fn() for name, fn in fns.items()}
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            if sync:
                torch.cuda.synchronize()
            start = time.perf_counter()
            results[name] = fn()
            if sync:
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: (best[name], results[name]) for name in fns}


def bench_search(n_keys: int, dim: int, n_queries: int, k: int, device, rounds: int) -> None:
    keys = unit_rows(n_keys, dim, 0)
    queries = unit_rows(n_queries, dim, 1)
    half = keys.astype(np.float16)
    fns = {
        "ours": lambda: search(queries, keys, k, device=str(device))[1],
        "half": lambda: search(queries, half, k, device=str(device))[1],
    }
    if device.type == "cpu" and native_bf16():  # the default uses the bfloat16 candidate pass: also without
        fns["plain"] = lambda: search(queries, keys, k, bf16_pass=False)[1]
    if faiss_available():
        import faiss

        index = faiss.IndexFlatIP(dim)
        index.add(keys)
        fns["faiss"] = lambda: index.search(queries, k)[1]
    runs = timed(fns, device.type == "cuda", rounds)
    (seconds, ours), (h_seconds, top_half) = runs["ours"], runs["half"]
    line = f"{n_keys:>9,} keys x {dim}, {n_queries} queries, top-{k}: ours, fp32 keys {n_queries / seconds:9.1f} q/s"
    if "faiss" in runs:
        f_seconds, theirs = runs["faiss"]
        same = (ours == theirs).all(1).mean()
        line += f" | faiss IndexFlatIP {n_queries / f_seconds:9.1f} q/s | ratio {f_seconds / seconds:5.2f}x"
        line += f" | identical top-{k}: {same:.2%} of queries"
    else:
        line += " | faiss not installed"
    if "plain" in runs:
        p_seconds, plain = runs["plain"]
        same = (plain == ours).all(1).mean()
        line += (
            f"\n{'':>9}  without the bfloat16 pass {n_queries / p_seconds:9.1f} q/s, same top-{k}: {same:.2%}"
        )
    agree = (top_half == ours).all(1).mean()
    print(line)
    print(
        f"{'':>9}  ours, fp16 keys {n_queries / h_seconds:9.1f} q/s, same top-{k} as fp32: {agree:.2%} of queries"
    )


def bench_index(arch: str, size: int, device, batch: int) -> None:
    """Records/s of `retrieve index` (decode + tokenise + embed image and DNA) on the world's all_keys."""
    from datasets.bioscan.export import ensure_world_hdf5
    from models.retrieval import RetrievalModel, RetrievalSpec
    from testing.retrieval.embed import embed_split

    data = ensure_world_hdf5("default", quiet=True)
    bert = {} if arch != "tiny" else {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                                      "intermediate_size": 128}  # fmt: skip
    spec = RetrievalSpec(("image", "dna"), 768 if arch != "tiny" else 128, arch, size, dna_bert=bert)
    model = RetrievalModel(spec).to(device).eval()
    for modalities in (("image", "dna"), ("image",), ("dna",)):
        embed_split(model, data, "val_seen", modalities, device, batch, quiet=True)  # warm-up
        start = time.perf_counter()
        out = embed_split(model, data, "all_keys", modalities, device, batch, quiet=True)
        seconds = time.perf_counter() - start
        n = len(next(iter(out.values())))
        print(
            f"index {arch} @ {size} px, {'+'.join(modalities):>9}: {n / seconds:8.1f} records/s ({n} records)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--keys", default="100000,1000000", help="comma-separated key counts")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1024)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--index-archs", default="tiny:32,resnet50:224,vit_b_16:224", help="arch:size, or ''")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--rounds", type=int, default=3, help="timed runs per figure (the fastest is printed)"
    )
    args = parser.parse_args()
    device = resolve_device(args.device)
    threads = torch.get_num_threads()
    if faiss_available():
        import faiss

        faiss.omp_set_num_threads(threads)
    print(f"device {device}, torch {torch.__version__}, {threads} threads")
    for n in (int(x) for x in args.keys.split(",") if x):
        bench_search(n, args.dim, args.queries, args.k, device, args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        import os

        os.environ.setdefault("BIOVIS_DATA", tmp)
        for item in (x for x in args.index_archs.split(",") if x):
            arch, size = item.split(":")
            bench_index(arch, int(size), device, args.batch)


if __name__ == "__main__":
    main()
