"""Helpers for tests that drive the CLI: in-process `cli()` (the console script's code path without a
new interpreter per case), `real_cli()` in a subprocess, and the one-line-error assertions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

from polyprune.cli import main

N_PAIRS = 6  # pairs in the `data` fixture (conftest)


def cli(capsys, *args: object) -> tuple[int, str, str]:
    """`polyprune ARGS` through `polyprune.cli.main` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    with mock.patch.object(sys, "argv", ["polyprune", *map(str, args)]):
        try:
            main()
            rc = 0
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def real_cli(*args: object, cwd: Path | None = None, timeout: float = 300) -> tuple[int, str, str]:
    r = subprocess.run(
        [sys.executable, "-m", "polyprune", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )
    return r.returncode, r.stdout, r.stderr


def assert_error(result: tuple[int, str, str], *needles: object) -> str:
    """Exit code 2, exactly one stderr line `error: ...` containing every needle, no traceback."""
    rc, out, err = result
    assert "Traceback" not in out + err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, f"rc={rc}\nstdout={out}\nstderr={err}"
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert str(needle) in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def assert_ok(result: tuple[int, str, str]) -> str:
    rc, out, err = result
    assert rc == 0 and "Traceback" not in out + err, f"rc={rc}\nstdout={out}\nstderr={err}"
    return err


def train_args(data: Path, out: Path, *extra: object) -> list[object]:
    return [
        "train", "--data", data, "--out", out, "--size", 32, "--width", 4, "--epochs", 1,
        "--batch", 4, "--threads", 1, "--precision", "fp32", "-q", *extra,
    ]  # fmt: skip


def eval_args(data: Path, model: Path, *extra: object) -> list[object]:
    return ["evaluate", "--data", data, "--model", model, "--threads", 1, "-q", *extra]
