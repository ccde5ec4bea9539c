"""Atomic writes: write to a temporary file in the target's folder, flush, fsync, `os.replace`.

A killed job therefore never leaves a half-written file behind under the final name, and a failed write
(a full disk, a quota) leaves the previous file as it was. Such a failure surfaces as an `OSError` that names
the final path (not the temporary one), which `main.py` reports in one line.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def _umask() -> int:
    """The process umask; read from /proc where it can be (setting it to read it races with threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _share_like_open(path: Path, directory: bool = False) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give them the permissions `open`/`mkdir` would
    (the umask's), so that collaborators in a shared project folder can read the results."""
    if path.stat().st_mode & 0o777 == (0o700 if directory else 0o600):
        os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success move it over `path`, on error remove it.

    Use for writers that want a file name (safetensors, matplotlib, numpy).
    """
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        _share_like_open(tmp_path)
        os.replace(tmp_path, path)
    except OSError as err:
        if err.errno is None or err.filename not in (None, str(tmp_path), tmp_path):
            raise
        raise OSError(err.errno, err.strerror, str(path)) from None  # the file the user knows
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


class _KeepsWriteError:
    """A binary file that remembers the first error of its writes: torch.save reports its writer's failure
    as a RuntimeError that no longer says why ("unexpected pos ..."); this keeps the OSError behind it."""

    def __init__(self, file: BinaryIO):
        self._file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self._file.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def __getattr__(self, name: str):
        return getattr(self._file, name)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = "") -> Iterator[BinaryIO]:
    """Yield a binary file open for writing beside `path`, moved over `path` on success (as `atomic_path`).

    For writers that take a file object (torch.save, numpy): whatever they raise after a failed write, the
    OSError that caused it is what comes out."""
    with atomic_path(path, suffix) as tmp, open(tmp, "wb") as raw:
        file = _KeepsWriteError(raw)
        try:
            yield file  # type: ignore[misc]
        except Exception:
            if file.error is not None:
                raise file.error from None
            raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success rename it to `path` (which must not exist)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _share_like_open(tmp, directory=True)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
