"""Shared fixtures: an isolated data root with the small synthetic world, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """A data root for the whole session, exported so that subprocesses use it too."""
    root = tmp_path_factory.mktemp("data")
    os.environ["BIOVIS_DATA"] = str(root)
    return root


@pytest.fixture(scope="session")
def small_world(data_root) -> Path:
    """The `small` world preset (8 species, 32 px), generated once per session."""
    from datasets.registry import ensure_world_root

    return ensure_world_root("small", quiet=True)


def run_cli(
    *args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """`python main.py ARGS` in a subprocess, as a user runs it."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or ROOT,
        timeout=timeout,
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes under `folder`, to prove that a refused command changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
