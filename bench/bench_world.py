"""Benchmark: how fast the synthetic species world is generated (images per second, one process, one core).

Generates the default world (24 species x 40 images) at each size into a temporary folder, end to end
(drawing, PNG encoding, writing every CUB file), and also times drawing alone. Target: >= 500 images/s at 64 px.
CPU-time rates are what one core sustains; wall-clock rates also include waiting for a busy machine.

Usage: python bench/bench_world.py [--sizes 64 32] [--repeats 3] [--seed 0] [--dir /dev/shm]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 32], help="image sides in pixels")
    parser.add_argument("--repeats", type=int, default=3, help="runs per size; the fastest is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default=None, help="where to write (default: the system temp folder)")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, without installing
    from datasets.world import WorldConfig, build_species, generate_world, render_specimen

    print("size  images  wall s  images/s (wall)  images/s (cpu)  draw-only images/s (cpu)")
    for size in args.sizes:
        config = WorldConfig(seed=args.seed, image_size=size)
        species = build_species(config)
        wall, cpu, draw = float("inf"), float("inf"), float("inf")
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                start, start_cpu = time.perf_counter(), time.process_time()
                generate_world(Path(tmp) / "CUB_200_2011", config)
                wall = min(wall, time.perf_counter() - start)
                cpu = min(cpu, time.process_time() - start_cpu)
            start_cpu = time.process_time()
            for sp in species:
                for k in range(config.images_per_species):
                    render_specimen(config, sp, k)
            draw = min(draw, time.process_time() - start_cpu)
        n = config.n_images
        print(f"{size:>4} {n:>7} {wall:>7.3f} {n / wall:>16.0f} {n / cpu:>15.0f} {n / draw:>25.0f}")


if __name__ == "__main__":
    main()
