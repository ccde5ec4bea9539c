"""Does the data pipeline keep the model fed? Images/s of the loader alone (the float path the trainers use
today against the uint8 path with the augmentation on the device, by worker count), of the bare classifier
step on device-resident batches, and of the real `train classifier` loop, on a folder of CUB-sized JPEGs.

The images are made once into `--data` (default .bench-cache/): 500 x 375 photo-like JPEGs (smooth colour
fields, blotches, grain; about 60-80 kB at quality 90, so decoding costs what CUB photos cost), in 200 class
folders like CUB. Goals (issue 15): the loader >= 2x the step, the loop >= 0.9x the step.

    python bench/bench_loader.py --device cpu --size 32 --images 128 --workers 0,2      # a CPU check
    python bench/bench_loader.py --device cuda --size 256 --batch 32,128 --workers 0,8,16  # the issue's rows

Rows: `float` = build_dataset(output="float"): torchvision transforms per item in the workers, float32
shipped; `uint8` = output="uint8": decode + squash in the workers, uint8 shipped, then `to_model_batch`
(crop, flip, [-1, 1]) on the device; `encoded` = output="encoded": bytes shipped, JPEG decoding on the device
too (nvJPEG on CUDA; on the CPU this row is the main process decoding). Loader rows include the copy to the
device, and for the new paths the device transform, synchronised.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAX_CLASSES = 200  # CUB's; fewer for small sets, so that every class has a train and a val image


def texture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A photo-like float image: colour waves, bicubic blotches at 1/4 and 1/16 scale, and sensor grain."""
    from PIL import Image

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 3), np.float32)
    for c in range(3):
        img[..., c] = rng.uniform(60, 190)
        for _ in range(5):
            fx, fy = rng.uniform(0.002, 0.04, 2)
            img[..., c] += rng.uniform(5, 25) * np.sin(2 * np.pi * (fx * xx + fy * yy) + rng.uniform(0, 7))
    for factor, strength in ((4, 0.8), (16, 1.2)):
        small = (
            (rng.normal(0, 40, (height // factor, width // factor, 3)) + 128).clip(0, 255).astype(np.uint8)
        )
        img += (
            np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), np.float32) - 128
        ) * strength
    return img + rng.normal(0, 5, img.shape)


def make_images(folder: Path, count: int, seed: int = 0) -> Path:
    """`count` JPEGs of 500 x 375 in `folder`/NNN/ (200 classes, or one per 20 images), made once: random
    windows of 32 larger textures with random colour gains, so no two files are alike."""
    from PIL import Image

    done = folder / f"done-{count}.json"
    if done.is_file():
        return folder
    rng = np.random.default_rng(seed)
    classes = max(2, min(MAX_CLASSES, count // 20))
    bases = [texture(rng, 1000, 750) for _ in range(min(32, count))]
    for i in range(count):
        base = bases[i % len(bases)]
        top, left = rng.integers(0, 375), rng.integers(0, 500)
        window = base[top : top + 375, left : left + 500] * rng.uniform(0.8, 1.2, 3)
        path = folder / f"{i % classes:03d}" / f"img_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(window.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    done.write_text(json.dumps({"images": count, "size": [500, 375]}))
    return folder


def cpu_ms_per_image(
    spec, output: str, train: bool, batch: int, count: int, device, rounds: int = 3
) -> tuple:
    """CPU milliseconds per image (process time, so other load on the machine does not count) of a worker's
    part (decode, transform, collate) and of the main process's part (to_model_batch), best of `rounds`."""
    from datasets.gpu_transforms import to_model_batch
    from datasets.registry import build_dataset, collate_skipping

    data = build_dataset(spec, "train", train_transform=train, output=output)
    count = min(count, len(data)) // batch * batch
    worker, main = [], []
    for _ in range(rounds):
        start = time.process_time()
        batches = [collate_skipping([data[i] for i in range(k, k + batch)]) for k in range(0, count, batch)]
        worker.append(time.process_time() - start)
        start = time.process_time()
        for b in batches:
            to_model_batch(b, device, train=train)
        sync(device)
        main.append(time.process_time() - start)
    return 1000 * min(worker) / count, 1000 * min(main) / count


def loader_rate(
    spec, output: str, batch: int, workers: int, device, batches: int, train: bool = True
) -> float:
    """Images/s of the train loader of `output` over `batches` batches (after one warm-up batch), the copy
    to `device` (and the device transform of the new paths) included."""
    from torch.utils.data import DataLoader

    from core.device import loader_settings
    from datasets.gpu_transforms import to_model_batch
    from datasets.registry import build_dataset, collate_skipping

    data = build_dataset(spec, "train", train_transform=train, output=output)
    settings = {**loader_settings(device, workers), "persistent_workers": False}
    loader = DataLoader(
        data, batch_size=batch, shuffle=True, drop_last=True, collate_fn=collate_skipping, **settings
    )
    n = min(batches, len(loader) - 1)
    if n < 1:
        raise SystemExit(f"--images too few for batch {batch}: make more (the loader needs 2 batches)")
    it = iter(loader)
    seen = 0
    for k in range(n + 1):
        if k == 1:
            sync(device)
            start = time.perf_counter()
        x = to_model_batch(next(it), device, train=train)["image"]
        seen += len(x) if k else 0
    sync(device)
    return seen / (time.perf_counter() - start)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_rate(arch: str, size: int, batch: int, steps: int, device) -> float:
    """Images/s of the trainer's own step, `training.classifier.classifier_step`, on a batch already on the
    device (bench_classifier.measure)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_classifier import measure

    return measure(arch, size, batch, steps, device)


def loop_rate(args, root: Path, arch: str, size: int, batch: int, workers: int | None, device) -> dict:
    """The real trainer, `training.classifier.train_classifier`, on the generated folder: the images/s it
    logs over its last epoch (what a user sees; it includes the epoch-start refill) and the wall rate."""
    import pandas as pd

    from core.config import build
    from training.classifier import ClassifierConfig, train_classifier

    cfg = build(ClassifierConfig, dict(
        dataset="folder", data_dir=str(root), image_size=size, arch=arch, batch_size=batch, epochs=args.epochs,
        device=str(device), num_workers=workers, val_fraction=0.05,
        log_every=max(1, len(list(root.glob("*/*.jpg"))) * 3 // (8 * batch)), lr=1e-4,
    ))  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench_loader_run_") as run:
        start = time.perf_counter()
        train_classifier(cfg, Path(run), quiet=True)
        wall = time.perf_counter() - start
        log = pd.read_json(Path(run) / "log.jsonl", lines=True)
    train = log[(log["split"] == "train") & log["images_per_s"].notna()]
    last = train[train["epoch"] == train["epoch"].max()]
    steps = int(log["step"].max())
    return {"logged": float(last["images_per_s"].iloc[-1]), "wall": steps * batch / wall}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--data", default=str(ROOT / ".bench-cache" / "cub_like"), help="folder of the JPEGs")
    parser.add_argument("--images", type=int, default=None, help="JPEGs to make (default 4000; 128 on CPU)")
    parser.add_argument("--size", type=int, default=None, help="model input px (default 256; 32 on CPU)")
    parser.add_argument("--arch", default=None, help="classifier (default resnet50; tiny on CPU)")
    parser.add_argument("--batch", default=None, help="comma list of batch sizes (default 32,128; 16 on CPU)")
    parser.add_argument("--workers", default=None, help="comma list for the loader rows (default 0,8,all)")
    parser.add_argument("--paths", default="float,uint8,encoded", help="loader paths to time")
    parser.add_argument("--batches", type=int, default=20, help="timed loader batches per row")
    parser.add_argument("--repeats", type=int, default=1, help="loader runs per cell (the fastest is shown)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--steps", type=int, default=10, help="timed model steps")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the real train loop (0: skip it)")
    parser.add_argument(
        "--loop-workers", type=int, default=None, help="trainer's --num-workers (default: its own)"
    )
    args = parser.parse_args(argv)

    import torch

    from core.device import resolve_device, usable_cpus
    from datasets.registry import DataSpec

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cpu = device.type == "cpu"
    images = args.images or (128 if cpu else 4000)
    size = args.size or (32 if cpu else 256)
    arch = args.arch or ("tiny" if cpu else "resnet50")
    batches = [int(b) for b in (args.batch or ("16" if cpu else "32,128")).split(",")]
    workers = [
        int(w)
        for w in (
            args.workers or ",".join(map(str, sorted({0, min(8, usable_cpus()), usable_cpus()})))
        ).split(",")
    ]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    root = make_images(Path(args.data) / str(images), images)
    spec = DataSpec("folder", str(root), image_size=size, val_fraction=0.05)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}, {usable_cpus()} usable cores, "
          f"{torch.get_num_threads()} threads; {images} JPEGs of 500 x 375 in {root}; model input {size} px")  # fmt: skip

    print(
        "\nCPU ms per image (process time, best of 3; the worker's part bounds the images/s a core can feed):"
    )
    for output in args.paths.split(","):
        for train in (True, False):
            work, main_part = cpu_ms_per_image(
                spec, output, train, batches[0], args.batches * batches[0], device
            )
            print(f"  {output:<8} {'train' if train else 'eval':<5}: worker {work:6.2f} ms/image "
                  f"({1000 / work:7.1f} images/s per core), main process to_model_batch {main_part:6.2f} ms/image")  # fmt: skip

    print("\nloader alone (train split, shuffled), images/s; ms per image = 1000 / rate at 0 workers")
    print(f"{'path':<9} {'batch':>6} " + " ".join(f"{f'{w} workers':>11}" for w in workers))
    loader = {}
    for output in args.paths.split(","):
        for batch in batches:
            rates = [max(loader_rate(spec, output, batch, w, device, args.batches) for _ in range(args.repeats))
                     for w in workers]  # fmt: skip
            loader[(output, batch)] = rates
            cells = " ".join(f"{r:11.1f}" for r in rates)
            ms = f"   ({1000 / rates[0]:.2f} ms/image in one process)" if workers[0] == 0 else ""
            print(f"{output:<9} {batch:>6} {cells}{ms}")

    print(f"\nmodel: {arch} @ {size} px, bf16 autocast and channels_last on CUDA")
    for batch in batches:
        step = step_rate(arch, size, batch, args.steps, device)
        best = {out: max(loader[(out, batch)]) for out in args.paths.split(",")}
        ratios = ", ".join(f"{out} loader / step {rate / step:.2f}x" for out, rate in best.items())
        print(f"batch {batch:>4}: bare step {step:9.1f} images/s; {ratios}")
        if args.epochs > 0:
            loop = loop_rate(args, root, arch, size, batch, args.loop_workers, device)
            print(f"            train classifier loop {loop['logged']:9.1f} images/s logged in its last epoch "
                  f"({loop['logged'] / step:.2f}x the step), {loop['wall']:.1f} images/s over the whole run "
                  f"(validation, checkpoints and start-up included)")  # fmt: skip


if __name__ == "__main__":
    main()
