"""Files: the model file format and atomic writes.

A model is ONE `.safetensors` file. Tensors = the state dict; metadata (str -> str) holds JSON:

    polyprune  format version of this file
    arch       {"name": "unet", ...build_model kwargs incl. per-layer widths}  (pruned models included)
    input      {"size": 256, "mean": [...], "std": [...], "threshold": 0.5}
    parent     {"params": ..., "macs": ..., "arch": {...}, "path": ...} or {}   (set by pruning)
    train      the training / fine-tuning config and results
    pruning    {"criterion": ..., "history": [...]} or {}; for models outside the registry, the
               torch-pruning history that replays the pruning on the user's unpruned module

Loading is `build_model(**arch)` + a strict `load_state_dict`: no pickle anywhere. Every write of a
model, checkpoint, JSON or report goes to a temporary file in the same folder and is renamed over the
final path, so a killed process never leaves a half-written file at a final path.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from polyprune.checks import MAX_SIZE
from polyprune.errors import DataError, ModelFileError, OutputError

FORMAT_VERSION = "1"
SUPPORTED_VERSIONS = ("1",)
MAX_INPUT_SIZE = MAX_SIZE  # px: a model input beyond this is a hostile or broken file, not a real model
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class InputSpec:
    """What a model expects: square RGB input of `size`, normalized by mean/std; threshold for masks."""

    size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    threshold: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def for_model(cls, model: nn.Module, size: int = 256) -> InputSpec:
        """The preprocessing `model` was trained with: its file's, else its family's (`input_mean` /
        `input_std`, e.g. TF scaling for EfficientNet-Lite), else ImageNet mean/std."""
        meta = getattr(model, "polyprune_meta", None)
        if meta is not None:
            return cls(size=size, mean=meta.input.mean, std=meta.input.std, threshold=meta.input.threshold)
        mean = tuple(getattr(model, "input_mean", IMAGENET_MEAN))
        std = tuple(getattr(model, "input_std", IMAGENET_STD))
        return cls(size=size, mean=mean, std=std)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        """Parse and bound-check (the dict comes from a file a user hands us): ValueError if out of bounds."""
        size = d.get("size", 256)
        if isinstance(size, bool) or not isinstance(size, int) or not 16 <= size <= MAX_INPUT_SIZE:
            raise ValueError(f"input size must be an int in 16..{MAX_INPUT_SIZE}, got {size!r}")
        mean, std = d.get("mean", IMAGENET_MEAN), d.get("std", IMAGENET_STD)
        threshold = d.get("threshold", 0.5)
        numbers = (
            [*mean, *std, threshold]
            if isinstance(mean, list | tuple) and isinstance(std, list | tuple)
            else []
        )
        if not numbers or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in numbers):
            raise ValueError("input mean, std and threshold must be numbers")
        if len(mean) != 3 or len(std) != 3 or not all(math.isfinite(v) for v in (*mean, *std)):
            raise ValueError(f"input needs 3 finite means and 3 finite stds, got mean {mean}, std {std}")
        if min(std) <= 0:
            raise ValueError(f"input std must be > 0, got {std}")
        if not 0 < threshold < 1:  # NaN fails this too
            raise ValueError(f"input threshold must be in (0, 1), got {threshold}")
        return cls(
            size=size, mean=tuple(map(float, mean)), std=tuple(map(float, std)), threshold=float(threshold)
        )


@dataclass
class ModelMeta:
    arch: dict[str, Any]
    input: InputSpec
    parent: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    pruning: dict[str, Any] = field(default_factory=dict)
    version: str = FORMAT_VERSION


# ---------------------------------------------------------------------------------------------- atomic


def _raise_output_error(path: Path, exc: OSError) -> None:
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
        _raise_output_error(path, exc)
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
        _raise_output_error(path, exc)
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
        _raise_output_error(path / ".lock", exc)
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
    return json.dumps(_finite(obj), indent=2, sort_keys=False, default=_json_default, allow_nan=False)


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


def _json_default(o: Any) -> Any:
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
        raise DataError(f"cannot read {path}: not a readable JSON file ({_short(exc)})") from exc


# ---------------------------------------------------------------------------------------------- models


def model_arch(model: nn.Module) -> dict[str, Any]:
    """The JSON-able architecture of a registered model, read from the module as it is now."""
    if hasattr(model, "config"):
        return model.config()
    return {"name": None, "class": f"{type(model).__module__}.{type(model).__qualname__}"}


def save_model(
    path: str | Path,
    model: nn.Module,
    *,
    input_spec: InputSpec,
    parent: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    pruning: dict[str, Any] | None = None,
    arch: dict[str, Any] | None = None,
) -> Path:
    """Write `model` as one .safetensors file (atomic). `arch` defaults to `model.config()`."""
    module = model.module if hasattr(model, "module") else model  # unwrap DDP
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    recorded = getattr(module, "polyprune_pruning_history", None)
    if recorded and not (pruning or {}).get("history"):  # prune_model's record: reload needs it
        pruning = {**(pruning or {}), "history": recorded}
    meta = {
        "polyprune": FORMAT_VERSION,
        "arch": json.dumps(arch if arch is not None else model_arch(module), default=_json_default),
        "input": json.dumps(input_spec.to_dict()),
        "parent": json.dumps(parent or {}, default=_json_default),
        "train": json.dumps(train or {}, default=_json_default),
        "pruning": json.dumps(pruning or {}, default=_json_default),
    }
    with atomic_path(path, suffix=".safetensors.tmp") as tmp:
        _save_file(state, tmp, Path(path), meta)
    return Path(path)


def read_metadata(path: str | Path) -> ModelMeta:
    """Read and validate the metadata of a polyprune model file without loading the weights."""
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"model path is a folder, not a model file: {path}")
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            raw = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        hint = "; polyprune never unpickles .pt/.pth files" if path.suffix.lower() in PICKLE_SUFFIXES else ""
        raise ModelFileError(
            f"{path} is not a readable .safetensors model file ({_short(exc)}){hint}"
        ) from exc
    if "arch" not in raw:
        raise ModelFileError(f"{path} has no polyprune metadata (arch); was it written by polyprune?")
    version = raw.get("polyprune", FORMAT_VERSION)
    if version not in SUPPORTED_VERSIONS:
        raise ModelFileError(
            f"{path} has model format version {version[:20]!r}; this polyprune reads "
            f"{', '.join(SUPPORTED_VERSIONS)} (a newer polyprune wrote it?)"
        )
    try:
        fields = {k: json.loads(raw.get(k) or "{}") for k in ("arch", "input", "parent", "train", "pruning")}
        for k, v in fields.items():
            if not isinstance(v, dict):
                raise ValueError(f"{k} is a JSON {type(v).__name__}, not an object")
        spec = InputSpec.from_dict(fields["input"])
        return ModelMeta(
            arch=fields["arch"],
            input=spec,
            parent=fields["parent"],
            train=fields["train"],
            pruning=fields["pruning"],
            version=version,
        )
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{path} has corrupt polyprune metadata ({_short(exc)})") from exc


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path} is not a readable .safetensors model file ({_short(exc)})") from exc


def _shape_mismatch(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> str | None:
    """The first difference between the architecture's tensors and the file's, in words; None if none."""
    for k, shape in expected.items():
        if k not in found:
            return f"{k} is missing from the file ({len(set(expected) - set(found))} tensors missing)"
        if found[k] != shape:
            return f"{k}: file {list(found[k])}, metadata architecture {list(shape)}"
    extra = sorted(set(found) - set(expected))
    return f"{extra[0]} is not in the architecture ({len(extra)} extra tensors)" if extra else None


def load_model(path: str | Path, *, base_model: nn.Module | None = None, device: str = "cpu") -> nn.Module:
    """Rebuild a model from its file: `build_model(**arch)` + strict `load_state_dict`. No pickle.

    Models outside the registry need `base_model`, the user's unpruned module; a recorded pruning
    history is replayed on it before the weights are loaded. The returned model is in eval mode and
    carries its metadata as `model.polyprune_meta`.
    """
    from polyprune.models import build_model

    path = Path(path)
    meta = read_metadata(path)
    arch = dict(meta.arch)
    name = arch.pop("name", None)
    if base_model is not None:
        model = base_model
        history = meta.pruning.get("history")
        if history and name is None:
            from polyprune.structure import replay_pruning_history

            replay_pruning_history(model, history, input_size=meta.input.size)
            model.polyprune_pruning_history = list(history)  # pruning it further extends this record
    elif name is None:
        raise ModelFileError(
            f"{path} holds a model outside polyprune's registry ({arch.get('class')}); "
            "pass base_model=<the unpruned module> to load_model"
        )
    else:
        try:  # on the meta device first: metadata asking for a huge model must not allocate it
            with torch.device("meta"):
                skeleton = build_model(name, **arch)
        except Exception as exc:
            raise ModelFileError(
                f"{path}: metadata names an architecture that cannot be built ({_short(exc)})"
            ) from exc
        expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        why = _shape_mismatch(expected, _file_shapes(path))
        if why:
            raise ModelFileError(f"{path}: weights do not match the architecture in its metadata ({why})")
        io_channels = (arch.get("in_channels", 3), arch.get("out_channels", 1))
        if io_channels != (3, 1):
            raise ModelFileError(
                f"{path}: polyprune models take RGB images and give one mask (in_channels 3, "
                f"out_channels 1); its metadata says {io_channels[0]} and {io_channels[1]}"
            )
        stride = int(getattr(skeleton, "stride", 1))
        if meta.input.size % stride:
            raise ModelFileError(
                f"{path}: input size {meta.input.size} in its metadata is not a multiple of the "
                f"model's stride {stride}"
            )
        model = build_model(name, **arch)
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path} is not a readable .safetensors model file ({_short(exc)})") from exc
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise ModelFileError(f"{path}: weight {bad} holds NaN/inf values (a diverged training run?)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # torch's first line is a header: name the first real difference
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else _short(exc)
        raise ModelFileError(
            f"{path}: weights do not match the architecture in its metadata ({_short(Exception(detail))})"
        ) from exc
    model.polyprune_meta = meta  # type: ignore[attr-defined]
    return model.to(device).eval()


def _short(exc: BaseException, limit: int = 160) -> str:
    """First line of an exception message, cut: errors stay one line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def save_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """Atomic safetensors write of a flat tensor dict (checkpoints, optimizer state)."""
    with atomic_path(path, suffix=".safetensors.tmp") as tmp:
        _save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, Path(path), metadata)
    return Path(path)


def _save_file(
    tensors: dict[str, torch.Tensor], tmp: Path, path: Path, metadata: dict[str, str] | None
) -> None:
    """safetensors' save_file; its I/O failures (SafetensorError "... (os error 28)") become OutputError."""
    try:
        save_file(tensors, str(tmp), metadata=metadata)
    except SafetensorError as exc:
        found = re.search(r"os error (\d+)", str(exc))
        if found:
            code = int(found.group(1))
            _raise_output_error(path, OSError(code, os.strerror(code)))
        raise OutputError(f"cannot write {path}: {_short(exc)}") from exc
