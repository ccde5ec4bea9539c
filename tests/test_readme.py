"""The README's commands stay true: every `main.py` command in it parses (its sub-command and options exist,
its values have the right types), every benchmark it names exists with the options it uses, and the tour on
the synthetic world runs exactly as written."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest
import typer
from conftest import ROOT, run_main

TOUR = "### A tour on the synthetic world"


def bash_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(the heading above it, its command lines with continuations joined) for each ```bash block."""
    blocks, heading = [], ""
    for part in re.split(r"(^#+ [^\n]*$|^```bash\n.*?^```$)", text, flags=re.M | re.S):
        if part.startswith("#"):
            heading = part.strip()
        elif part.startswith("```bash"):
            body = part.removeprefix("```bash\n").removesuffix("```").replace("\\\n", " ")
            blocks.append((heading, [line.strip() for line in body.splitlines() if line.strip()]))
    return blocks


def main_args(line: str) -> list[str] | None:
    """The arguments after `main.py` in a command line (`python main.py ...`, `torchrun ... main.py ...`)."""
    words = shlex.split(line, comments=True)
    return words[words.index("main.py") + 1 :] if "main.py" in words else None


README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = bash_blocks(README)
COMMANDS = [args for _, lines in BLOCKS for line in lines if (args := main_args(line)) is not None]


def parse(args: list[str], monkeypatch):
    """Parse `args` as main.py would, without running anything; paths need not exist here."""
    import main

    def relax(command) -> None:
        for param in command.params:
            descriptor = getattr(param, "type_descriptor", None)  # typer >= 0.29; older typer: click types
            info = descriptor.parameter_info if descriptor is not None else getattr(param, "type", None)
            if getattr(info, "exists", False):
                monkeypatch.setattr(info, "exists", False)
        for sub in getattr(command, "commands", {}).values():
            relax(sub)

    command = typer.main.get_command(main.app)
    relax(command)
    ctx = command.make_context("main.py", list(args))
    while hasattr(command, "resolve_command"):
        rest = [*getattr(ctx, "_protected_args", getattr(ctx, "protected_args", [])), *ctx.args]
        if not rest and command.invoke_without_command:
            break
        name, command, rest = command.resolve_command(ctx, rest)
        ctx = command.make_context(name, rest, parent=ctx)
    return ctx


def test_the_readme_has_commands_and_a_tour():
    assert len(COMMANDS) > 40
    assert any(heading.startswith(TOUR) for heading, _ in BLOCKS)


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(a[:3]) for a in COMMANDS])
def test_every_readme_command_parses(args, monkeypatch):
    parse(args, monkeypatch)


def test_every_benchmark_the_readme_names_exists_with_its_options():
    scripts: dict[str, set[str]] = {}
    for line in (line for _, block in BLOCKS for line in block if line.startswith("python bench/")):
        words = shlex.split(line, comments=True)
        scripts.setdefault(words[1], set()).update(w for w in words[2:] if w.startswith("--"))
    assert scripts
    for script, options in scripts.items():
        done = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert not [o for o in options if o not in done.stdout], f"{script} lacks some of {options}"


@pytest.mark.slow  # trains a world's worth of models in a row; each of its commands also runs in a fast test
def test_the_tour_runs_as_written(small_world, tmp_path, capsys, monkeypatch):
    """Each line of the tour, in order, in a fresh working folder (in this process, to save start-ups)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BIOVIS_CACHE", str(tmp_path / "cache"))
    lines = next(lines for heading, lines in BLOCKS if heading.startswith(TOUR))
    for line in lines:
        result = run_main(tuple(main_args(line)), capsys, monkeypatch)
        assert result.returncode == 0, f"{line}\n{result.stderr[-2000:]}"
    assert (tmp_path / "runs" / "tour" / "retrieval" / "results.json").is_file()
    assert (tmp_path / "runs" / "tour" / "compare" / "run.yaml").is_file()
