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

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from polyprune.checks import MAX_SIZE
from polyprune.errors import ModelFileError, OutputError, one_line
from polyprune.files import atomic_path, json_default, raise_output_error

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
        "arch": json.dumps(arch if arch is not None else model_arch(module), default=json_default),
        "input": json.dumps(input_spec.to_dict()),
        "parent": json.dumps(parent or {}, default=json_default),
        "train": json.dumps(train or {}, default=json_default),
        "pruning": json.dumps(pruning or {}, default=json_default),
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
            f"{path} is not a readable .safetensors model file ({one_line(exc)}){hint}"
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
        raise ModelFileError(f"{path} has corrupt polyprune metadata ({one_line(exc)})") from exc


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path} is not a readable .safetensors model file ({one_line(exc)})") from exc


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
                f"{path}: metadata names an architecture that cannot be built ({one_line(exc)})"
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
        raise ModelFileError(f"{path} is not a readable .safetensors model file ({one_line(exc)})") from exc
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise ModelFileError(f"{path}: weight {bad} holds NaN/inf values (a diverged training run?)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # torch's first line is a header: name the first real difference
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else one_line(exc)
        raise ModelFileError(
            f"{path}: weights do not match the architecture in its metadata ({one_line(Exception(detail))})"
        ) from exc
    model.polyprune_meta = meta  # type: ignore[attr-defined]
    return model.to(device).eval()


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
            raise_output_error(path, OSError(code, os.strerror(code)))
        raise OutputError(f"cannot write {path}: {one_line(exc)}") from exc
