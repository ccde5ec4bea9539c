"""Shared CLI pieces: option types, help panels, run-directory choice, and the bundle of data, hardware and
output options that every training command shares (`training_command`). Nothing here imports torch."""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

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
TrainSeed = Annotated[
    int | None,
    typer.Option(help="Random seed (data split, initialisation, every step's draws).", rich_help_panel=OPTIM),
]
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
BatchSize = Annotated[int, typer.Option(help="Images per batch.", rich_help_panel=DATA)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.", rich_help_panel=OUTPUT)]
Checkpoint = Annotated[
    Path,
    typer.Option(
        "--checkpoint",
        "-c",
        exists=True,
        help="Checkpoint .safetensors or the training run folder.",
        rich_help_panel=MODEL,
    ),
]


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
    preset: str | None,
    overrides: dict,
    run_dir: Path,
    resume: bool,
    resumable: set[str],
    command: str | None = None,
):
    """The run's config: preset + overrides for a new run; the saved config.yaml for `--resume`, where only
    the `resumable` settings may change (anything else given differently is refused). A run that failed
    before it saved its config is resumed as a fresh start in the same folder."""
    from core.config import build, flat, nest, read_yaml
    from core.rundir import check_resumable

    if not resume:
        return cls.preset(preset, overrides)
    if command is not None and is_main_process():  # other ranks would see rank 0's own run record
        check_resumable(run_dir, command)
    saved_path = Path(run_dir) / "config.yaml"
    if not saved_path.is_file():
        if command is not None:
            return cls.preset(preset, overrides)
        raise UserError(f"--resume: {run_dir} holds no run to resume (no config.yaml)")
    saved = read_yaml(saved_path, {})
    if not isinstance(saved, dict):
        raise UserError(f"{saved_path} is not a mapping of settings")
    known = flat(build(cls, {}))  # every setting's flat name
    kept = {
        k: v for k, v in nest(cls, saved).items() if k in {f.name for f in cls.__dataclass_fields__.values()}
    }
    current = flat(build(cls, kept, source=str(saved_path)))  # config.yaml of any version, flat keys nested
    changed = sorted(
        k
        for k, v in overrides.items()
        if v is not None and k in known and k not in resumable and current[k] != v
    )
    if changed:
        raise UserError(f"--resume continues {run_dir} as configured; it cannot change {', '.join(changed)}")
    return build(cls, {**current, **{k: v for k, v in overrides.items() if k in resumable and v is not None}})


# ----------------------------------------------------------------------------
# The options every training command shares, declared once: data, hardware, bookkeeping and output.

# Settings that any resumed training may change (they change speed or logging, not the model).
ALWAYS_RESUMABLE = frozenset({"device", "num_workers", "amp", "log_every"})


ImageSize = Annotated[int | None, typer.Option(help="Image side in pixels.", rich_help_panel=DATA)]
ValFraction = Annotated[
    float | None, typer.Option(help="Share of train held out for validation.", rich_help_panel=DATA)
]
BboxCrop = Annotated[
    bool | None,
    typer.Option(
        "--bbox-crop/--no-bbox-crop", help="Crop images to their bounding box.", rich_help_panel=DATA
    ),
]
SkipBadImages = Annotated[
    bool | None,
    typer.Option("--skip-bad-images", help="Skip and count unreadable images.", rich_help_panel=DATA),
]

Classifier = Annotated[
    Path | None,
    typer.Option(
        exists=True, help="Classifier checkpoint (a train classifier run) that judges the samples.",
        rich_help_panel=OUTPUT,
    ),
]  # fmt: skip

# The data a trained model is evaluated on: a split, and another dataset than its own
Split = Annotated[str, typer.Option(help="test, val, train or trainval.", rich_help_panel=DATA)]
EvalDataset = Annotated[
    str | None,
    typer.Option(
        "--dataset", "-d", help="Dataset (default: the one it was trained on).", rich_help_panel=DATA
    ),
]
EVALUATION_OPTIONS: dict[str, tuple[Any, Any]] = {"dataset": (EvalDataset, None), "split": (Split, "test")}

REQUIRED = inspect.Parameter.empty  # the default of an option that has none


def reworded(option: Any, help: str) -> Any:
    """The option type `option` (an Annotated typer option) with another help text: the same option, worded
    for one command."""
    info = copy.copy(option.__metadata__[0])
    info.help = help
    return Annotated[option.__origin__, info]


# name -> (option type, default)
SHARED_OPTIONS: dict[str, tuple[Any, Any]] = {
    "dataset": (Dataset, "world"),
    "data_dir": (DataDir, None),
    "world": (WorldPreset, None),
    "image_size": (ImageSize, None),
    "val_fraction": (ValFraction, None),
    "bbox_crop": (BboxCrop, None),
    "skip_bad_images": (SkipBadImages, None),
    "seed": (TrainSeed, None),
    "log_every": (LogEvery, None),
    "device": (Device, "auto"),
    "amp": (Amp, True),
    "num_workers": (Workers, None),
    "out": (Out, None),
    "name": (Name, None),
    "overwrite": (Overwrite, False),
    "resume": (Resume, False),
    "quiet": (Quiet, False),
    "show": (Show, False),
    "batch_size": (BatchSize, 64),
    "checkpoint": (Checkpoint, REQUIRED),
    "classifier": (Classifier, None),
}
DATA_OPTIONS = ("dataset", "data_dir", "world", "image_size", "val_fraction", "bbox_crop", "skip_bad_images")
HARDWARE_OPTIONS = ("device", "amp", "num_workers")
RUN_OPTIONS = ("seed", "log_every")
OUTPUT_OPTIONS = ("out", "name", "overwrite", "resume", "quiet")


# The settings that several training commands share (each None: the preset's), in the layout of
# SHARED_OPTIONS; a command rewords one with `helps` where its meaning narrows there.
Preset = Annotated[
    str | None,
    typer.Option(help="Recipe from the command's file in training/presets/.", rich_help_panel=MODEL),
]
StepBatch = Annotated[int | None, typer.Option(help="Samples per optimiser step.", rich_help_panel=OPTIM)]
Steps = Annotated[int | None, typer.Option(help="Optimiser steps.", rich_help_panel=OPTIM)]
LearningRate = Annotated[float | None, typer.Option("--lr", help="Learning rate.", rich_help_panel=OPTIM)]
WeightDecay = Annotated[float | None, typer.Option(help="Weight decay.", rich_help_panel=OPTIM)]
InitWeights = Annotated[
    str | None, typer.Option(help="Initial weights: none, imagenet or a weights file.", rich_help_panel=MODEL)
]
EvalEvery = Annotated[
    int | None, typer.Option(help="Steps between evaluations and checkpoints.", rich_help_panel=OUTPUT)
]
Mirror = Annotated[
    bool | None, typer.Option("--mirror/--no-mirror", help="Random left-right flips.", rich_help_panel=DATA)
]
TRAINING_OPTIONS: dict[str, tuple[Any, Any]] = {
    "preset": (Preset, None),
    "mirror": (Mirror, None),
    "weights": (InitWeights, None),
    "batch_size": (StepBatch, None),
    "steps": (Steps, None),
    "lr": (LearningRate, None),
    "weight_decay": (WeightDecay, None),
    "eval_every": (EvalEvery, None),
    "compile": (Compile, None),
}


class Shared:
    """The annotation of a command's own parameter whose option is declared in an option table (SHARED_OPTIONS
    or with_options' `table`): with_options puts that declaration in its place (reworded by `helps`; the
    default: `defaults`, else the parameter's, else the table's)."""


@dataclass
class TrainOptions:
    """What the user gave of the shared options of a training command, and the flow every such command runs:
    config from preset + options (or the saved one to resume), cheap checks, run directory, trainer."""

    command: str  # "train gan"
    data: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # hardware and bookkeeping
    out: Path | None = None
    name: str | None = None
    overwrite: bool = False
    resume: bool = False
    quiet: bool = False
    datasets: tuple[str, ...] = ()  # dataset names the command reads besides the registry's (cvae: digits)

    @property
    def dataset(self) -> str:
        """The dataset asked for, under its canonical name (`toy` is `world`)."""
        from datasets.registry import canonical_name

        name = self.data.get("dataset") or "world"
        return name if name in self.datasets else canonical_name(name)

    @property
    def run_dir(self) -> Path:
        return run_dir_for(self.command.replace(" ", "-"), self.out, self.name)

    def overrides(self) -> dict[str, Any]:
        """The shared options as config overrides (flat names; None: the preset's)."""
        data = {**self.data, "dataset": self.dataset} if "dataset" in self.data else dict(self.data)
        return _plain_values({**data, **self.settings})

    def train(
        self,
        config: type,
        preset: str | None,
        settings: dict[str, Any],
        resumable: Iterable[str],
        trainer: Callable[..., dict],
        inputs: Callable[[Any], Iterable[Any]] | None = None,
        check: Callable[[Any], None] | None = None,
    ) -> tuple[Any, Path, dict | None]:
        """Resolve the config (`settings`: the command's own options), validate it and the data, run `check`,
        prepare the run directory (its inputs: the data folder and `inputs(cfg)`), train. Returns the config,
        the run directory and, on the main process, the trainer's summary."""
        from core.rundir import prepare_run_dir

        run_dir = self.run_dir
        cfg = resolve_config(config, preset, {**self.overrides(), **_plain_values(settings)}, run_dir,
                             self.resume, set(resumable) | ALWAYS_RESUMABLE, command=self.command)  # fmt: skip
        cfg.validate()
        data = getattr(cfg, "data", None)
        if data is not None and not isinstance(data, str) and data.dataset not in self.datasets:
            from datasets.registry import check_data_spec

            check_data_spec(data.spec(cfg.seed))
        if check is not None:
            check(cfg)
        if is_main_process():
            folder = getattr(data, "data_dir", None) or getattr(cfg, "data_dir", None)
            paths = [folder, *(inputs(cfg) if inputs is not None else [])]
            prepare_run_dir(run_dir, self.command, overwrite=self.overwrite, resume=self.resume, inputs=paths)
        summary = trainer(cfg, Path(run_dir), resume=self.resume, quiet=self.quiet)
        return cfg, Path(run_dir), summary if is_main_process() else None


def _plain_values(values: dict[str, Any]) -> dict[str, Any]:
    """Paths as strings (configs hold plain YAML values)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


def with_options(
    *names: str,
    first: tuple[str, ...] = (),
    helps: dict[str, str] | None = None,
    defaults: dict[str, Any] | None = None,
    table: dict[str, tuple[Any, Any]] | None = None,
    wrap: Callable[[SimpleNamespace], Any] = lambda options: options,
):
    """Give a command shared options, each declared once in SHARED_OPTIONS (or in `table`, the options a family
    of commands shares, same layout): `first` before the command's own options, `names` after them (`helps`
    rewords one for this command, `defaults` changes its default). The function declares only its own options
    after a first parameter, which receives the shared ones as one object: `wrap(SimpleNamespace(name=value))`;
    without `first` and `names` there is no such parameter. An own parameter annotated `Shared` is the table's
    option of its name, in its place."""
    helps, defaults, options = helps or {}, defaults or {}, {**SHARED_OPTIONS, **(table or {})}

    def parameter(name: str, default: Any = REQUIRED) -> inspect.Parameter:
        if name not in options:  # a mistake in a command's declaration: say which, at import
            raise TypeError(f"no shared option {name!r} in the option tables ({', '.join(options)})")
        annotation, table_default = options[name]
        if name in helps:  # the same option, reworded for this command
            annotation = reworded(annotation, helps[name])
        default = defaults.get(name, table_default if default is REQUIRED else default)
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)

    def decorate(func: Callable) -> Callable:
        bundled = bool(first or names)  # whether the first parameter receives the shared options
        own = list(inspect.signature(func, eval_str=True).parameters.values())[bundled:]
        own = [parameter(p.name, p.default) if p.annotation is Shared else p for p in own]
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]  # any order of defaults: keywords
        params = [*(parameter(n) for n in first), *own, *(parameter(n) for n in names)]

        def run(**kwargs: Any) -> Any:
            if not bundled:
                return func(**kwargs)
            shared = SimpleNamespace(**{n: kwargs.pop(n) for n in (*first, *names)})
            return func(wrap(shared), **kwargs)

        run.__signature__ = inspect.Signature(params)
        run.__annotations__ = {p.name: p.annotation for p in params}
        run.__name__, run.__qualname__, run.__doc__ = func.__name__, func.__qualname__, func.__doc__
        run.__module__ = func.__module__
        return run

    return decorate


def training_command(
    command: str,
    data: tuple[str, ...] = DATA_OPTIONS,
    helps: dict[str, str] | None = None,
    datasets: tuple[str, ...] = (),
    table: dict[str, tuple[Any, Any]] | None = None,
):
    """Give a training command the shared options: `data` (a subset of DATA_OPTIONS) first, then the
    bookkeeping, hardware and output options; its first parameter receives them as `TrainOptions`. Its own
    parameters annotated `Shared` are the settings of TRAINING_OPTIONS or of its family's `table` (`helps`
    rewords any of them)."""

    def wrap(shared: SimpleNamespace) -> TrainOptions:
        values = vars(shared)
        return TrainOptions(
            command,
            data={n: values[n] for n in data},
            settings={n: values[n] for n in (*RUN_OPTIONS, *HARDWARE_OPTIONS)},
            **{n: values[n] for n in OUTPUT_OPTIONS},
            datasets=datasets,
        )

    return with_options(*RUN_OPTIONS, *HARDWARE_OPTIONS, *OUTPUT_OPTIONS, first=data, helps=helps,
                        table={**TRAINING_OPTIONS, **(table or {})}, wrap=wrap)  # fmt: skip


def results_dir(command: str, options: SimpleNamespace, inputs: Iterable[Any], config: dict) -> Path:
    """The run directory of a command that makes results and cannot resume (`--out`, else runs/<command>/
    <name>): prepared without clobbering anything (core.rundir), `config` saved as its config.yaml. The
    command marks it finished when its results are written."""
    import yaml

    from core.atomic import write_text
    from core.rundir import prepare_run_dir

    folder = run_dir_for(command.replace(" ", "-"), options.out, options.name)
    run_dir = Path(
        prepare_run_dir(folder, command, overwrite=options.overwrite, inputs=inputs, resumable=False)
    )
    write_text(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    return run_dir


def check_classifier_checkpoint(path: str | None, option: str) -> None:
    """A classifier run or checkpoint given to a training command, checked before its run directory is
    touched."""
    from core.checkpoint import read_meta

    if path:
        clf = Path(path)
        if read_meta(clf / "best.safetensors" if clf.is_dir() else clf).get("kind") != "classifier":
            raise UserError(f"{option} {clf} is not a classifier checkpoint")
