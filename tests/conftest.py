"""Shared fixtures: an isolated data root with the small synthetic world, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

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


class CliResult(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def run_main(args: tuple[str, ...], capsys, monkeypatch) -> CliResult:
    """`python main.py ARGS` in this process (no torch import per call): exit code, stdout and stderr."""
    import main

    monkeypatch.setattr(sys, "argv", ["main.py", *args])
    capsys.readouterr()
    try:
        main.main()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    out = capsys.readouterr()
    return CliResult(code, out.out, out.err)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes under `folder`, to prove that a refused command changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 2, one line on stderr without a traceback, naming every fragment."""
    assert result.returncode == 2, result.stdout + result.stderr
    message = result.stderr.strip()
    assert "Traceback" not in message and len(message.splitlines()) == 1, message
    for fragment in fragments:
        assert fragment in message, message


@pytest.fixture(scope="session")
def viscoin(tmp_path_factory, small_world):
    """A tiny trained VisCoIN ensemble and its bundle (tests/helpers_viscoin.py), built once per session."""
    from helpers_viscoin import session_viscoin

    return session_viscoin(tmp_path_factory)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """An empty analysis cache ($BIOVIS_CACHE) for one test."""
    monkeypatch.setenv("BIOVIS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
