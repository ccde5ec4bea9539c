"""The optional C kernel that bins float32 CPU activations in one pass (`binning.c`), and its thread fan-out.

The kernel is compiled on first use with the system C compiler ($CC, else cc) into
``$BIOVIS_CACHE/native/<key>/`` (key: sha256 of the source, the flags, the compiler's version and the
platform), written atomically, so concurrent ranks never load a half-written library. Its sha256 is recorded
beside it at build time; a cached library is loaded (ctypes) only when it and that record are owned by this
user, writable by no one else, and the hashes agree; otherwise it is rebuilt. Nothing but this project's own
source is ever compiled or loaded. Without a working compiler, or
with ``BIOVIS_NATIVE=0``, `binning_kernel()` is None and the accumulator bins with torch ops instead (the
same bins, about 2.5x slower on ResNet-50 features). On CUDA the torch path is always used.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from core.atomic import atomic_path, write_text
from core.cachedir import cache_root

SOURCE = Path(__file__).with_name("binning.c")
FLAGS = ("-O3", "-std=c99", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math")
COMPILE_TIMEOUT_S = 120
# Rows are handed to threads only when a call has at least this many activations per thread.
MIN_ELEMENTS_PER_THREAD = 1 << 16


class BinningKernel:
    """`vdna_bin_f32` of the compiled library, with its argument types declared."""

    def __init__(self, library: ctypes.CDLL, path: Path):
        self.path = path
        self.spare_columns = int(library.vdna_spare_columns())
        p, i = ctypes.c_void_p, ctypes.c_int64
        self._bin = library.vdna_bin_f32
        self._bin.argtypes = [p, i, i, i, i, i, p, p, i, p, i]
        self._bin.restype = None

    def bin_rows(
        self,
        x: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        bins: int,
        counts: torch.Tensor,
    ) -> None:
        """Add the histograms of every neuron of ``x`` [B, C, L] (float32, CPU) to ``counts`` [C, >= bins +
        spare_columns] (int32); ``mean``, ``std``: float64 [C]. Rows are split among torch's CPU threads."""
        if not (
            x.dtype == torch.float32
            and counts.dtype == torch.int32
            and mean.dtype == std.dtype == torch.float64
        ):
            raise TypeError("bin_rows takes float32 features, float64 mean/std and int32 counts")
        x = x.contiguous()
        mean, std = mean.contiguous(), std.contiguous()
        b, c, length = x.shape
        if counts.shape[0] != c or counts.shape[1] < bins + self.spare_columns or counts.stride(1) != 1:
            raise ValueError(f"counts must be [{c}, >= {bins + self.spare_columns}] with contiguous rows")
        args = (x.data_ptr(), b, c, length)
        tail = (mean.data_ptr(), std.data_ptr(), bins, counts.data_ptr(), counts.stride(0))
        threads = max(1, min(torch.get_num_threads(), c, x.numel() // MIN_ELEMENTS_PER_THREAD))
        if threads == 1:
            self._bin(*args, 0, c, *tail)
            return
        bounds = [c * t // threads for t in range(threads + 1)]
        jobs = [
            _pool(threads).submit(self._bin, *args, lo, hi, *tail) for lo, hi in itertools.pairwise(bounds)
        ]
        for job in jobs:  # ctypes releases the GIL for the call, so the rows are binned in parallel
            job.result()


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="vdna-binning")


def _compiler() -> list[str] | None:
    cc = os.environ.get("CC") or "cc"
    parts = cc.split()
    return parts if parts and shutil.which(parts[0]) else None


def _library_path(compiler: Sequence[str]) -> Path:
    version = subprocess.run(
        [*compiler, "--version"], capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, check=True
    ).stdout
    identity = "\n".join(
        [hashlib.sha256(SOURCE.read_bytes()).hexdigest(), *FLAGS, *compiler, version, platform.platform()]
    )
    key = hashlib.sha256(identity.encode("utf-8")).hexdigest()[:24]
    return cache_root() / "native" / key / "libvdna_binning.so"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _private(path: Path) -> bool:
    """Owned by this user and writable by nobody else (the file and every folder up to the cache root)."""
    root = cache_root().resolve()
    for item in [path, *path.parents]:
        try:
            info = item.stat()
        except OSError:
            return False
        if info.st_uid != os.getuid() or info.st_mode & 0o022:
            return False
        if item.resolve() == root:
            return True
    return False


def _trusted(path: Path) -> bool:
    """The cached library is the one this user built: private, and its sha256 is the one recorded at build
    time. Anything else (replaced, truncated, planted by another user) is rebuilt, never loaded."""
    record = path.with_name(path.name + ".sha256")
    try:
        return _private(path) and _private(record) and record.read_text().strip() == _digest(path)
    except OSError:
        return False


def _build(compiler: Sequence[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with atomic_path(path, suffix=".so") as tmp:
        result = subprocess.run(
            [*compiler, *FLAGS, "-o", str(tmp), str(SOURCE), "-lm"],
            capture_output=True,
            text=True,
            timeout=COMPILE_TIMEOUT_S,
        )
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines()
            raise RuntimeError(lines[0] if lines else f"exit code {result.returncode}")
        digest = _digest(tmp)
    write_text(path.with_name(path.name + ".sha256"), digest + "\n")


@functools.cache
def binning_kernel() -> BinningKernel | None:
    """The compiled kernel (built on first use, then loaded from the cache), or None without one."""
    if os.environ.get("BIOVIS_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    compiler = _compiler()
    if compiler is None:
        reason = f"no C compiler ({os.environ.get('CC') or 'cc'}) found"
    else:
        try:
            path = _library_path(compiler)
            if not _trusted(path):
                _build(compiler, path)
                if not _trusted(path):  # a cache folder others can write to: build where only we can
                    path = Path(tempfile.mkdtemp(prefix="biovis-native-")) / path.name
                    _build(compiler, path)
            return BinningKernel(ctypes.CDLL(str(path)), path)
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            reason = f"building {SOURCE.name} failed: {e}"
    warnings.warn(
        f"{reason}; VDNA histograms on the CPU use the slower torch binning (BIOVIS_NATIVE=0 silences this)",
        stacklevel=2,
    )
    return None
