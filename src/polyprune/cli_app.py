"""What every `polyprune` command shares: the typer app, common options, JSON and summary output."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Annotated

import typer

app = typer.Typer(
    name="polyprune",
    help="Real-time polyp segmentation through Taylor filter pruning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars; summary lines only.")]
JsonOut = Annotated[
    str | None,
    typer.Option("--json", metavar="OUT", help="Write the result as JSON to OUT ('-': stdout, for scripts)."),
]
Seed = Annotated[int, typer.Option(help="Random seed: the same seed gives the same result.")]
Overwrite = Annotated[
    bool, typer.Option(help="Clear a non-empty run folder first (without it, such a folder is refused).")
]
Threads = Annotated[int | None, typer.Option(help="torch threads (default: all cores).")]
TeacherTta = Annotated[
    str, typer.Option(help="The distillation teacher's test-time augmentation: none | hflip | flips | d4.")
]
Tta = Annotated[
    str,
    typer.Option(
        "--tta",
        help="Test-time augmentation: none | hflip | flips | d4 (logits averaged over 1 / 2 / 4 / 8 flipped "
        "or turned views; each view is one more forward pass).",
    ),
]


def echo_json(obj: object) -> None:
    from polyprune.errors import OutputError
    from polyprune.files import json_text
    from polyprune.progress import is_main_process

    if not is_main_process():  # under torchrun one JSON document, from rank 0
        return
    try:
        sys.stdout.write(json_text(obj) + "\n")
        sys.stdout.flush()
    except OSError as exc:  # a full disk or a closed pipe behind stdout: one line, not a traceback
        with contextlib.suppress(OSError):  # nothing more may reach that stdout at exit either
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        raise OutputError(f"cannot write the JSON result to stdout: {exc.strerror or exc}") from exc


def emit_json(obj: object, target: str | None) -> None:
    """`--json OUT`: '-' prints on stdout, anything else is a file (written atomically, rank 0)."""
    from polyprune.files import write_json
    from polyprune.progress import is_main_process

    if target == "-":
        echo_json(obj)
    elif target and is_main_process():
        write_json(target, obj)


def log_summary(line: str) -> None:
    from polyprune.progress import log

    log(line)


def _parse_list(option: str, text: str | None, kind: type, what: str, example: str) -> list:
    """'a,b,c' -> [kind(a), kind(b), kind(c)]; None / '' -> []; anything else one ConfigError naming the option."""
    from polyprune.errors import ConfigError

    try:
        return [kind(v) for v in (text or "").split(",") if v.strip()]
    except ValueError:
        raise ConfigError(
            f"{option} takes {what} separated by commas, e.g. {example}; got {text!r}"
        ) from None


def parse_ints(option: str, text: str | None) -> list[int]:
    """'32,64,128,192' -> [32, 64, 128, 192]."""
    return _parse_list(option, text, int, "whole numbers", "32,64,128,192")


def parse_floats(option: str, text: str | None) -> list[float]:
    """'0.75,1,1.25' -> [0.75, 1.0, 1.25]."""
    return _parse_list(option, text, float, "numbers", "0.75,1,1.25")
