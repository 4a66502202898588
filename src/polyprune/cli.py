"""The `polyprune` command line: parses arguments and calls library functions, nothing more.

A `PolypruneError` becomes one line on stderr and exit code 2; anything else is a bug and keeps its
traceback. Under torchrun only rank 0 prints.
"""

from __future__ import annotations

import sys

import typer

from polyprune import cli_deploy, cli_prune, cli_train  # noqa: F401  (they register the commands)
from polyprune.cli_app import app
from polyprune.errors import PolypruneError

__all__ = ["app", "main"]

# --help lists the commands in the order of the work: data, train, evaluate, prune, deploy
COMMAND_ORDER = ("synth", "train", "evaluate", "prune", "export", "benchmark", "predict", "demo", "report")
app.registered_commands.sort(key=lambda c: COMMAND_ORDER.index(c.name or c.callback.__name__))


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Library warnings (e.g. --skip-bad's list of skipped files) as one `warning: ...` line each."""
    typer.echo(f"warning: {_one_line(str(message))}", err=True)


def main() -> None:
    """Console-script entry: user errors become one line and exit code 2."""
    import warnings

    previous, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        _main()
    finally:
        warnings.showwarning = previous


RESUMABLE = ("train", "prune")


def _command_name() -> str:
    """The subcommand on the command line (the first word that is not an option), or ""."""
    return next((a for a in sys.argv[1:] if not a.startswith("-")), "")


def _interrupted() -> None:
    """Ctrl-C: one line and exit 130 (typer's standalone_mode=False returns it as a plain 130)."""
    command = _command_name()
    hint = (
        " (its last finished epoch or step is kept: continue with --resume)" if command in RESUMABLE else ""
    )
    typer.echo(f"interrupted: polyprune {command} stopped by Ctrl-C{hint}".replace("  ", " "), err=True)
    sys.exit(130)


def _main() -> None:
    try:
        rv = app(standalone_mode=False)
    except PolypruneError as exc:
        typer.echo(f"error: {_one_line(str(exc))}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except MemoryError:
        typer.echo("error: out of memory: lower --size, --batch or the model's width", err=True)
        sys.exit(2)
    except Exception as exc:  # click's own usage errors (typer 0.29 vendors click as typer._click)
        usage, exit_, abort = _click_exception_types()
        if isinstance(exc, usage):  # one line like every other bad input, with where to look
            command = _command_name()
            known = command in {c.name or c.callback.__name__ for c in app.registered_commands}
            hint = f" (see polyprune {command} --help)" if known else " (see polyprune --help)"
            typer.echo(f"error: {_one_line(exc.format_message())}{hint}", err=True)
            sys.exit(2)
        if isinstance(exc, exit_):
            sys.exit(exc.exit_code)
        if isinstance(exc, abort):
            sys.exit(1)
        if isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc):  # torch's CPU allocator
            typer.echo(
                f"error: out of memory ({_one_line(str(exc))[:160]}): lower --size or --batch", err=True
            )
            sys.exit(2)
        raise
    if rv == 130:  # typer turns KeyboardInterrupt into Exit(130), returned in this mode
        _interrupted()
    if isinstance(rv, int) and not isinstance(rv, bool) and rv:
        sys.exit(rv)


def _click_exception_types() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(usage errors, Exit, Abort) of click and of typer's vendored copy, whichever are installed
    (typer 0.29 keeps Exit/Abort in typer.exceptions, not in typer._click.exceptions)."""
    import importlib

    found: tuple[list[type], list[type], list[type]] = ([], [], [])
    for name in ("click.exceptions", "typer._click.exceptions", "typer.exceptions"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        for kinds, attr in zip(found, ("ClickException", "Exit", "Abort"), strict=True):
            cls = getattr(mod, attr, None)
            if isinstance(cls, type):
                kinds.append(cls)
    return tuple(found[0]), tuple(found[1]), tuple(found[2])


if __name__ == "__main__":
    main()
