"""ONNX export with a numerical check, and the metadata that makes the .onnx file self-contained.

`export_onnx(model_or_path, out, size=...)` writes ONE .onnx file (weights inside, no `.onnx.data`):

* exporter: `torch.onnx.export(dynamo=True, external_data=False)`; only if that raises, the legacy
  TorchScript exporter (`dynamo=False`) is tried, and the report says so (`exporter`, `fallback_reason`).
* shapes: static (1, 3, S, S) by default, the fastest for ONNX Runtime and OpenVINO; `dynamic=True`
  makes batch, height and width dynamic (H and W must still be multiples of the model's stride).
* check: ONNX Runtime against torch (logits, max |diff| / max(1, max |logit|)) on a seeded random input
  and on a real-looking input: a synthetic polyp-like image (or the user's image) through `preprocess_image`. A dynamic export
  is checked at a second size too. Any diff above `tolerance` raises and leaves no file behind.
* metadata (`metadata_props`, all strings):

      polyprune            file format version (same as the .safetensors model file)
      polyprune.input      JSON InputSpec: size (the export size), mean, std, threshold
      polyprune.arch       JSON architecture (build_model kwargs incl. per-layer widths)
      polyprune.dynamic    "true" / "false"
      polyprune.exporter   "dynamo" / "legacy"
      polyprune.source     file name of the model it came from ("" for an in-memory module)

  `read_onnx_metadata(path)` reads them back; `Predictor("model.onnx")` needs nothing else.

The graph has one input `image` (N, 3, H, W) float32, normalized, and one output `logits` (N, 1, H, W).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from polyprune.checks import check_size
from polyprune.errors import ConfigError, ModelFileError, one_line
from polyprune.files import atomic_path
from polyprune.io import FORMAT_VERSION, InputSpec, load_model, model_arch

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 18


@dataclass
class ExportReport:
    """What `export_onnx` did. `max_abs_diff` is the largest |ORT - torch| logit diff over all checks
    (over max(1, max |logit|): relative where logits exceed +-1, see `check_onnx`)."""

    path: Path
    size: int
    dynamic: bool
    opset: int
    exporter: str  # "dynamo" or "legacy"
    fallback_reason: str | None
    checks: dict[str, float] = field(default_factory=dict)  # "random@64" -> max |diff|
    tolerance: float = 1e-4
    seconds: float = 0.0
    file_bytes: int = 0

    @property
    def max_abs_diff(self) -> float | None:
        return max(self.checks.values()) if self.checks else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path), "max_abs_diff": self.max_abs_diff}


@dataclass
class OnnxMeta:
    """polyprune metadata of an .onnx file; `input` is None for a file polyprune did not write."""

    input: InputSpec | None
    arch: dict[str, Any] | None
    version: str | None
    dynamic: bool
    raw: dict[str, str]


# ---------------------------------------------------------------------------------------------- export


def export_onnx(
    model_or_path: str | Path | nn.Module,
    out: str | Path,
    *,
    size: int | None = None,
    dynamic: bool = False,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    tolerance: float = 1e-4,
    image: str | Path | np.ndarray | None = None,
    input_spec: InputSpec | None = None,
    base_model: nn.Module | None = None,
) -> ExportReport:
    """Export a polyprune model file (or module) to one self-contained .onnx file at `out` (atomic).

    `size` defaults to the model's input size; `input_spec` overrides the preprocessing stored with
    the module (needed for a bare module without `polyprune_meta`, else ImageNet defaults are used).
    `image` (a path or an RGB uint8 array) replaces the synthetic image of the real-input check.
    `base_model`: for a file of a network outside the registry, the unpruned module (as `load_model`).
    Raises ConfigError (bad size / opset / path), ModelFileError (unreadable model, both exporters
    fail, ONNX Runtime cannot load the result, or a diff above `tolerance`: then no file is written).
    """
    t0 = time.perf_counter()
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise ConfigError(f"export target must end in .onnx, got {out}")
    model, spec, arch, source = _resolve_model(model_or_path, input_spec, base_model)
    size = spec.size if size is None else int(size)
    _check_size(model, size)
    if not 7 <= opset <= 25:
        raise ConfigError(f"opset must be between 7 and 25, got {opset}")
    spec = replace(spec, size=size)
    if isinstance(image, (str, Path)):
        image = read_rgb(image)

    was_training = model.training
    model.eval()
    try:
        device = _device_of(model)
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
        with atomic_path(out, suffix=".onnx") as tmp:
            exporter, reason = _torch_export(model, x, tmp, dynamic=dynamic, opset=opset)
            _write_metadata(tmp, spec, arch, dynamic=dynamic, exporter=exporter, source=source)
            checks: dict[str, float] = {}
            if check:
                checks = check_onnx(tmp, model, spec, dynamic=dynamic, image=image)
                worst = max(checks, key=checks.__getitem__)
                if not checks[worst] <= tolerance:  # also catches NaN
                    raise ModelFileError(
                        f"{out}: ONNX Runtime differs from torch by {checks[worst]:.3g} on {worst} "
                        f"(tolerance {tolerance:g} of the logits' scale); file not written"
                    )
            nbytes = tmp.stat().st_size
    finally:
        model.train(was_training)
    return ExportReport(
        path=out,
        size=size,
        dynamic=dynamic,
        opset=opset,
        exporter=exporter,
        fallback_reason=reason,
        checks=checks,
        tolerance=tolerance,
        seconds=time.perf_counter() - t0,
        file_bytes=nbytes,
    )


def _resolve_model(
    model_or_path: str | Path | nn.Module, input_spec: InputSpec | None, base_model: nn.Module | None = None
) -> tuple[nn.Module, InputSpec, dict[str, Any], str]:
    """(module, input spec, arch JSON, source file name) from a model file or an in-memory module."""
    if isinstance(model_or_path, nn.Module):
        meta = getattr(model_or_path, "polyprune_meta", None)
        spec = input_spec or (meta.input if meta else InputSpec.for_model(model_or_path))
        return model_or_path, spec, model_arch(model_or_path), ""
    path = Path(model_or_path)
    if path.suffix.lower() == ".onnx":
        raise ConfigError(f"{path} is already an ONNX file; export needs a .safetensors model file")
    model = load_model(path, base_model=base_model)
    return model, input_spec or model.polyprune_meta.input, model_arch(model), path.name


def _check_size(model: nn.Module, size: int) -> None:
    check_size(size, int(getattr(model, "stride", 1)))


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@contextmanager
def _quiet_exporter():
    """Hide the exporter's harmless chatter (torchvision-not-installed lines, deprecation warnings)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _torch_export(
    model: nn.Module, x: torch.Tensor, path: Path, *, dynamic: bool, opset: int
) -> tuple[str, str | None]:
    """Export to `path` with dynamo; on failure with the legacy exporter. Returns (exporter, reason)."""
    names = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "opset_version": opset}
    try:
        with _quiet_exporter():
            dyn = None
            if dynamic:
                from torch.export import Dim

                dyn = ({0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC},)  # positional: any forward arg name
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=True,
                external_data=False,
                dynamic_shapes=dyn,
                verbose=False,
                **names,
            )
        return "dynamo", None
    except OSError:  # the disk, not the exporter (no space, read-only): atomic_path reports it
        raise
    except Exception as exc:  # any dynamo failure (unsupported op, missing onnxscript, ...): try legacy
        reason = f"dynamo exporter failed ({type(exc).__name__}: {one_line(exc)}); used the legacy exporter"
    try:
        with _quiet_exporter():
            axes = {
                INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                OUTPUT_NAME: {0: "batch", 2: "height", 3: "width"},
            }
            torch.onnx.export(
                model, (x,), str(path), dynamo=False, dynamic_axes=axes if dynamic else None, **names
            )
    except OSError:
        raise
    except Exception as exc:
        raise ModelFileError(f"cannot export the model to ONNX: {reason}; legacy: {one_line(exc)}") from exc
    return "legacy", reason


def _write_metadata(
    path: Path, spec: InputSpec, arch: dict[str, Any], *, dynamic: bool, exporter: str, source: str
) -> None:
    set_onnx_metadata(
        path,
        {
            "polyprune": FORMAT_VERSION,
            "polyprune.input": json.dumps(spec.to_dict()),
            "polyprune.arch": json.dumps(arch),
            "polyprune.dynamic": "true" if dynamic else "false",
            "polyprune.exporter": exporter,
            "polyprune.source": source,
        },
    )


def set_onnx_metadata(path: Path, props: dict[str, str]) -> None:
    """Set `metadata_props` keys of an .onnx file in place (others kept)."""
    import onnx

    proto = onnx.load(str(path))
    kept = [p for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for k, v in props.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.save(proto, str(path))  # < 2 GB: one file, weights inside


def read_onnx_metadata(path: str | Path) -> OnnxMeta:
    """polyprune metadata of an .onnx file (ModelFileError if missing / not ONNX / corrupt JSON)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"ONNX file not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ModelFileError(f"{path} is not a readable ONNX file ({one_line(exc)})") from exc
    return parse_onnx_metadata({p.key: p.value for p in proto.metadata_props}, path)


def onnx_static_size(path: str | Path) -> int | None:
    """The fixed square input size of an .onnx file, or None where H/W are dynamic."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
        dims = proto.graph.input[0].type.tensor_type.shape.dim
    except Exception:  # unreadable files are reported by whoever opens them next
        return None
    hw = [d.dim_value if d.HasField("dim_value") else None for d in dims][2:4]
    return hw[0] if len(hw) == 2 and hw[0] and hw[0] == hw[1] else None


def parse_onnx_metadata(raw: dict[str, str], path: str | Path) -> OnnxMeta:
    """Parse `metadata_props` (as read by onnx or ONNX Runtime's `custom_metadata_map`)."""
    try:
        spec = InputSpec.from_dict(json.loads(raw["polyprune.input"])) if "polyprune.input" in raw else None
        arch = json.loads(raw["polyprune.arch"]) if raw.get("polyprune.arch") else None
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{path} has corrupt polyprune metadata ({one_line(exc)})") from exc
    return OnnxMeta(
        input=spec,
        arch=arch,
        version=raw.get("polyprune"),
        dynamic=raw.get("polyprune.dynamic") == "true",
        raw=raw,
    )


# ---------------------------------------------------------------------------------------------- check


def check_onnx(
    path: str | Path,
    model: nn.Module,
    spec: InputSpec,
    *,
    dynamic: bool = False,
    image: np.ndarray | None = None,
) -> dict[str, float]:
    """Max |ORT - torch| of the logits over max(1, max |torch|), per input: {"random@S": d, "image@S": d
    [, "random@S2": d]}: an absolute diff for logits within +-1, a relative one beyond."""
    from polyprune.data import preprocess_image

    session = ort_session(path)
    stride = int(getattr(model, "stride", 16))
    rgb = image if image is not None else synthetic_image(int(spec.size * 1.5), spec.size, seed=1)
    inputs = {
        f"random@{spec.size}": np.random.default_rng(0).standard_normal(
            (1, 3, spec.size, spec.size), np.float32
        ),
        f"image@{spec.size}": preprocess_image(rgb, spec)[None],
    }
    if dynamic:  # a second, non-square size proves the H/W axes really are dynamic
        h2, w2 = spec.size + stride, max(stride, spec.size - stride)
        inputs[f"random@{h2}x{w2}"] = np.random.default_rng(1).standard_normal((1, 3, h2, w2), np.float32)
    device = _device_of(model)
    diffs = {}
    for name, x in inputs.items():
        with torch.inference_mode():
            ref = model(torch.from_numpy(x).to(device)).float().cpu().numpy()
        got = session.run(None, {session.get_inputs()[0].name: x})[0]
        if got.shape != ref.shape:
            raise ModelFileError(f"{path}: ONNX output shape {got.shape} != torch {ref.shape} on {name}")
        # relative to the logits' scale: float32 rounding grows with it (a pruned model's logits reach ~10)
        scale = max(1.0, float(np.max(np.abs(ref))))
        diffs[name] = float(np.max(np.abs(got.astype(np.float32) - ref))) / scale
    return diffs


def ort_session(path: str | Path | bytes, threads: int | None = None):
    """A CPU ONNX Runtime session (threads -> intra_op_num_threads; inter-op fixed at 1)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1  # one branchless graph at batch 1: inter-op threads only add noise
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(
            path if isinstance(path, bytes) else str(path),
            sess_options=opts,
            providers=["CPUExecutionProvider"],
        )
    except Exception as exc:  # ORT raises its own Fail / InvalidGraph / NoSuchFile types
        raise ModelFileError(
            f"ONNX Runtime cannot load {path if not isinstance(path, bytes) else 'model'} ({one_line(exc)})"
        ) from exc


# ---------------------------------------------------------------------------------------------- images


def synthetic_image(height: int, width: int, *, seed: int = 0) -> np.ndarray:
    """A deterministic colonoscopy-like RGB uint8 frame: pink-red mucosa, vignette, a bright polyp blob.

    Not a sample of any dataset; it only gives the export check inputs with real image statistics
    (smooth regions, edges, highlights) instead of white noise.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cy, cx = height / 2, width / 2
    r = np.sqrt(((yy - cy) / height) ** 2 + ((xx - cx) / width) ** 2)
    vignette = np.clip(1.2 - 1.6 * r, 0.15, 1.0)
    img = np.stack([190 * vignette, 90 * vignette, 80 * vignette], axis=-1)
    py, px = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    blob = np.exp(-(((yy - py) / (0.15 * height)) ** 2 + ((xx - px) / (0.12 * width)) ** 2))
    img += blob[..., None] * np.array([50.0, 40.0, 30.0])
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode an image to RGB uint8 (`polyprune.images.read_image`: DataError naming the file)."""
    from polyprune.images import read_image

    return read_image(path)
