"""Progress bars for long loops (rich), silent when disabled, on non-zero ranks, or with --quiet.
Where stderr is no terminal (a log file), a plain line every 30 s (POLYPRUNE_PROGRESS_INTERVAL) instead.

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
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_console = Console(stderr=True)
LINE_INTERVAL_S = float(os.environ.get("POLYPRUNE_PROGRESS_INTERVAL", "30"))  # non-terminal stderr only


def is_main_process() -> bool:
    """Rank 0 (or not distributed): the only process that prints and writes."""
    return int(os.environ.get("RANK", "0")) == 0


class Bar:
    """What a loop reports to; this base reports nowhere (disabled, --quiet, ranks other than 0)."""

    def advance(self, n: int = 1, **fields: object) -> None:
        pass

    def set(self, **fields: object) -> None:
        self.advance(0, **fields)

    def close(self) -> None:
        pass


class _RichBar(Bar):
    def __init__(self, progress: Progress, task: TaskID) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: int = 1, **fields: object) -> None:
        info = "  ".join(f"{k} {v}" for k, v in fields.items())
        self._progress.update(self._task, advance=n, info=info)


class _LineBar(Bar):
    """For stderr that is no terminal (a `nohup ... > log` run, CI): rich draws nothing there until the
    loop ends, which leaves a long epoch silent; print one plain line every LINE_INTERVAL_S seconds
    instead, and one at the end."""

    def __init__(self, total: int | None, desc: str) -> None:
        self.total, self.desc, self.done, self.info = total, desc, 0, ""
        self.t0 = self.last = time.monotonic()

    def advance(self, n: int = 1, **fields: object) -> None:
        self.done += n
        if fields:
            self.info = "  ".join(f"{k} {v}" for k, v in fields.items())
        now = time.monotonic()
        if now - self.last >= LINE_INTERVAL_S:
            self.last = now
            self._print(now)

    def close(self) -> None:
        self._print(time.monotonic())

    def _print(self, now: float) -> None:
        elapsed = now - self.t0
        line = f"{self.desc}: {self.done}" + (f"/{self.total}" if self.total else "")
        line += f"  {_clock(elapsed)}"
        if self.total and 0 < self.done < self.total:
            line += f" (~{_clock(elapsed / self.done * (self.total - self.done))} left)"
        _console.print(line + (f"  {self.info}" if self.info else ""), highlight=False, soft_wrap=True)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


@contextlib.contextmanager
def progress_bar(total: int | None, desc: str, enabled: bool = True) -> Iterator[Bar]:
    if not (enabled and is_main_process()):
        yield Bar()
        return
    if not _console.is_terminal:
        bar = _LineBar(total, desc)
        yield bar
        bar.close()
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
        yield _RichBar(progress, task)


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
