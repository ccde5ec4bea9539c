"""Classifier training throughput (images/s) on random [-1, 1] batches: `training.classifier.classifier_step`
(forward, backward, optimiser step), as `train classifier` runs it: bf16 autocast, channels_last and fused
Adam on CUDA. Measures the model and optimiser, not the data pipeline.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.device import autotune, resolve_device  # noqa: E402
from models.classifiers import Classifier  # noqa: E402
from training.classifier import ClassifierConfig, classifier_step  # noqa: E402
from training.optim import build_optimizer  # noqa: E402


def measure(arch: str, size: int, batch: int, steps: int, device, compile: bool = False) -> float:
    """Images/s of `classifier_step` over `steps` steps after two warm-up steps, on one device batch."""
    from core.config import build

    cuda = device.type == "cuda"
    autotune(device)  # as train_classifier: cuDNN's fastest algorithms on CUDA
    cfg = build(
        ClassifierConfig, dict(arch=arch, image_size=size, batch_size=batch, lr=1e-4, compile=compile)
    )
    model = Classifier(arch, 200).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if compile else model
    optimizer = build_optimizer(model.parameters(), cfg.optimizer, cfg.lr, fused=cuda)
    images = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    data = {
        "image": images.contiguous(memory_format=torch.channels_last) if cuda else images,
        "label": torch.randint(0, 200, (batch,), device=device),
    }
    for _ in range(2):
        classifier_step(net, data, optimizer, cfg)
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        classifier_step(net, data, optimizer, cfg)
    if cuda:
        torch.cuda.synchronize(device)
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the model (ClassifierConfig.compile)"
    )
    parser.add_argument("--configs", default="tiny:32:64,resnet18:32:64,resnet50:32:32,resnet18:224:16,resnet50:224:8",
                        help="comma-separated arch:size:batch")  # fmt: skip
    args = parser.parse_args()
    device = resolve_device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    for item in args.configs.split(","):
        arch, size, batch = item.split(":")
        rate = measure(arch, int(size), int(batch), args.steps, device, args.compile)
        print(f"{arch:>9} @ {size:>3} px, batch {batch:>3}: {rate:8.1f} train images/s")


if __name__ == "__main__":
    main()
