"""What the side-by-side benchmarks share: the pinned reference implementations, fetched at bench time into
an ignored folder, and the running of each implementation in its own process.

    python bench/sidebyside.py fetch viscoin [--git-dir VISCOIN.git --nvlabs-git-dir NVLABS.git]
    python bench/sidebyside.py fetch nvlabs [--git-dir NVLABS.git]

`fetch` clones from GitHub (or archives a local clone given by --git-dir) into .bench-cache/reference/<name>,
at the pinned commits: GnRlLeclerc/VisCoIN 223811c with NVlabs/stylegan2-ada-pytorch d72cc7d as its
`stylegan2_ada` submodule, and that NVlabs commit alone. Pictures and files over 200 kB are left out. Nothing
of it is committed (.bench-cache/ is ignored); the reference code is run, not imported by the project.

A worker prints one line `SIDE_BY_SIDE_RESULT {json}`; `run_workers` starts one process per implementation
(so that neither runs on the other's allocator state, cuDNN autotuning or leftover threads) and collects them.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".bench-cache" / "reference"
RESULT_TAG = "SIDE_BY_SIDE_RESULT "
NVLABS = ("https://github.com/NVlabs/stylegan2-ada-pytorch", "d72cc7d041b42ec8e806021a205ed9349f87c6a4")
VISCOIN = ("https://github.com/GnRlLeclerc/VisCoIN", "223811cee6468b70d1b5b8d6d8a31f0074bf0cb2")
MAX_BYTES = 200_000


# ----- the pinned references -----


def _git(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"git {' '.join(args)} failed: {done.stderr.strip()[-500:]}")
    return done.stdout


def _export(url: str, commit: str, dest: Path, git_dir: str | None) -> None:
    """The tree of `commit` into `dest` (no .git), from a local clone or a fresh clone of `url`."""
    if git_dir is None:
        git_dir = str(CACHE / "git" / (url.rstrip("/").split("/")[-1] + ".git"))
        if not Path(git_dir).is_dir():
            _git("clone", "--bare", "--filter=blob:limit=1m", url, git_dir)
    if not _git("--git-dir", git_dir, "cat-file", "-t", commit).strip() == "commit":
        raise SystemExit(f"{git_dir} lacks commit {commit}: fetch it there first")
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.Popen(["git", "--git-dir", git_dir, "archive", commit], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise SystemExit(f"git archive {commit} from {git_dir} failed")
    for path in sorted(dest.rglob("*"), reverse=True):
        if path.is_file() and (
            path.stat().st_size > MAX_BYTES or path.suffix.lower() in (".png", ".jpg", ".gif")
        ):
            path.unlink()


def fetch_reference(name: str, git_dir: str | None = None, nvlabs_git_dir: str | None = None) -> Path:
    """The pinned reference `name` ("viscoin" or "nvlabs") under .bench-cache/reference/, fetched once."""
    dest = CACHE / name
    stamp = dest / "REVISIONS.txt"
    if stamp.is_file():
        return dest
    tmp = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=CACHE.parent if CACHE.parent.is_dir() else None))
    if name == "viscoin":
        _export(*VISCOIN, tmp, git_dir)
        shutil.rmtree(tmp / "stylegan2_ada", ignore_errors=True)
        _export(*NVLABS, tmp / "stylegan2_ada", nvlabs_git_dir)
        revisions = f"VisCoIN {VISCOIN[1]}\nstylegan2_ada (NVlabs/stylegan2-ada-pytorch) {NVLABS[1]}\n"
    elif name == "nvlabs":
        _export(*NVLABS, tmp, git_dir)
        revisions = f"NVlabs/stylegan2-ada-pytorch {NVLABS[1]}\n"
    else:
        raise SystemExit(f"unknown reference {name!r}: viscoin or nvlabs")
    (tmp / "REVISIONS.txt").write_text(revisions)
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
    return dest


# ----- inside a worker -----


def resolve_device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        dev = torch.device("cuda", dev.index or 0)
        torch.cuda.set_device(dev)
    return dev


def sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def count(module, trainable_only: bool = False) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def report(impl: str, dev, seconds: list[float], images_per_unit: int, extra: dict) -> None:
    """Print the worker's result line: images/s from the median of `seconds` (each for `images_per_unit`
    images), peak GPU memory, max RSS."""
    import resource
    import statistics

    import torch

    median = statistics.median(seconds)
    out = {
        "impl": impl,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "seconds": [round(t, 4) for t in seconds],
        "median_s": median,
        "img_per_s": images_per_unit / median,
        "peak_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
        "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        **extra,
    }
    print(RESULT_TAG + json.dumps(out), flush=True)


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def stub_reference_imports() -> list[str]:
    """Stand-ins for modules the references import at module level but a timed step never uses: requests
    and cv2 (downloads, plotting), tqdm, and `distutils.util.strtobool` (gone from Python 3.12)."""
    stubbed = []
    for name in ("requests", "cv2"):
        if not has_module(name):
            sys.modules[name] = types.ModuleType(name)
            stubbed.append(name)
    if not has_module("tqdm"):
        module = types.ModuleType("tqdm")
        module.tqdm = lambda iterable=None, *a, **k: iterable
        sys.modules["tqdm"] = module
        stubbed.append("tqdm")
    try:
        importlib.import_module("distutils.util")
    except ImportError:
        package, util = types.ModuleType("distutils"), types.ModuleType("distutils.util")
        util.strtobool = lambda v: 1 if str(v).lower() in ("y", "yes", "t", "true", "on", "1") else 0
        package.util = util
        sys.modules["distutils"], sys.modules["distutils.util"] = package, util
        stubbed.append("distutils.util")
    # NVlabs JIT-compiles bias_act/upfirdn2d with ninja: make this interpreter's bin dir (pip's ninja) visible
    os.environ["PATH"] = (
        os.path.dirname(os.path.abspath(sys.executable)) + os.pathsep + os.environ.get("PATH", "")
    )
    return stubbed


def nvlabs_op_paths(prefixes: tuple[str, ...] = ("torch_utils.ops.",)) -> dict:
    """Which NVlabs op implementation ran: the compiled CUDA plugin or its pure-PyTorch fallback."""
    out = {}
    for op in ("bias_act", "upfirdn2d"):
        for prefix in prefixes:
            module = sys.modules.get(prefix + op)
            if module is None:
                continue
            if not getattr(module, "_inited", False):
                out[op] = "reference ops (plugin never requested: CPU tensors)"
            elif getattr(module, "_plugin", None) is not None:
                out[op] = "CUDA plugin (compiled)"
            else:
                out[op] = "reference ops (the CUDA plugin did not build, or --no-plugins)"
    return out


# ----- the parent -----


def run_workers(script: Path, argv: list[str], impls: dict[str, list[str]], timeout: int) -> list[dict]:
    """Run `script argv --worker-args` once per implementation, each in its own process; their results."""
    results = []
    for impl, extra in impls.items():
        cmd = [sys.executable, str(script), *argv, *extra]
        print(f"[{impl}] running ...", file=sys.stderr, flush=True)
        start = time.time()
        try:
            done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout)
            rc, stdout = done.returncode, done.stdout
        except subprocess.TimeoutExpired as err:
            rc, stdout = (
                "timeout",
                err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or ""),
            )
        lines = [line for line in stdout.splitlines() if line.startswith(RESULT_TAG)]
        if rc != 0 or not lines:
            print(stdout[-3000:], file=sys.stderr)
            print(f"[{impl}] FAILED (rc {rc})", file=sys.stderr)
            results.append({"impl": impl, "failed": True, "rc": rc})
            continue
        result = json.loads(lines[-1][len(RESULT_TAG) :])
        result.update(impl=impl, wall_s=round(time.time() - start, 1))
        print(f"[{impl}] {result['img_per_s']:.1f} images/s", file=sys.stderr, flush=True)
        results.append(result)
    return results


def fill_sizes(args: argparse.Namespace, gpu: dict, cpu: dict, on_cpu: bool) -> None:
    """The size options left unset take the GPU or the CPU default."""
    for name, value in (cpu if on_cpu else gpu).items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _parent_sizes(args: argparse.Namespace, gpu: dict, cpu: dict):
    """In the parent: the device the workers run on (the project's resolve_device), with the size options left
    unset filled in for it, and the sizes as the workers' arguments."""
    sys.path.insert(0, str(ROOT))
    from core.device import resolve_device

    device = resolve_device(args.device)
    fill_sizes(args, gpu, cpu, device.type == "cpu")
    return device, [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in gpu]


def plan(args: argparse.Namespace, gpu: dict, cpu: dict, flags: dict[str, list[str]], default: list[str],
         reference: str):  # fmt: skip
    """In the parent: the device and, for each implementation asked for (--impls, else `default`), its worker's
    arguments (the sizes, the device and its `flags`). `ref*` needs --reference (fetched as `reference`)."""
    device, sizes = _parent_sizes(args, gpu, cpu)
    impls = {}
    for impl in args.impls.split(",") if args.impls else default:
        if impl not in flags:
            raise SystemExit(f"--impls: unknown {impl!r} ({', '.join(flags)})")
        if impl.startswith("ref") and not args.reference:
            raise SystemExit(
                f"--impls {impl} needs --reference PATH (python bench/sidebyside.py fetch {reference})"
            )
        impls[impl] = [*sizes, f"--device={device}", *flags[impl]]
    return device, impls


def summarise(results: list[dict], reference: str, details: tuple[str, ...]) -> int:
    """Print the table and each worker's `details`; the exit status (1 when a worker failed)."""
    print()
    print_table(results, reference)
    for r in results:
        if not r.get("failed"):
            print(f"  {r['impl']}: { ({k: r[k] for k in details if k in r}) }")
    return 0 if all(not r.get("failed") for r in results) else 1


def print_table(results: list[dict], reference: str | None) -> None:
    """images/s, median seconds, peak GPU memory, max RSS and the ratio to `reference` per implementation."""
    ref = next((r for r in results if r["impl"] == reference and not r.get("failed")), None)
    header = f"{'impl':<12} {'device':<26} {'images/s':>9} {'median s':>9} {'peak GiB':>9} {'RSS GiB':>8} {'x ref':>7}"
    print(header)
    print("-" * len(header))
    for r in results:
        if r.get("failed"):
            print(f"{r['impl']:<12} FAILED (rc {r['rc']})")
            continue
        ratio = (
            f"{r['img_per_s'] / ref['img_per_s']:7.2f}" if ref is not None and r is not ref else f"{'-':>7}"
        )
        peak = f"{r['peak_gib']:9.2f}" if r["peak_gib"] is not None else f"{'-':>9}"
        print(f"{r['impl']:<12} {r['device_name'][:26]:<26} {r['img_per_s']:9.2f} {r['median_s']:9.4f} {peak} "
              f"{r['max_rss_gib']:8.2f} {ratio}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="fetch a pinned reference into .bench-cache/reference/")
    fetch.add_argument("name", choices=("viscoin", "nvlabs"))
    fetch.add_argument("--git-dir", help="a local clone (bare or not) of the reference's repository")
    fetch.add_argument("--nvlabs-git-dir", help="viscoin: a local clone of NVlabs/stylegan2-ada-pytorch")
    args = parser.parse_args()
    git_dir = args.git_dir
    if git_dir and (Path(git_dir) / ".git").is_dir():
        git_dir = str(Path(git_dir) / ".git")
    print(fetch_reference(args.name, git_dir, args.nvlabs_git_dir))


if __name__ == "__main__":
    main()
