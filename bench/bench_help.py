"""Latency of `python main.py --help` (median of N runs): it must not import torch."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "main.py"), "--help"], capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    print(
        f"main.py --help: median {statistics.median(times) * 1000:.0f} ms, min {min(times) * 1000:.0f} ms over {args.runs} runs"
    )


if __name__ == "__main__":
    main()
