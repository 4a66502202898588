"""Prediction on one image: `Predictor` (torch / ONNX Runtime / OpenVINO), masks and overlays.

    p = Predictor("model.onnx")                     # backend "auto": .onnx -> onnxruntime, else torch
    prob = p.predict(rgb_uint8)                     # float32 (H, W) in [0, 1] at the image's own size
    mask = p.predict_mask(rgb_uint8)                # uint8 (H, W) in {0, 255}: prob >= spec.threshold
    Predictor("model.onnx", tta="hflip")            # logits averaged over the image and its mirror
    vis = overlay(rgb_uint8, mask)                  # RGB uint8: translucent fill + contour

Backends:
* `torch`: a .safetensors model file or an nn.Module; `threads` calls `torch.set_num_threads`, which is
  process-wide.
* `onnxruntime`: a .onnx file, or a .safetensors file / module exported on the fly (static, at the spec
  size, checked against torch) to a temporary file that lives as long as the Predictor.
  `threads` -> `intra_op_num_threads` (inter-op 1).
* `openvino` (optional extra `polyprune[openvino]`): same inputs as onnxruntime; the model is reshaped to
  a static (1, 3, S, S) before compiling for the CPU. `threads` -> `INFERENCE_NUM_THREADS`. OpenVINO's
  default precision on a CPU with AVX512_BF16/AMX is **bf16**: about 2x faster than fp32 ORT here, with
  logits off by ~1e-3 (masks practically identical). `precision="f32"` forces fp32.

Preprocessing is `polyprune.data.preprocess_image` with the model's `InputSpec` (from the .safetensors
metadata, or the `polyprune.input` metadata of the .onnx file), whatever the backend.
"""

from __future__ import annotations

import contextlib
import ctypes
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from polyprune.data import preprocess_image
from polyprune.errors import ConfigError, DataError, ModelFileError, one_line
from polyprune.io import InputSpec, load_model
from polyprune.quantize import INT8_KEY, warn_if_int8_saturates
from polyprune.tta import check_tta, make_views, merge_views

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")


class _SignalStack(ctypes.Structure):  # glibc stack_t
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextlib.contextmanager
def keep_signal_stack() -> Iterator[None]:
    """Restore the calling thread's alternate signal stack (sigaltstack) when the block ends.

    OpenVINO's CPU plugin installs a signal stack of its own on the thread that compiles a model and,
    when the model is freed, unmaps it and puts back the one it found. Freed out of creation order (two
    models alive), that leaves the thread on unmapped memory, and the next signal with a handler (Ctrl-C,
    a timer) kills the process with SIGSEGV. Keeping the caller's stack across the compile avoids it.
    A no-op where libc has no sigaltstack (not Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        sigaltstack = libc.sigaltstack
    except (OSError, AttributeError):
        yield
        return
    saved = _SignalStack()
    if sigaltstack(None, ctypes.byref(saved)) != 0:
        yield
        return
    try:
        yield
    finally:
        if not saved.ss_flags & 1:  # SS_ONSTACK (inside a handler) cannot be changed; never so here
            sigaltstack(ctypes.byref(saved), None)  # SS_DISABLE in ss_flags restores "no stack" too


def import_openvino() -> Any:
    """`openvino`, or a ConfigError saying how to install the optional extra."""
    try:
        import openvino
    except ImportError as exc:
        raise ConfigError(
            "the openvino backend needs the optional extra: pip install 'polyprune[openvino]'"
        ) from exc
    return openvino


class Predictor:
    """`Predictor(model).predict(rgb_uint8) -> float32 (H, W) probabilities in [0, 1]` at the image size.

    `model`: a .safetensors path, a .onnx path, or an nn.Module. `backend`: auto | torch | onnxruntime
    | openvino (auto: .onnx -> onnxruntime, anything else -> torch). `threads` None: torch keeps its
    setting, ONNX Runtime uses `torch.get_num_threads()`, OpenVINO its own default (all cores).
    `input_spec` overrides the stored preprocessing (required for an .onnx file polyprune did not
    write). `device` applies to torch only.
    `precision` applies to openvino only ("f32" / "bf16"; None = OpenVINO's default for the CPU).
    `tta`: test-time augmentation of `predict` / `infer` (`polyprune.tta`: none | hflip | flips | d4);
    `predict_logits` always runs the batch as given.
    Raises ConfigError (unknown backend, backend/model mismatch, missing optional extra) and
    ModelFileError (unreadable or metadata-less model).
    """

    def __init__(
        self,
        model: str | Path | nn.Module,
        backend: str = "auto",
        threads: int | None = None,
        input_spec: InputSpec | None = None,
        device: str = "cpu",
        *,
        precision: str | None = None,
        tta: str = "none",
    ) -> None:
        self.tta = check_tta(tta)
        if backend not in BACKENDS:
            raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if threads is not None and threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        is_onnx = not isinstance(model, nn.Module) and Path(model).suffix.lower() == ".onnx"
        if backend == "auto":
            backend = "onnxruntime" if is_onnx else "torch"
        if backend != "torch" and device != "cpu":
            raise ConfigError(f"device {device!r} is for the torch backend; {backend} runs on the CPU here")
        self.backend, self.threads, self.precision = backend, threads, "f32"  # openvino may set bf16
        self.source = "<module>" if isinstance(model, nn.Module) else str(model)
        self.model: nn.Module | None = None
        self._tmpdir: tempfile.TemporaryDirectory | None = None
        self._run: Callable[[np.ndarray], np.ndarray]

        if backend == "torch":
            if is_onnx:
                raise ConfigError(f"{model} is an ONNX file: use backend onnxruntime or openvino")
            self._init_torch(model, input_spec, device, threads)
            return
        onnx_path, spec = self._onnx_file(model, input_spec, is_onnx)
        if backend == "onnxruntime":
            self._init_ort(onnx_path, spec, threads)
        else:
            self._init_openvino(onnx_path, spec, threads, precision)

    # ------------------------------------------------------------------ backends

    def _init_torch(
        self, model: str | Path | nn.Module, spec: InputSpec | None, device: str, threads: int | None
    ):
        if threads:
            torch.set_num_threads(threads)
        if isinstance(model, nn.Module):
            self.model = model.eval()
            meta = getattr(model, "polyprune_meta", None)
            self.input_spec = spec or (meta.input if meta else InputSpec.for_model(model))
        else:
            self.model = load_model(model, device=device)
            self.input_spec = spec or self.model.polyprune_meta.input
        p = next(self.model.parameters(), None)
        self.device = p.device if p is not None else torch.device(device)
        self._run = self._run_torch

    def _onnx_file(
        self, model: str | Path | nn.Module, spec: InputSpec | None, is_onnx: bool
    ) -> tuple[Path, InputSpec]:
        """The .onnx file to load and its InputSpec; non-ONNX models are exported to a temp folder."""
        from polyprune.export import export_onnx, read_onnx_metadata

        self.device = torch.device("cpu")
        if is_onnx:
            path = Path(model)  # type: ignore[arg-type]
            meta = read_onnx_metadata(path)
            spec = spec or meta.input
            if spec is None:
                raise ModelFileError(
                    f"{path} has no polyprune.input metadata; pass input_spec=InputSpec(...)"
                )
            return path, spec
        self._tmpdir = tempfile.TemporaryDirectory(prefix="polyprune-onnx-")
        path = Path(self._tmpdir.name) / "model.onnx"
        report = export_onnx(model, path, input_spec=spec)
        return path, read_onnx_metadata(report.path).input  # type: ignore[return-value]

    def _init_ort(self, path: Path, spec: InputSpec, threads: int | None) -> None:
        from polyprune.export import ort_session

        self._session = ort_session(path, threads)
        raw = self._session.get_modelmeta().custom_metadata_map
        if INT8_KEY in raw:
            self.precision = "int8"
            warn_if_int8_saturates(path, raw)
        inp = self._session.get_inputs()[0]
        self._check_static_shape(path, inp.shape, spec)
        self._check_output_shape(path, self._session.get_outputs()[0].shape, spec)
        self._input_name = inp.name
        self._batch_fixed = isinstance(inp.shape[0], int)
        self.input_spec = spec
        self._run = self._run_ort

    def _init_openvino(self, path: Path, spec: InputSpec, threads: int | None, precision: str | None) -> None:
        ov = import_openvino()
        if precision not in (None, "f32", "bf16", "f16"):
            raise ConfigError(f"openvino precision must be f32, bf16 or f16, got {precision!r}")
        core = ov.Core()
        try:
            ov_model = core.read_model(str(path))
        except Exception as exc:
            raise ModelFileError(f"OpenVINO cannot read {path} ({one_line(exc)})") from exc
        shape = ov_model.inputs[0].get_partial_shape()
        dims = [d.get_length() if d.is_static else None for d in shape]
        self._check_static_shape(path, dims, spec)
        out_shape = ov_model.outputs[0].get_partial_shape()
        self._check_output_shape(path, [d.get_length() if d.is_static else None for d in out_shape], spec)
        ov_model.reshape({ov_model.inputs[0].get_any_name(): [1, 3, spec.size, spec.size]})  # static: fastest
        config: dict[str, Any] = {}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        if precision:
            config["INFERENCE_PRECISION_HINT"] = precision
        with keep_signal_stack():
            compiled = core.compile_model(ov_model, "CPU", config)
            self._request = compiled.create_infer_request()
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")
        self.precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)  # "bf16"
        self._batch_fixed = True
        self.input_spec = spec
        self._run = self._run_openvino

    @staticmethod
    def _check_output_shape(path: Path, shape: list[Any], spec: InputSpec) -> None:
        """(N, 1, H, W) logits at the input size: anything else is not a polyprune model, whatever its
        metadata claims (a foreign network with copied metadata would "predict" garbage)."""
        fixed = [d if isinstance(d, int) else None for d in shape]
        if len(fixed) != 4 or fixed[1] not in (1, None) or any(d not in (spec.size, None) for d in fixed[2:]):
            raise ModelFileError(
                f"{path} outputs shape {list(shape)}, not the (N, 1, {spec.size}, {spec.size}) mask logits "
                "of a polyprune model"
            )

    @staticmethod
    def _check_static_shape(path: Path, shape: list[Any], spec: InputSpec) -> None:
        hw = [d for d in shape[2:4] if isinstance(d, int)]
        if hw and hw != [spec.size, spec.size]:
            raise ConfigError(
                f"{path} has a fixed input size {shape[2]}x{shape[3]}, not the spec's {spec.size}"
            )

    def _run_torch(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = self.model(torch.from_numpy(batch).to(self.device))  # type: ignore[misc]
            return out.float().cpu().numpy()

    def _run_ort(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input_name: batch})[0]

    def _run_openvino(self, batch: np.ndarray) -> np.ndarray:
        self._request.infer({0: batch})
        return self._request.get_output_tensor(0).data.copy()  # the tensor is reused by the next call

    # ------------------------------------------------------------------ public

    def predict_logits(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) float32 preprocessed -> (N, 1, S, S) float32 logits."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self.backend != "torch" and self._batch_fixed and len(batch) != 1:  # batch-1 graph: loop
            return np.concatenate([self._run(batch[i : i + 1]) for i in range(len(batch))])
        return self._run(batch).astype(np.float32, copy=False)

    def preprocess(self, image_rgb: np.ndarray) -> np.ndarray:
        """RGB uint8 (H, W, 3) -> float32 (3, S, S) via `preprocess_image` and the model's spec."""
        return preprocess_image(_as_rgb(image_rgb), self.input_spec)

    @staticmethod
    def postprocess(logits: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
        """(S, S) logits -> float32 (H, W) probabilities: sigmoid, then bilinear resize to (H, W)."""
        prob = (0.5 * (1.0 + np.tanh(0.5 * logits))).astype(np.float32)  # overflow-free sigmoid
        h, w = hw
        return cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR)

    def infer(self, x: np.ndarray) -> np.ndarray:
        """(3, S, S) preprocessed -> (S, S) float32 logits, averaged over the `tta` views."""
        if self.tta == "none":
            return self.predict_logits(x[None])[0, 0]
        return merge_views(self.predict_logits(make_views(x, self.tta))[:, 0], self.tta)

    def predict(self, image_rgb: np.ndarray) -> np.ndarray:
        """RGB uint8 (H, W, 3) -> float32 (H, W) probabilities in [0, 1]."""
        image_rgb = _as_rgb(image_rgb)
        return self.postprocess(self.infer(self.preprocess(image_rgb)), image_rgb.shape[:2])

    def predict_mask(self, image_rgb: np.ndarray) -> np.ndarray:
        """RGB uint8 (H, W, 3) -> uint8 (H, W) mask in {0, 255}: probability >= the spec's threshold."""
        return to_mask(self.predict(image_rgb), self.input_spec.threshold)

    def describe(self) -> dict[str, Any]:
        """JSON-able summary: backend, source, threads, input spec, precision (openvino), TTA mode."""
        return {
            "backend": self.backend,
            "model": self.source,
            "threads": self.threads,
            "input": self.input_spec.to_dict(),
            "precision": self.precision,
            "tta": self.tta,
        }

    def close(self) -> None:
        """Release the runtime session and delete an on-the-fly export."""
        self._session = self._request = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        tta = "" if self.tta == "none" else f", tta={self.tta!r}"
        return f"Predictor({self.source!r}, backend={self.backend!r}, size={self.input_spec.size}{tta})"


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """Accept (H, W, 3) uint8; grey (H, W) and RGBA (H, W, 4) are converted; anything else is a DataError."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise DataError(f"expected an RGB uint8 array, got {getattr(image, 'dtype', type(image).__name__)}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim == 3 and image.shape[2] == 4:
        return np.ascontiguousarray(image[..., :3])
    if image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise DataError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    return image


def to_mask(prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Probabilities -> uint8 mask in {0, 255} (prob >= threshold)."""
    return np.where(prob >= threshold, np.uint8(255), np.uint8(0))


def overlay(
    image_rgb: np.ndarray,
    prob_or_mask: np.ndarray,
    threshold: float = 0.5,
    color: tuple[int, int, int] = (0, 255, 0),
    alpha: float = 0.35,
) -> np.ndarray:
    """RGB uint8 image with the mask drawn on it: fill blended at `alpha`, plus a solid contour.

    `prob_or_mask`: float probabilities (foreground where >= threshold) or a uint8/bool mask
    (foreground where non-zero); resized (nearest) to the image if its size differs.
    """
    image_rgb = _as_rgb(image_rgb)
    h, w = image_rgb.shape[:2]
    m = prob_or_mask
    fg = (m >= threshold) if np.issubdtype(m.dtype, np.floating) else (m > 0)
    fg = fg.astype(np.uint8)
    if fg.shape != (h, w):
        fg = cv2.resize(fg, (w, h), interpolation=cv2.INTER_NEAREST)
    out = image_rgb.copy()
    sel = fg.astype(bool)
    out[sel] = (out[sel] * (1.0 - alpha) + np.asarray(color, np.float32) * alpha).astype(np.uint8)
    contours, _ = cv2.findContours(fg, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, tuple(int(c) for c in color), max(1, round(min(h, w) / 200)))
    return out
