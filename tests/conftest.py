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


def make_finished_run(folder: Path, command: str, weights: str) -> Path:
    """A finished run of `command` in `folder` holding one weights file (bytes that must survive)."""
    from core.rundir import mark_run, prepare_run_dir

    run = prepare_run_dir(folder, command)
    (run / weights).write_bytes(b"precious weights")
    mark_run(run, status="finished")
    return run


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


# ----------------------------------------------------------------------------
# Which commands the session ran. The fast tier (`-m "not slow"`) must still run every command once: a whole
# fast-tier session that leaves one out fails, naming it. Commands are recorded where the suite starts them:
# `main.main()` in this process, `python ... main.py ARGS` in a subprocess (torchrun included), and the
# Typer runner of the VisCoIN helpers (`record_command`). Worker processes (pytest-xdist) append to one file.

COMMAND_LOG = "BIOVIS_TEST_COMMAND_LOG"


def record_command(args) -> None:
    path = os.environ.get(COMMAND_LOG)
    if path:
        with open(path, "a", encoding="utf-8", errors="backslashreplace") as f:
            f.write("\t".join(str(a) for a in args).replace("\n", " ") + "\n")


def _recording_popen_init(original):
    def init(self, args, *rest, **kwargs):
        words = [str(a) for a in args] if isinstance(args, (list, tuple)) else []
        for i, word in enumerate(words):
            if word.endswith("main.py"):
                record_command(words[i + 1 :])
                break
        original(self, args, *rest, **kwargs)

    return init


def _recording_main(original):
    def main_():
        record_command(sys.argv[1:])
        return original()

    return main_


def command_paths() -> set[str]:
    """Every command of main.py, as the words that name it (`train gan`, `demo`)."""
    import typer

    import main

    def leaves(node, prefix: tuple[str, ...]) -> set[str]:
        if not hasattr(node, "commands"):
            return {" ".join(prefix)}
        found = {" ".join(prefix)} if getattr(node, "invoke_without_command", False) and prefix else set()
        for name, child in node.commands.items():
            found |= leaves(child, (*prefix, name))
        return found

    return leaves(typer.main.get_command(main.app), ())


def command_of(args: list[str], paths: set[str]) -> str | None:
    """The longest command path that `args` starts with."""
    words = [a for a in args if a]
    for n in range(len(words), 0, -1):
        if " ".join(words[:n]) in paths:
            return " ".join(words[:n])
    return None


def pytest_configure(config):
    # -n N: N workers share the cores, so each computes on one thread (and so do the commands it starts)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    # the controller (or a plain session) makes the command log; workers inherit it
    if not os.environ.get(COMMAND_LOG):
        import tempfile

        handle, path = tempfile.mkstemp(prefix="biovis-commands-", suffix=".tsv")
        os.close(handle)
        os.environ[COMMAND_LOG] = path
        config._biovis_command_log = path
    subprocess.Popen.__init__ = _recording_popen_init(subprocess.Popen.__init__)
    import main

    main.main = _recording_main(main.main)


def _fast_tier_of_everything(config) -> bool:
    selected_everything = not config.option.keyword and all(
        Path(a).resolve() == ROOT / "tests" for a in config.args
    )
    return config.option.markexpr.replace(" ", "") == "notslow" and selected_everything


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    path = getattr(config, "_biovis_command_log", None)
    if not path:
        return
    paths = command_paths()
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    Path(path).unlink(missing_ok=True)
    ran = {command_of(line.split("\t"), paths) for line in lines} - {None}
    missing = sorted(paths - ran)
    terminalreporter.write_line(
        f"commands run: {len(ran)} of {len(paths)}" + (f"; not run: {', '.join(missing)}" if missing else "")
    )
    if missing and _fast_tier_of_everything(config):
        terminalreporter.write_line("the fast tier must run every command once: mark a test of each as fast")
        terminalreporter._session.exitstatus = pytest.ExitCode.TESTS_FAILED
