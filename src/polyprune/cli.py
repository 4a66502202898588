"""The `polyprune` command line: parses arguments and calls library functions, nothing more.

A `PolypruneError` becomes one line on stderr and exit code 2; anything else is a bug and keeps its
traceback. Under torchrun only rank 0 prints.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from polyprune.errors import PolypruneError

app = typer.Typer(
    name="polyprune",
    help="Real-time polyp segmentation through Taylor filter pruning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars; summary lines only.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (for scripts).")]
Seed = Annotated[int, typer.Option(help="Random seed: the same seed gives the same result.")]
Threads = Annotated[int | None, typer.Option(help="torch threads (default: all cores).")]


def _echo_json(obj: object) -> None:
    import json

    from polyprune.io import _json_default

    typer.echo(json.dumps(obj, indent=2, default=_json_default))


# ------------------------------------------------------------------------------------------- synth
# (data helper)

# ------------------------------------------------------------------------------------------- train
# (train)

# ---------------------------------------------------------------------------------------- evaluate
# (metrics helper)

# ------------------------------------------------------------------------------------------- prune
# (pruning helper)

# ------------------------------------------------------------------------ export / benchmark / predict
# (deploy helper)

# --------------------------------------------------------------------------------- demo / report
# (report)


def main() -> None:
    """Console-script entry: user errors become one line and exit code 2."""
    try:
        app(standalone_mode=False)
    except PolypruneError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # click's own usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(2)
        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()

_ = Path  # kept for command signatures below
