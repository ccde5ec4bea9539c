"""Command-line entry point: `python main.py <command>`. Registers the commands of cli/; nothing else.

Importing this module must stay cheap (no torch): every command imports its heavy modules inside.
"""

from __future__ import annotations

import sys

import typer

from cli import (
    amplify,
    concepts,
    demo,
    explore,
    gan,
    generate,
    logs,
    prefetch,
    retrieve,
    test,
    train,
    vdna,
    viscoin,
)
from cli.common import CONTEXT
from cli.cvae import compare_runs_command
from cli.submit import submit
from core.errors import UserError

app = typer.Typer(
    help="Interpretable, biodiversity-minded computer vision: classifiers, VisCoIN, Visual DNA, retrieval, generation.",
    no_args_is_help=True,
    context_settings=CONTEXT,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)
app.add_typer(train.app, name="train")
app.add_typer(test.app, name="test")
app.command("logs")(logs.logs)
app.add_typer(prefetch.app, name="prefetch")
app.command("demo")(demo.demo)
app.command("import-gan")(gan.import_gan)
app.add_typer(generate.app, name="generate")
app.command("compare-runs")(compare_runs_command)
app.command("to-pickle")(viscoin.to_pickle)
app.add_typer(concepts.app, name="concepts")
app.command("amplify")(amplify.amplify)
app.add_typer(vdna.app, name="vdna")
app.add_typer(retrieve.app, name="retrieve")
app.command("submit")(submit)
app.command("explore")(explore.explore)


def one_line(error: UserError) -> str:
    """The message of a UserError, also when a DataLoader worker re-raised it with its traceback inside."""
    message = error.message.strip()
    if "Traceback" in message:
        last = message.splitlines()[-1]
        message = last.split(": ", 1)[1] if ": " in last and "Error" in last.split(": ", 1)[0] else last
    return message


def environment_error(error: OSError) -> UserError | None:
    """A file-system refusal (permission, read-only or full disk) as a one-line UserError; None otherwise."""
    import errno

    where = error.filename or "a file"
    if isinstance(error, PermissionError):
        return UserError(
            f"permission denied on {where}: choose a folder you can write to (--out, $BIOVIS_CACHE)"
        )
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(
            f"cannot write {where}: {error.strerror}; free some space or choose another --out "
            "(the file there before, if any, is unchanged)"
        )
    if error.errno == errno.EROFS:
        return UserError(f"cannot write {where}: {error.strerror}; choose a writable --out")
    return None


def abandon_runs(reason: str) -> str:
    """Put back or mark the runs this command left unfinished; a short suffix for the error line."""
    if "core.rundir" not in sys.modules:
        return ""
    notes = sys.modules["core.rundir"].abandon_active_runs(reason)
    return f" [{'; '.join(notes)}]" if notes else ""


def has_option(option: str, argv: list[str] | None = None) -> bool:
    """Whether the command that `argv` (default: this process's) runs takes `option`."""
    node, words = typer.main.get_command(app), list(sys.argv[1:] if argv is None else argv)
    while hasattr(node, "commands") and words:  # a group (typer may vendor its own click)
        node = node.commands.get(words.pop(0))
    return node is not None and any(option in getattr(p, "opts", ()) for p in node.params)


def advice(error: UserError) -> str:
    """What to add to an error's line: the skip option of a bad file, where this command has it."""
    option = getattr(error, "skip_option", None)
    return f", or pass {option}" if option and has_option(option) else ""


def fail(error: UserError) -> None:
    message = one_line(error) + advice(error)
    typer.secho(f"error: {message}{abandon_runs(message)}", err=True, fg="red")
    sys.exit(error.exit_code)


def run_app() -> None:
    """The app with click's usage errors (unknown option, a path that does not exist, a bad number) in one
    line with exit code 2, like every other bad input, instead of click's multi-line usage box."""
    try:
        code = app(standalone_mode=False)
    except Exception as error:  # typer >= 0.29 raises its vendored click's exceptions, older typer click's
        kind = {cls.__name__ for cls in type(error).__mro__}
        if "NoArgsIsHelpError" in kind:  # the help was printed already
            sys.exit(error.exit_code)
        if "Abort" in kind:
            raise KeyboardInterrupt from None
        if "ClickException" not in kind:
            raise
        ctx = getattr(error, "ctx", None)
        where = f" (see `{ctx.command_path} -h`)" if ctx is not None else ""
        raise UserError(f"{error.format_message()}{where}") from None
    close_process_group()
    sys.exit(code if isinstance(code, int) else 0)


def close_process_group() -> None:
    """Destroy the process group a command under torchrun or srun started, once the command is done: left to
    the interpreter's exit, gloo's threads now and then abort a rank ('terminate called without an active
    exception'), failing a run that finished. Nothing to do (and no torch import) for a single process."""
    if "torch.distributed" in sys.modules:
        from core.distributed import shutdown_distributed

        shutdown_distributed()


def main() -> None:
    try:
        run_app()
    except UserError as error:
        fail(error)
    except OSError as error:
        user_error = environment_error(error)
        if user_error is not None:
            fail(user_error)
        note = abandon_runs(f"{type(error).__name__}: {error}").strip()
        if note:
            typer.secho(note, err=True)
        raise
    except BaseException as error:  # a bug, Ctrl-C or SystemExit: keep the traceback, record the state
        if not (isinstance(error, SystemExit) and error.code in (0, None)):
            reason = (f"{type(error).__name__}: {error}".strip().splitlines() or ["interrupted"])[0]
            note = abandon_runs(reason).strip()
            if note:
                typer.secho(note, err=True)
        raise


if __name__ == "__main__":
    main()
