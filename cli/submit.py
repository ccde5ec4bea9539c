"""`submit`: run any main.py command as a SLURM batch job that survives preemption and time limits."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from cli.common import command_params, run_dir_of, split_auto_resume
from core.errors import UserError

SLURM = "SLURM"
ROOT = Path(__file__).resolve().parent.parent


def _find_command(ctx: typer.Context, command: list[str]):
    """(command words, click command, its arguments) of a main.py command line."""
    node, words = ctx.find_root().command, []
    args = list(command)
    while hasattr(node, "get_command") and args and not args[0].startswith("-"):
        sub = node.get_command(ctx, args[0])
        if sub is None:
            break
        node, words = sub, [*words, args.pop(0)]
    if not words or hasattr(node, "get_command"):
        raise UserError(
            f"`{' '.join(command)}` is not a main.py command; give one after --, e.g. -- train gan --dataset cub"
        )
    if words[0] == "submit":
        raise UserError("submit cannot submit itself")
    return words, node, args


def _without(args: list[str], options: set[str], flags: set[str]) -> list[str]:
    """`args` less the given options (with their values) and flags."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif arg not in flags and arg.split("=", 1)[0] not in options:
            kept.append(arg)
    return kept


def submit(
    ctx: typer.Context,
    command: Annotated[
        list[str],
        typer.Argument(help="The main.py command to run, after --, e.g. -- train gan --dataset cub."),
    ],
    gpus: Annotated[
        int, typer.Option(help="GPUs per node (one task each); 0 for a CPU job.", rich_help_panel=SLURM)
    ] = 1,
    nodes: Annotated[int, typer.Option(help="Nodes.", rich_help_panel=SLURM)] = 1,
    cpus: Annotated[int | None, typer.Option(help="CPUs per task (per GPU).", rich_help_panel=SLURM)] = None,
    mem: Annotated[str | None, typer.Option(help="Memory per node, e.g. 64G.", rich_help_panel=SLURM)] = None,
    time: Annotated[
        str | None, typer.Option(help="Time limit, e.g. 12:00:00 or 2-00:00:00.", rich_help_panel=SLURM)
    ] = None,
    partition: Annotated[str | None, typer.Option(help="Partition.", rich_help_panel=SLURM)] = None,
    account: Annotated[str | None, typer.Option(help="Account to charge.", rich_help_panel=SLURM)] = None,
    qos: Annotated[str | None, typer.Option(help="Quality of service.", rich_help_panel=SLURM)] = None,
    job_name: Annotated[
        str | None, typer.Option(help="Job name (default: command and run name).", rich_help_panel=SLURM)
    ] = None,
    array: Annotated[
        str | None,
        typer.Option(
            help="Array indices, e.g. 0-3 or 0-15%4: one run directory per task (RUN/task-N); `{task}` in "
            "the command stands for the task id (e.g. --seed {task}).",
            rich_help_panel=SLURM,
        ),
    ] = None,
    signal: Annotated[
        str,
        typer.Option(
            help="Signal SLURM sends before the time limit, [SIG@]SECONDS (USR1 or TERM); the training then "
            "saves, marks its run preempted and requeues the job.",
            rich_help_panel=SLURM,
        ),
    ] = "USR1@120",
    sbatch: Annotated[
        list[str] | None,
        typer.Option(
            "--sbatch", help="More sbatch options, e.g. --sbatch=--constraint=a100.", rich_help_panel=SLURM
        ),
    ] = None,
    python: Annotated[
        str | None, typer.Option(help="Python of the job (default: this one).", rich_help_panel=SLURM)
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Write and print the script; do not submit it.")] = False,
) -> None:
    """Write an sbatch script for a main.py command into its run directory (RUN/slurm/) and submit it.

    Examples: `python main.py submit --gpus 4 --time 24:00:00 -- train gan --dataset cub --name cub256`;
    `python main.py submit --array 0-3 -- train classifier --seed {task} --name seeds`. The job requeues
    itself on preemption or before its time limit and continues from its run directory (--resume auto).
    """
    from core.atomic import write_text
    from core.rundir import JOB_FOLDER, default_run_dir, read_run_info, run_state
    from core.slurm import SlurmJob, log_pattern, render
    from core.slurm import submit as sbatch_submit

    words, cmd, args = _find_command(ctx, command)
    args = split_auto_resume(args)[0]
    params = command_params(cmd, [re.sub(r"\{(job|task)\}", "0", a) for a in args], strict=True)
    names, key = {p.name for p in cmd.params}, "-".join(words)
    resumable = "resume" in names
    if resumable and params.get("overwrite"):
        raise UserError(
            "a requeued job with --overwrite would wipe its own progress; delete the old run or choose another --out"
        )
    run_dir = run_dir_of(" ".join(words), params) if "name" in names else None
    if run_dir is not None:
        args = _without(args, {"--out", "--name"}, {"--resume"})
        job_dir = run_dir / JOB_FOLDER
        held = run_state(read_run_info(run_dir)) if resumable else None
        if held:
            typer.echo(f"note: {run_dir} holds a {held} run; the job continues it", err=True)
    elif params.get("out") is not None:
        job_dir = Path(params["out"]).parent / JOB_FOLDER
    else:
        job_dir = default_run_dir(key, JOB_FOLDER)
    name = job_name or re.sub(r"[^A-Za-z0-9_.\-]", "_", f"{key}-{run_dir.name}" if run_dir else key)
    script = job_dir / f"{name}.sbatch"
    job = SlurmJob(
        command=[*words, *args], run_dir=str(run_dir) if run_dir else None, job_name=name,
        description=f"biovis: {' '.join(words)}, written by `python main.py submit`.\n"
        f"Edit it if you like, and run it again with: sbatch {script}",
        nodes=nodes, gpus=gpus, cpus=cpus, mem=mem, time=time, partition=partition, account=account, qos=qos,
        array=array, signal=signal, resumable=resumable,
        output=log_pattern(str(job_dir.resolve()), "%x-%A_%a.out" if array else "%x-%j.out"),
        python=python or sys.executable, main=str(ROOT / "main.py"), workdir=os.getcwd(),
        restart_overwrite=not resumable and "overwrite" in names and not params.get("overwrite"),
        extra=list(sbatch or []),
    )  # fmt: skip
    text = render(job)
    try:
        job_dir.mkdir(parents=True, exist_ok=True)  # SLURM does not create the folder of its log
        write_text(script, text)
    except OSError as err:
        raise UserError(
            f"cannot write the job script {script}: {err.strerror}; choose another --out"
        ) from None
    if dry_run:
        typer.echo(text)
        typer.echo(f"# written to {script}; not submitted (--dry-run)")
        return
    job_id = sbatch_submit(str(script))
    typer.echo(f"submitted job {job_id}")
    log = job_dir / (f"{name}-{job_id}_*.out" if array else f"{name}-{job_id}.out")
    typer.echo(f"script: {script}\nlog: {log}" + (f"\nrun: {run_dir}" if run_dir else ""))
