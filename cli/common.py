"""Shared CLI pieces: option types, help panels, run-directory choice. Nothing here imports torch."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from core.errors import UserError

CONTEXT = {"help_option_names": ["-h", "--help"]}

DATA = "Data"
MODEL = "Model"
OPTIM = "Optimisation"
HARDWARE = "Hardware"
OUTPUT = "Output"

Dataset = Annotated[
    str, typer.Option("--dataset", "-d", help="world (alias toy), cub or folder.", rich_help_panel=DATA)
]
DataDir = Annotated[
    Path | None,
    typer.Option(
        help="Existing dataset copy (CUB folder, class-folder root), or where the world is generated.",
        rich_help_panel=DATA,
    ),
]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.", rich_help_panel=HARDWARE)]
Workers = Annotated[
    int | None,
    typer.Option(
        help="DataLoader workers (default: 0 on CPU, one per usable core on CUDA).", rich_help_panel=HARDWARE
    ),
]
Compile = Annotated[
    bool | None,
    typer.Option(
        "--compile/--no-compile",
        help="torch.compile the networks (opt-in: try it on your GPU with the bench first).",
        rich_help_panel=HARDWARE,
    ),
]
TrainSeed = Annotated[int | None, typer.Option(help="Random seed.", rich_help_panel=OPTIM)]
LogEvery = Annotated[int | None, typer.Option(help="Steps between log lines.", rich_help_panel=OUTPUT)]
Amp = Annotated[bool, typer.Option("--amp/--no-amp", help="bf16 autocast on CUDA.", rich_help_panel=HARDWARE)]
Out = Annotated[
    Path | None, typer.Option(help="Run directory (default runs/<command>/<name>).", rich_help_panel=OUTPUT)
]
Name = Annotated[
    str | None,
    typer.Option(help="Run name under runs/<command>/ (default: a timestamp).", rich_help_panel=OUTPUT),
]
Overwrite = Annotated[
    bool, typer.Option(help="Replace a run already in the output directory.", rich_help_panel=OUTPUT)
]
Resume = Annotated[
    bool,
    typer.Option(
        help="Continue the run in --out from its last checkpoint (also a failed or killed one). "
        "`--resume auto`: continue if --out holds a run, start otherwise (what SLURM jobs use).",
        rich_help_panel=OUTPUT,
    ),
]
WorldPreset = Annotated[
    str | None, typer.Option(help="Synthetic world preset: default, small or bioscan.", rich_help_panel=DATA)
]
Show = Annotated[bool, typer.Option(help="Also open the figures in a window.", rich_help_panel=OUTPUT)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.", rich_help_panel=OUTPUT)]


def run_dir_for(command: str, out: Path | None, name: str | None) -> Path:
    """`--out`, else runs/<command>/<name>; without a name, one shared by all ranks of a job."""
    from core.rundir import default_run_dir

    if out is not None:
        return out
    if name is None:
        job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID")
        if job and os.environ.get("WORLD_SIZE", "1") != "1":
            name = f"job-{job}"
    return default_run_dir(command, name)


def run_dir_of(command: str, params: dict) -> Path:
    """The run directory that `command` (e.g. "train gan") with these options uses, as `run_dir_for` does."""
    return run_dir_for(command.replace(" ", "-"), params.get("out"), params.get("name"))


def command_params(cmd, args: list[str], strict: bool = False) -> dict:
    """The option values that the click command `cmd` would get from `args` (parsed only; nothing runs).
    `strict`: a mistake in `args` is a UserError, as the command itself would report it."""
    try:
        return cmd.make_context(cmd.name, list(args), resilient_parsing=not strict).params
    except Exception as err:  # click's usage errors
        message = err.format_message() if hasattr(err, "format_message") else str(err)
        raise UserError(f"`{cmd.name}` {message}") from None


def split_auto_resume(args: list[str]) -> tuple[list[str], bool]:
    """(`args` without `--resume auto` / `--resume=auto`, whether it was there)."""
    rest, auto, i = [], False, 0
    while i < len(args):
        if args[i] == "--resume=auto" or args[i : i + 2] == ["--resume", "auto"]:
            auto, i = True, i + (1 if "=" in args[i] else 2)
            continue
        rest.append(args[i])
        i += 1
    return rest, auto


def resolve_auto_resume(command: str, cmd, args: list[str]) -> list[str]:
    """`args` with `--resume auto` turned into `--resume` when the run directory holds a run to continue
    (core.rundir.auto_resume), and dropped otherwise."""
    from core.distributed import dist_env
    from core.rundir import auto_resume

    rest, auto = split_auto_resume(args)
    if not auto:
        return args
    params = command_params(cmd, rest)
    if params.get("overwrite"):
        raise UserError(
            "--overwrite and --resume auto exclude each other: a requeued job would wipe its own progress"
        )
    if params.get("resume"):
        return rest
    return [*rest, "--resume"] if auto_resume(run_dir_of(command, params), dist_env().is_main) else rest


class AutoResumeGroup(TyperGroup):
    """A command group whose commands understand `--resume auto` besides the plain `--resume` flag."""

    def resolve_command(self, ctx, args):
        name, cmd, rest = super().resolve_command(ctx, args)
        if cmd is not None:
            rest = resolve_auto_resume(f"{ctx.info_name} {name}", cmd, rest)
        return name, cmd, rest


def is_main_process() -> bool:
    from core.distributed import dist_env

    return dist_env().is_main


def check_choice(value: str, choices: tuple[str, ...], option: str) -> str:
    if value not in choices:
        raise UserError(f"{option} must be one of {', '.join(choices)}, got {value!r}")
    return value


def resolve_config(
    cls,
    presets,
    preset: str,
    overrides: dict,
    run_dir: Path,
    resume: bool,
    resumable: set[str],
    command: str | None = None,
):
    """The run's config: preset + overrides for a new run; the saved config.yaml for `--resume`, where only
    the `resumable` settings may change (anything else given differently is refused). A run that failed
    before it saved its config is resumed as a fresh start in the same folder."""
    from core.config import build, from_preset, read_yaml
    from core.rundir import check_resumable

    if not resume:
        return from_preset(cls, presets, preset, overrides)
    if command is not None and is_main_process():  # other ranks would see rank 0's own run record
        check_resumable(run_dir, command)
    saved_path = Path(run_dir) / "config.yaml"
    if not saved_path.is_file():
        if command is not None:
            return from_preset(cls, presets, preset, overrides)
        raise UserError(f"--resume: {run_dir} holds no run to resume (no config.yaml)")
    saved = read_yaml(saved_path, {})
    if not isinstance(saved, dict):
        raise UserError(f"{saved_path} is not a mapping of settings")
    changed = sorted(
        k for k, v in overrides.items() if v is not None and k not in resumable and saved.get(k) != v
    )
    if changed:
        raise UserError(f"--resume continues {run_dir} as configured; it cannot change {', '.join(changed)}")
    kept = {k: v for k, v in saved.items() if k in {f.name for f in cls.__dataclass_fields__.values()}}
    return build(cls, {**kept, **{k: v for k, v in overrides.items() if k in resumable and v is not None}})
