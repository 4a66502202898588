"""Progress bars for long loops (rich), silent when disabled, on non-zero ranks, or with --quiet.

with progress_bar(total=len(loader), desc="epoch 3/20", enabled=not quiet) as bar:
    for batch in loader:
        ...
        bar.advance(loss=f"{loss:.3f}")
"""

from __future__ import annotations

import contextlib
import os
import time
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


class StageTimer:
    """Wall and process-CPU seconds per named stage (wall time on a shared machine misleads), and one
    summary line per stage, logged as it ends."""

    def __init__(self, echo: bool) -> None:
        self.echo, self.lines = echo, []
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self.t_all = self.t = time.perf_counter()
        self.c_all = self.c = time.process_time()

    def done(self, stage: str, line: str) -> None:
        now, cnow = time.perf_counter(), time.process_time()
        self.seconds[stage], self.cpu_seconds[stage] = round(now - self.t, 2), round(cnow - self.c, 2)
        self.t, self.c = now, cnow
        self.lines.append(f"{stage}: {line} ({self.seconds[stage]:.0f} s)")
        log(self.lines[-1], enabled=self.echo)

    def finish(self) -> float:
        """Close the timing: total minutes."""
        total = time.perf_counter() - self.t_all
        self.seconds["total"] = round(total, 2)
        self.cpu_seconds["total"] = round(time.process_time() - self.c_all, 2)
        return total / 60

    def final(self, line: str) -> None:
        self.lines.append(line)
        log(line, enabled=self.echo)
