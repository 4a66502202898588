"""Safe writes: every file polyprune writes appears whole or not at all (temp file in the same folder,
fsync, rename), run folders that refuse to mix two runs, and strict JSON (no NaN / Infinity)."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from polyprune.errors import DataError, OutputError, one_line

# ---------------------------------------------------------------------------------------------- atomic


def raise_output_error(path: Path, exc: OSError) -> None:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise OutputError(f"cannot write {path}: no space left on device") from exc
    if exc.errno == errno.EROFS:
        raise OutputError(f"cannot write {path}: read-only file system") from exc
    if exc.errno in (errno.EACCES, errno.EPERM):
        raise OutputError(f"cannot write {path}: permission denied (read-only folder?)") from exc
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):  # mkdir / mkstemp below a path that is a file
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise OutputError(f"cannot write {path}: {parent} is a file, not a folder") from exc
                break
    raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    A symlink at `path` keeps pointing where it did: the write lands at its target. A FIFO, device or
    socket (/dev/stdout, a named pipe) is never replaced by a regular file: the finished bytes are
    copied into it instead (no atomicity there: a stream has none to give).
    """
    path = Path(path)
    special = _is_special(path)  # stat follows links: /dev/stdout -> a pipe is special
    if not special and path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder")
    try:
        if not special:
            path.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = tempfile.gettempdir() if special else path.parent
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=tmp_dir)
        os.close(fd)
    except OSError as exc:
        raise_output_error(path, exc)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if special:
            with open(tmp_path, "rb") as src, open(path, "wb") as dst:
                dst.write(src.read())
            tmp_path.unlink(missing_ok=True)
            return
        with open(tmp_path, "rb+") as fh:  # data on disk before the rename makes it visible
            # mkstemp makes 0600 (and some writers recreate the file): the final file gets the mode
            # an ordinary open() would give it
            os.fchmod(fh.fileno(), 0o666 & ~_umask())
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise_output_error(path, exc)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _is_special(path: Path) -> bool:
    """A FIFO, character / block device or socket: something to write into, never to replace."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode)


RUN_MARKERS = ("model.safetensors", "history.json", "trajectory.json", "checkpoint", "steps")


@contextlib.contextmanager
def run_folder(path: str | Path, *, resume: bool = False, overwrite: bool = False) -> Iterator[Path]:
    """Own the run folder `path` while the block runs: one writer at a time, no silent clobbering.

    A folder that already holds files (names starting with "." aside) is refused unless `resume`
    (continue it) or `overwrite` (clear it first; only a folder that looks like a polyprune run, so a
    mistyped --out never empties someone's data). An exclusive flock on `path/.lock` keeps a second
    process out until this one ends, killed ones included: the kernel drops the lock with the process.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"run folder {path} is a file")
    entries = sorted(p for p in path.iterdir() if not p.name.startswith(".")) if path.is_dir() else []
    if entries and not resume:
        names = ", ".join(p.name for p in entries[:3]) + (", ..." if len(entries) > 3 else "")
        if not overwrite:
            raise OutputError(
                f"run folder {path} is not empty ({names}): continue it with --resume, clear it with "
                "--overwrite, or choose a new --out"
            )
        if not any((path / m).exists() for m in RUN_MARKERS):
            raise OutputError(
                f"--overwrite refused: {path} does not look like a polyprune run folder (it holds {names}, "
                f"none of {', '.join(RUN_MARKERS)})"
            )
    import fcntl  # POSIX only, like the rest of the run-folder handling

    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        lock = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)  # unbuffered: held until the end
    except OSError as exc:
        raise_output_error(path / ".lock", exc)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(lock, 32, 0).decode(errors="replace").strip() or "?"
            raise OutputError(
                f"run folder {path} is being written by another polyprune process (pid {holder}); "
                "wait for it to end or choose another --out"
            ) from None
        with contextlib.suppress(OSError):  # the pid is for the message above only (a full disk: none)
            os.ftruncate(lock, 0)
            os.pwrite(lock, str(os.getpid()).encode(), 0)
        if entries and overwrite and not resume:
            import shutil

            for p in entries:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        yield path
    finally:
        # a run that failed before writing anything leaves no folder behind (only one it made itself)
        if created and [p.name for p in path.iterdir()] == [".lock"]:
            with contextlib.suppress(OSError):
                (path / ".lock").unlink()
                path.rmdir()
        os.close(lock)  # closing drops the flock


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_text(obj: Any) -> str:
    """Strict JSON (RFC 8259): NaN and +-inf become null, numpy / torch scalars plain numbers."""
    return json.dumps(_finite(obj), indent=2, sort_keys=False, default=json_default, allow_nan=False)


def _finite(o: Any) -> Any:
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_finite(v) for v in o]
    if hasattr(o, "item") and getattr(o, "ndim", 0) == 0:  # numpy / torch scalars
        return _finite(o.item())
    if hasattr(o, "tolist"):
        return _finite(o.tolist())
    return o


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json_text(obj) + "\n")


def json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def read_json(path: str | Path) -> Any:
    """A JSON file; DataError naming it when it is missing, unreadable or not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"file not found: {path}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: not a readable JSON file ({one_line(exc)})") from exc
