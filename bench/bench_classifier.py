"""Classifier training throughput (images/s) on random [-1, 1] batches: forward, backward, Adam step.

Measures the model and optimiser, not the data pipeline. AMP bf16 and channels_last on CUDA, as in training.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.device import autocast, resolve_device  # noqa: E402
from models.classifiers import Classifier  # noqa: E402


def measure(arch: str, size: int, batch: int, steps: int, device) -> float:
    model = Classifier(arch, 200).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    y = torch.randint(0, 200, (batch,), device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with autocast(device, True):
            logits, _ = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--configs", default="tiny:32:64,resnet18:32:64,resnet50:32:32,resnet18:224:16,resnet50:224:8",
                        help="comma-separated arch:size:batch")  # fmt: skip
    args = parser.parse_args()
    device = resolve_device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    for item in args.configs.split(","):
        arch, size, batch = item.split(":")
        rate = measure(arch, int(size), int(batch), args.steps, device)
        print(f"{arch:>9} @ {size:>3} px, batch {batch:>3}: {rate:8.1f} train images/s")


if __name__ == "__main__":
    main()
