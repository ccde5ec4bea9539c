"""Preemption and time limits: a signal asks a trainer to stop; it saves, marks the run and requeues itself.

SLURM sends SIGUSR1 to the batch script some time before the time limit (`--signal=B:USR1@120`, which the
script forwards to the job step) and SIGTERM when it preempts or cancels a job. `watch(run_dir)` installs
handlers for both that only set a flag; the trainer polls it between steps with `preempt.check(step, save)`:
a Python attribute read, no host sync (under DDP the ranks agree every `AGREE_EVERY` steps through one tiny
gloo all-reduce, so they all stop after the same step). When a stop is due, rank 0 writes the resume state
with `save()` (atomic, like every checkpoint), marks the run `preempted`, and asks SLURM to requeue the job
(`scontrol requeue`); the requeued job continues from the run directory with `--resume auto`. Outside SLURM
the process exits with `EXIT_PREEMPTED` and says how to resume.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import weakref
from collections.abc import Callable
from pathlib import Path

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"
AGREE_EVERY = 10  # steps between the ranks' agreement on stopping (DDP only)

_current: weakref.ref | None = None  # the live Watch; signals fall back to their old handling without one
_previous: dict[int, object] = {}


class Preempted(SystemExit):
    """Raised once the resume state is saved and the run marked: the process exits with EXIT_PREEMPTED."""

    def __init__(self) -> None:
        super().__init__(EXIT_PREEMPTED)


def _handle(signum: int, frame) -> None:
    watch = _current() if _current is not None else None
    if watch is None:  # no trainer listens (it returned): behave as if we had never been here
        previous = _previous.get(signum) or signal.SIG_DFL
        signal.signal(signum, previous)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signum)
        return
    if watch.signal is None:
        watch.signal = signal.Signals(signum).name


class Watch:
    """The stop flag of one training loop; see the module docstring."""

    def __init__(self, run_dir: Path, main: bool, world_size: int):
        self.run_dir, self.main, self.world_size = Path(run_dir), main, world_size
        self.signal: str | None = None
        self._group = None

    def requested(self, step: int) -> bool:
        if self.world_size == 1:
            return self.signal is not None
        if step % AGREE_EVERY:
            return False
        import torch
        import torch.distributed as dist

        if self._group is None:  # a CPU group beside nccl, so the flag never touches the GPU
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        flag = torch.tensor([int(self.signal is not None)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def check(self, step: int, save: Callable[[], object]) -> None:
        """Between two steps: when a stop is due, save (rank 0), mark the run, requeue, raise `Preempted`."""
        if self.requested(step):
            self.stop(step, save)

    def stop(self, step: int, save: Callable[[], object]) -> None:
        from core.distributed import barrier
        from core.rundir import mark_run

        reason = f"{self.signal or 'a signal to another rank'} at step {step}"
        if self.main:
            save()
            mark_run(self.run_dir, status="preempted", reason=reason)
        barrier()
        if self.main:
            print(f"preempted ({reason}): resume state saved in {self.run_dir}", file=sys.stderr, flush=True)
            requeue(self.run_dir)
        raise Preempted()


def watch(run_dir: str | os.PathLike) -> Watch:
    """Catch SIGUSR1 and SIGTERM for the training loop of `run_dir` (from now until the Watch is dropped)."""
    global _current
    from core.distributed import dist_env

    env = dist_env()
    current = Watch(Path(run_dir), env.is_main, env.world_size)
    _current = weakref.ref(current)
    for signum in SIGNALS:
        try:
            old = signal.signal(signum, _handle)
        except ValueError:  # not the main thread (an in-process caller): the loop runs without the handlers
            continue
        if old is not _handle:
            _previous[signum] = old
    return current


def slurm_job(environ: dict[str, str] | None = None) -> str | None:
    """This job's id for `scontrol`: `ARRAYJOB_TASK` for an array task (requeue that task, not the array)."""
    env = os.environ if environ is None else environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def resume_command(argv: list[str], run_dir: Path) -> str:
    """The command line that continues this run: the same one with --resume and its --out."""
    args = [a for a in argv[1:] if a != "--overwrite"]
    if "--resume" not in args and not any(a.startswith("--resume=") for a in args):
        args.append("--resume")
    if "--out" not in args and not any(a.startswith("--out=") for a in args):
        args += ["--out", str(run_dir)]
    return shlex.join(["python", "main.py", *args])


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def requeue(
    run_dir: Path, environ: dict[str, str] | None = None, say: Callable[[str], None] = _to_stderr
) -> bool:
    """Put this SLURM job back in the queue (it resumes from `run_dir`), telling the user through `say`.

    The message goes out before `scontrol` runs: a requeue that succeeds ends this job at once, so a line
    printed after it may never reach the log."""
    job = slurm_job(environ)
    by_hand = f"continue with: {resume_command(sys.argv, run_dir)}"
    if job is None:
        say(f"not under SLURM; {by_hand}")
        return False
    say(f"requeueing SLURM job {job}; it continues from {run_dir} (--resume auto)")
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        say(f"could not run `scontrol requeue {job}` ({err}); resubmit the job or {by_hand}")
        return False
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        say(f"`scontrol requeue {job}` failed ({why[-1] if why else done.returncode}); {by_hand}")
        return False
    return True
