"""Newick reader speed: a one-line tree of 1M leaves, and a caterpillar nested 100k deep (no recursion).

Prints seconds per parse (`datasets.phylogeny.parse_newick`), for building the `Tree` (depths, leaf index) and
for writing it back, and the growth factor between 250k and 1M leaves (about 4 for a linear reader; the
quadratic reader this one replaced took 47 s at 100k leaves).

    python bench/bench_newick.py [--leaves 1000000] [--depth 100000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets.phylogeny import Tree, parse_newick, write_newick  # noqa: E402


def random_tree(leaves: int, seed: int = 0) -> str:
    """A random binary tree (random pairs of clades joined until one is left), lengths 4 digits, one line."""
    rng = np.random.default_rng(seed)
    clades = [f"sp{i}:{rng.random():.4f}" for i in range(leaves)]
    while len(clades) > 1:
        order = rng.permutation(len(clades))
        joined = [
            f"({clades[a]},{clades[b]}):{rng.random():.4f}"
            for a, b in zip(order[0::2], order[1::2], strict=False)
        ]
        if len(order) % 2:
            joined.append(clades[order[-1]])
        clades = joined
    return clades[0].rsplit(":", 1)[0] + ";"


def caterpillar(depth: int) -> str:
    """((((l0,l1),l2),l3)...): every clade nested in the next, `depth` levels deep."""
    return "(" * depth + "l0," + ",".join(f"l{i})" for i in range(1, depth + 1)) + ";"


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaves", type=int, default=1_000_000)
    parser.add_argument("--depth", type=int, default=100_000)
    args = parser.parse_args()
    rows = []
    for leaves in (args.leaves // 4, args.leaves):
        text = random_tree(leaves)
        root, parse = timed(parse_newick, text)
        tree, build = timed(Tree, root)
        written, write = timed(write_newick, root)
        assert len(tree.leaves) == leaves and parse_newick(written) is not None
        rows.append((leaves, len(text), parse, build, write))
        print(f"{leaves:>9,} leaves, {len(text) / 1e6:5.1f} MB on one line: parse {parse:5.2f} s, "
              f"Tree {build:5.2f} s, write {write:5.2f} s", flush=True)  # fmt: skip
    print(f"growth 4x leaves -> parse time x{rows[1][2] / rows[0][2]:.2f} (4 = linear)")
    text = caterpillar(args.depth)
    root, parse = timed(parse_newick, text)
    tree, build = timed(Tree, root)
    assert tree.height == args.depth
    print(f"caterpillar nested {args.depth:,} deep: parse {parse:.2f} s, Tree {build:.2f} s")


if __name__ == "__main__":
    main()
