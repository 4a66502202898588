"""Progress bars for long loops (rich), silent when disabled, on non-zero ranks, or with --quiet.

with progress_bar(total=len(loader), desc="epoch 3/20", enabled=not quiet) as bar:
    for batch in loader:
        ...
        bar.advance(loss=f"{loss:.3f}")
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_console = Console(stderr=True)


def is_main_process() -> bool:
    """Rank 0 (or not distributed): the only process that prints and writes."""
    return int(os.environ.get("RANK", "0")) == 0


class Bar:
    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: int = 1, **fields: object) -> None:
        if self._progress is not None and self._task is not None:
            info = "  ".join(f"{k} {v}" for k, v in fields.items())
            self._progress.update(self._task, advance=n, info=info)

    def set(self, **fields: object) -> None:
        self.advance(0, **fields)


@contextlib.contextmanager
def progress_bar(total: int | None, desc: str, enabled: bool = True) -> Iterator[Bar]:
    if not (enabled and is_main_process()):
        yield Bar(None, None)
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=_console,
        transient=False,
    )
    with progress:
        task = progress.add_task(desc, total=total, info="")
        yield Bar(progress, task)


def log(message: str, enabled: bool = True) -> None:
    """A summary line on stderr (rank 0 only)."""
    if enabled and is_main_process():
        _console.print(message, highlight=False, soft_wrap=True)
