"""Side-by-side benchmark of `vdna make` / `vdna compare` against the `vdna` package (Ramtoula et al.).

Same extractor: a random-weight ResNet-50 (torchvision's initialisation under seed 0, i.e. our
``rand_resnet50``), injected into vdna's ``rand_resnet50`` through its weights file. Same images: the recipe
of reference/vdna.md §8 (2 x N random 256 px PNGs). Same distribution: ``histogram-<bins>`` with one
activation-ranges file given to both tools. Same preprocessing: vdna's "clean" float bicubic resize
(``--resize clean`` on our side). Prints images/s of make, the time of EMD, the ratios, and whether the
histograms are identical.

Each tool runs in its own process per round (rounds alternate, so both see the same drift of the machine):
one untimed warm-up make, then the timed makes of both sets. In one shared process each tool would run
on the other's leftovers (vdna's 4 GB heap, and worker processes forked from it).

vdna's pixel normalisation computes ``(x/255 - mean) / std`` where ours computes ``x/127.5 - 1`` and then
``x * scale + shift`` (the [-1, 1] convention): the inputs differ in the last float bit, which moves a few
activations across bin edges. ``--align-normalisation`` (default) makes vdna's dataset use our arithmetic
(same cost), so that identical histograms can be checked; ``--no-align-normalisation`` reports the
differences of the unmodified package instead.

vdna is not a dependency of this project. Install it into a separate venv without its torch and point
``--vdna-site`` at that venv's site-packages (appended to sys.path, so this interpreter's torch, numpy and
scipy serve both tools)::

    python -m venv /tmp/vdna-venv
    /tmp/vdna-venv/bin/pip install vdna==0.1.1 --no-deps
    /tmp/vdna-venv/bin/pip install huggingface_hub opencv-python-headless
    python bench/bench_vdna.py --vdna-site /tmp/vdna-venv/lib/python3.11/site-packages

``--device cuda`` runs both tools' makes on the GPU (ours without AMP). There, cuDNN picks its own
convolution algorithms per memory layout (ours runs channels-last), so the histograms are compared but not
expected to be identical bit for bit.

Offline use follows §8: vdna's ``hf_hub_download`` is replaced by local files and its CUDA-only
``get_features`` by ``forward_backbone(b)[1]``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.vdna import emd, load_vdna, save_vdna, vdna_paths  # noqa: E402
from models.extractors import build_extractor  # noqa: E402
from testing.vdna.pipeline import make_vdna  # noqa: E402

INSTALL = (
    "vdna is not importable: python -m venv /tmp/vdna-venv && /tmp/vdna-venv/bin/pip install vdna==0.1.1 "
    "--no-deps && /tmp/vdna-venv/bin/pip install huggingface_hub opencv-python-headless, then pass "
    "--vdna-site /tmp/vdna-venv/lib/python3.X/site-packages"
)


def make_images(work: Path, n: int) -> tuple[Path, Path]:
    """§8's images: imgs_a = N uniform random 256 px RGB PNGs, imgs_b = the next N draws as x // 2 + 100."""
    from PIL import Image

    a, b = work / "imgs_a", work / "imgs_b"
    if len(list(a.glob("*.png"))) == n and len(list(b.glob("*.png"))) == n:
        return a, b
    rng = np.random.default_rng(0)
    for folder, transform in ((a, lambda x: x), (b, lambda x: x // 2 + 100)):
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.png"):
            old.unlink()
        for i in range(n):
            pixels = transform(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:03d}.png")
    return a, b


def shim_files(work: Path) -> tuple[Path, Path]:
    """Where the shared weights file and activation_ranges.json live."""
    return work / "shim" / "weights.pth", work / "shim" / "activation_ranges.json"


def write_shared_files(work: Path, a: Path, b: Path, args: argparse.Namespace) -> None:
    """vdna's weights file ({"model_state_dict": ...} of the random ResNet-50, no head) and one
    activation_ranges.json (min/max over both folders, from our activation-ranges pass)."""
    import torchvision

    weights, ranges_path = shim_files(work)
    weights.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = torchvision.models.resnet50().state_dict()
    torch.save({"model_state_dict": {k: v for k, v in state.items() if not k.startswith("fc.")}}, weights)
    parts = [
        make_vdna(folder, "rand_resnet50", "activation-ranges", args.batch_size, args.workers, "cpu",
                  resize="clean", quiet=True)
        for folder in (a, b)
    ]  # fmt: skip
    mins, maxs = {}, {}
    for layer in parts[0].neurons_list:
        lo = torch.minimum(parts[0].data[layer]["min"], parts[1].data[layer]["min"])
        hi = torch.maximum(parts[0].data[layer]["max"], parts[1].data[layer]["max"])
        mins[layer] = {str(i): float(v) for i, v in enumerate(lo)}
        maxs[layer] = {str(i): float(v) for i, v in enumerate(hi)}
    ranges_path.write_text(json.dumps({"mins_per_neuron": mins, "maxs_per_neuron": maxs}))


def shim_vdna(weights: Path, ranges_path: Path, align: bool):
    """Import vdna and make its rand_resnet50 run offline on the CPU (§8), optionally with our pixel
    arithmetic; returns the vdna module."""
    vdna = importlib.import_module("vdna")
    rr = importlib.import_module("vdna.networks.random_resnet50")
    files = {"weights.pth": weights, "activation_ranges.json": ranges_path}
    rr.hf_hub_download = lambda repo_id, filename, **kw: str(files[Path(filename).name])
    rr.ResNetFeatureExtractor.get_features = lambda self, batch: self.forward_backbone(batch)[1]
    if align:
        im = importlib.import_module("vdna.utils.im")
        ours = build_extractor("rand_resnet50")
        scale, shift = ours.in_scale[0], ours.in_shift[0]

        def getitem(self, i):
            x = np.array(self._get_image(i))
            x = self.fn_resize(im._make_np_img_square(x, self.crop_to_square_pre_resize))
            t = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))).div_(127.5).sub_(1.0)
            return t * scale + shift

        im.ResizeDataset.__getitem__ = getitem
    return vdna


def timed(fn):
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def histogram_diff(ours, theirs) -> dict:
    """How far two histogram VDNAs are apart: bins that differ, total and largest |count difference|."""
    differing = total = largest = 0
    for layer in ours.neurons_list:
        d = (ours.data[layer] - theirs.data[layer].to(torch.int64)).abs()
        differing += int((d > 0).sum())
        total += int(d.sum())
        largest = max(largest, int(d.max()))
    bins = sum(c * ours.hist_nb_bins for c in ours.neurons_list.values())
    return {"identical": differing == 0, "bins_differing": differing, "bins": bins, "abs_count_diff": total,
            "max_bin_diff": largest}  # fmt: skip


def run_tool(tool: str, args: argparse.Namespace, work: Path) -> dict:
    """One process per tool and round (`--tool`): an untimed warm-up make, then timed makes of both sets, the
    VDNAs saved in the vdna layout, and the best of 5 EMD timings. Returns what the process printed."""
    cmd = [sys.executable, __file__, "--tool", tool, "--work", str(work), "--images", str(args.images),
           "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--bins", str(args.bins),
           "--align-normalisation" if args.align_normalisation else "--no-align-normalisation"]  # fmt: skip
    if args.vdna_site:
        cmd += ["--vdna-site", args.vdna_site]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    cmd += ["--device", args.device]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"the {tool} process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def tool_process(args: argparse.Namespace, work: Path) -> None:
    """The body of a `--tool` process; prints one JSON line."""
    a, b = work / "imgs_a", work / "imgs_b"
    weights, ranges_path = shim_files(work)
    distribution = f"histogram-{args.bins}"
    if args.tool == "ours":

        def make(folder):
            return make_vdna(folder, "rand_resnet50", distribution, args.batch_size, args.workers, args.device,
                             resize="clean", ranges=ranges_path, amp=False, quiet=True)  # fmt: skip

        distance, save = emd, save_vdna
    else:
        vdna = shim_vdna(weights, ranges_path, args.align_normalisation)
        processor = vdna.VDNAProcessor()

        def make(folder):
            return processor.make_vdna(source=str(folder), feat_extractor_name="rand_resnet50",
                                       distribution_name=distribution, device=args.device, num_workers=args.workers,
                                       batch_size=args.batch_size, verbose=False)  # fmt: skip

        def distance(x, y):
            return float(vdna.EMD(x, y))

        def save(v, path):
            v.save(str(path))

    make(a)  # warm-up: lazy imports, first-call set-up
    out: dict = {"times": []}
    results = {}
    for key, folder in (("a", a), ("b", b)):
        results[key], t = timed(lambda f=folder: make(f))
        out["times"].append(t)
        save(results[key], work / f"{args.tool}_{key}")
    out["emd"] = float(distance(results["a"], results["b"]))
    out["emd_time"] = min(timed(lambda: distance(results["a"], results["b"]))[1] for _ in range(5))
    if args.tool == "vdna" and vdna_paths(work / "ours_a")[1].exists():
        ours_a = vdna.load_vdna_from_files(str(work / "ours_a"))
        out["ours_a_in_vdna_emd"] = float(vdna.EMD(ours_a, results["b"]))
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vdna-site", help="site-packages holding vdna (appended to sys.path)")
    parser.add_argument("--work", default="/tmp/bench_vdna", help="folder for images and shim files")
    parser.add_argument("--images", type=int, default=64, help="images per set (§8: 64)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--bins", type=int, default=1000)
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda[:i] for both tools' makes (ours in float32: no AMP)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="rounds, one process per tool each (medians)")
    parser.add_argument(
        "--threads", type=int, help="torch intra-op threads for both tools (default: torch's)"
    )
    parser.add_argument("--align-normalisation", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--tool", choices=["ours", "vdna"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.vdna_site:
        sys.path.append(args.vdna_site)
    work = Path(args.work)
    if args.tool:
        tool_process(args, work)
        return
    a, b = make_images(work, args.images)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}; "
          f"{args.images} images per set, batch {args.batch_size}, {args.workers} workers, histogram-{args.bins}, "
          f"normalisation {'aligned' if args.align_normalisation else 'as shipped'}")  # fmt: skip
    write_shared_files(work, a, b, args)
    try:
        importlib.import_module("vdna")
        tools = ["ours", "vdna"]
    except ImportError:
        print(INSTALL)
        tools = ["ours"]
    runs: dict[str, list[dict]] = {tool: [] for tool in tools}
    for _ in range(args.repeats):  # alternating processes, so that both tools see the same machine drift
        for tool in tools:
            runs[tool].append(run_tool(tool, args, work))
    times = {tool: [t for run in runs[tool] for t in run["times"]] for tool in tools}
    print(
        "make times (s), "
        + "; ".join(f"{tool}: " + ", ".join(f"{t:.2f}" for t in times[tool]) for tool in tools)
    )
    median = {tool: statistics.median(times[tool]) for tool in tools}
    emd_time = {tool: min(run["emd_time"] for run in runs[tool]) for tool in tools}
    for tool in tools:
        print(f"make, {tool}: {median[tool]:.2f} s per set = {args.images / median[tool]:.2f} images/s; "
              f"EMD {runs[tool][-1]['emd']:.6f} in {emd_time[tool]:.3f} s")  # fmt: skip
    if "vdna" not in tools:
        return
    print(f"speed-up: make {median['vdna'] / median['ours']:.2f}x, EMD {emd_time['vdna'] / emd_time['ours']:.2f}x "
          f"(load {os.getloadavg()[0]:.1f})")  # fmt: skip
    for key in ("a", "b"):
        diff = histogram_diff(load_vdna(work / f"ours_{key}"), load_vdna(work / f"vdna_{key}"))
        print(f"histograms of imgs_{key}: {json.dumps(diff)}")
    print(f"our file in vdna's loader: EMD(ours_a as loaded by vdna, vdna's b) = "
          f"{runs['vdna'][-1]['ours_a_in_vdna_emd']:.6f}")  # fmt: skip


if __name__ == "__main__":
    main()
