"""Inference: `Predictor` (torch / ONNX Runtime / OpenVINO), overlays, and image, folder and video prediction.

    p = Predictor("model.onnx")                     # backend "auto": .onnx -> onnxruntime, else torch
    prob = p.predict(rgb_uint8)                     # float32 (H, W) in [0, 1] at the image's own size
    mask = p.predict_mask(rgb_uint8)                # uint8 (H, W) in {0, 255}: prob >= spec.threshold
    vis = overlay(rgb_uint8, mask)                  # RGB uint8: translucent fill + contour
    predict_path(p, "video.mp4", "out/", stream=True)

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
import os
import queue
import statistics
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from polyprune.data import _quiet_opencv, preprocess_image
from polyprune.errors import ConfigError, DataError, ModelFileError, OutputError
from polyprune.io import InputSpec, _short, atomic_path, atomic_write_bytes, load_model, write_json
from polyprune.quantize import INT8_KEY

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".mpg", ".mpeg", ".webm", ".wmv")


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
    ) -> None:
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
        if INT8_KEY in self._session.get_modelmeta().custom_metadata_map:
            self.precision = "int8"
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
            raise ModelFileError(f"OpenVINO cannot read {path} ({_short(exc)})") from exc
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

    def predict(self, image_rgb: np.ndarray) -> np.ndarray:
        """RGB uint8 (H, W, 3) -> float32 (H, W) probabilities in [0, 1]."""
        image_rgb = _as_rgb(image_rgb)
        logits = self.predict_logits(self.preprocess(image_rgb)[None])[0, 0]
        return self.postprocess(logits, image_rgb.shape[:2])

    def predict_mask(self, image_rgb: np.ndarray) -> np.ndarray:
        """RGB uint8 (H, W, 3) -> uint8 (H, W) mask in {0, 255}: probability >= the spec's threshold."""
        return to_mask(self.predict(image_rgb), self.input_spec.threshold)

    def describe(self) -> dict[str, Any]:
        """JSON-able summary: backend, source, threads, input spec, precision (openvino)."""
        return {
            "backend": self.backend,
            "model": self.source,
            "threads": self.threads,
            "input": self.input_spec.to_dict(),
            "precision": self.precision,
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
        return f"Predictor({self.source!r}, backend={self.backend!r}, size={self.input_spec.size})"


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


# ---------------------------------------------------------------------------------------------- paths


def predict_path(
    predictor: Predictor,
    source: str | Path,
    out_dir: str | Path,
    *,
    stream: bool = False,
    progress: bool = True,
    queue_size: int = 8,
) -> dict[str, Any]:
    """Predict an image, an image folder or a video file; write the outputs and `<out>/predict.json`.

    Outputs. Images (one file, or a folder read by `data.find_samples(require_masks=False)`: its image
    sub-folder (images/, img/, original/...) if it has one, else the image files directly inside it):
    `<out>/masks/<stem>.png` (uint8 {0,255}, source size) and
    `<out>/overlays/<stem>.png` (RGB overlay). Video (mp4/avi/... via OpenCV): `<out>/<stem>_overlay.mp4`
    (mp4v), or `<stem>_overlay.avi` (MJPG) where OpenCV cannot write mp4; one output frame per input
    frame, at the source FPS and size. Every file is written atomically.

    Timing. Per frame, in ms: decode (read + colour conversion), preprocess, inference, postprocess
    (sigmoid, resize, threshold, overlay), write (encode + write); the result holds their median and
    p90, and `fps` = frames / wall time of the whole loop (end to end, decode to last write).

    `stream=False`: the stages run one after another in this thread.
    `stream=True`: three threads: a reader decodes ahead into a bounded queue (`queue_size` frames), this
    thread preprocesses, infers and post-processes, a writer encodes and writes. Queues block when full,
    so an offline run still processes and writes EVERY frame, in order.

    Real-time accounting (videos): a live camera delivers frame i at i / fps_source. The result's
    `realtime` entry replays the measured per-frame service times (stream: this thread's time per frame,
    the pipeline's bottleneck; sequential: all five stages) against that schedule with one worker and a
    buffer of `queue_size` waiting frames. A frame arriving while the buffer is full is one that a live
    pipeline would drop: `dropped` counts them (`dropped_indices` lists the first 100); `over_budget`
    counts frames whose own service time exceeded the frame interval 1000 / fps_source ms;
    `max_latency_ms` is the worst arrival-to-done time (queueing + service) of the frames kept. Nothing is
    dropped from the actual outputs: these are counts, reported, never silent losses.
    """
    source, out_dir = Path(source), Path(out_dir)
    if not source.exists():
        raise DataError(f"source not found: {source}")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output folder {out_dir} is a file")
    if queue_size < 1:
        raise ConfigError(f"queue_size must be >= 1, got {queue_size}")
    check_output_folder(source, out_dir)
    if source.is_file() and source.suffix.lower() in VIDEO_EXTS:
        result = _predict_video(
            predictor, source, out_dir, stream=stream, progress=progress, queue_size=queue_size
        )
    else:
        result = _predict_images(
            predictor, source, out_dir, stream=stream, progress=progress, queue_size=queue_size
        )
    result = {"source": str(source), "out": str(out_dir), **predictor.describe(), "stream": stream, **result}
    write_json(out_dir / "predict.json", result)
    return result


def check_output_folder(source: Path, out_dir: Path) -> None:
    """Predictions must never land on the user's data: refuse an --out that is the source folder, lies
    inside it, or already holds images that an earlier predict did not write (a dataset's masks/, say).
    """
    from polyprune.data import IMAGE_EXTS

    src_root = (source if source.is_dir() else source.parent).resolve()
    out = out_dir.resolve()
    if source.is_dir() and (out == src_root or src_root in out.parents):
        raise ConfigError(
            f"--out {out_dir} is inside the source folder {source}: predictions would mix with it"
        )
    if not out.is_dir() or (out / "predict.json").is_file():  # new, or an earlier predict's folder
        return
    folders = [out, out / "masks", out / "overlays"]
    foreign = next(
        (p for f in folders if f.is_dir() for p in f.iterdir() if p.suffix.lower() in IMAGE_EXTS),
        None,
    )
    if foreign is not None:
        raise ConfigError(
            f"--out {out_dir} already holds images polyprune did not write ({foreign}): a dataset "
            "folder? Choose another --out"
        )


def list_images(source: Path) -> list[tuple[str, Path]]:
    """(output name, path) of the images to predict: the file itself, or a folder's images found by
    `data.find_samples(require_masks=False)` (its image sub-folder if it has one, else its own files)."""
    from polyprune.data import IMAGE_EXTS, find_samples

    if source.is_file():
        if source.suffix.lower() not in IMAGE_EXTS:
            kinds = f"an image ({', '.join(IMAGE_EXTS)}) nor a video ({', '.join(VIDEO_EXTS)})"
            raise DataError(f"{source} is neither {kinds}")
        return [(source.stem, source)]
    return [(sample.id, sample.image) for sample in find_samples(source, require_masks=False)]


def _predict_images(
    predictor: Predictor, source: Path, out_dir: Path, *, stream: bool, progress: bool, queue_size: int
) -> dict[str, Any]:
    from polyprune.data import read_image

    files = list_images(source)

    def frames() -> Iterator[tuple[str, np.ndarray]]:
        for name, path in files:
            yield name, read_image(path)

    def sink(name: str, mask: np.ndarray, vis: np.ndarray) -> None:
        atomic_write_bytes(out_dir / "masks" / f"{name}.png", _png(mask))
        atomic_write_bytes(out_dir / "overlays" / f"{name}.png", _png(cv2.cvtColor(vis, cv2.COLOR_RGB2BGR)))

    run = _run_pipeline(
        predictor, frames(), sink, len(files), stream=stream, progress=progress, queue_size=queue_size
    )
    kind = "folder" if source.is_dir() else "image"
    outputs = {"masks": str(out_dir / "masks"), "overlays": str(out_dir / "overlays")}
    return {"kind": kind, **run.summary(), "outputs": outputs}


def _predict_video(
    predictor: Predictor, source: Path, out_dir: Path, *, stream: bool, progress: bool, queue_size: int
) -> dict[str, Any]:
    # FFmpeg prints its own lines ("moov atom not found") for a broken file; the error below is the one
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET; read when FFmpeg is first opened
    cap = cv2.VideoCapture(str(source))
    if not cap.isOpened():
        raise DataError(f"cannot open video {source} (OpenCV could not decode it)")
    fps = cap.get(cv2.CAP_PROP_FPS)
    fps = fps if fps and np.isfinite(fps) and fps > 0 else 30.0  # some containers report 0
    w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    declared = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    if w <= 0 or h <= 0:
        cap.release()
        raise DataError(f"{source}: OpenCV reports no frame size; not a readable video")

    def frames() -> Iterator[tuple[str, np.ndarray]]:
        try:
            i = 0
            while True:
                ok, bgr = cap.read()
                if not ok:
                    return
                yield str(i), cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                i += 1
        finally:
            cap.release()

    last_error = ""
    for fourcc, ext in (("mp4v", ".mp4"), ("MJPG", ".avi")):
        final = out_dir / f"{source.stem}_overlay{ext}"
        try:
            with atomic_path(final, suffix=ext) as tmp:  # suffix picks OpenCV's container
                writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
                if not writer.isOpened():
                    writer.release()
                    raise _CodecUnavailable(fourcc)

                def sink(name: str, mask: np.ndarray, vis: np.ndarray, writer: Any = writer) -> None:
                    bgr = cv2.cvtColor(vis, cv2.COLOR_RGB2BGR)
                    if bgr.shape[:2] != (h, w):  # a frame of another size would be dropped silently
                        bgr = cv2.resize(bgr, (w, h), interpolation=cv2.INTER_AREA)
                    writer.write(bgr)

                try:
                    with _quiet_opencv():  # "Failed to write frame" per frame; reported once below
                        run = _run_pipeline(
                            predictor,
                            frames(),
                            sink,
                            declared or None,
                            stream=stream,
                            progress=progress,
                            queue_size=queue_size,
                            fps=fps,
                        )
                finally:
                    writer.release()
                if run.frames == 0:
                    raise DataError(f"no frames could be decoded from {source}")
                _check_written_video(tmp, final, run.frames)
            break
        except _CodecUnavailable:
            last_error = fourcc
    else:
        cap.release()
        raise ConfigError(f"OpenCV cannot write mp4v or MJPG video here (tried up to {last_error})")
    video = {"fps": fps, "width": w, "height": h, "frames_declared": declared, "codec": fourcc}
    return {"kind": "video", **run.summary(), "video": video, "outputs": {"video": str(final)}}


def _check_written_video(tmp: Path, final: Path, frames: int) -> None:
    """OpenCV's VideoWriter drops what it cannot write (a full disk) without an error, and the file
    then lacks its index: read the count back before the file is renamed into place."""
    cap = cv2.VideoCapture(str(tmp))
    try:
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if cap.isOpened() else 0
    finally:
        cap.release()
    if count < frames:
        raise OutputError(
            f"cannot write {final}: only {count} of {frames} frames reached the file (disk full?)"
        )


class _CodecUnavailable(Exception):
    """Internal: this fourcc cannot be written here; the next one is tried."""


def _png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise DataError("PNG encoding failed")
    return buf.tobytes()


def predict_summary(result: dict[str, Any]) -> str:
    """The one-line summary of a `predict_path` result (plus a real-time line for videos)."""
    lat = result["latency_ms"]
    stages = ", ".join(f"{s} {lat[s]:.1f}" for s in STAGES)
    where = result["outputs"].get("video") or result["out"]
    line = (
        f"{result['frames']} frames ({result['backend']}, {'stream' if result['stream'] else 'sequential'}) "
        f"-> {where}: {result['fps']:.1f} FPS end to end; median ms per frame: {stages}"
    )
    rt = result.get("realtime")
    if rt:
        line += (
            f"\nreal time at the source's {rt['source_fps']:g} FPS ({rt['budget_ms']:.1f} ms per frame): "
            f"{rt['dropped']} of {result['frames']} frames would be dropped (buffer {rt['queue_size']}), "
            f"{rt['over_budget']} over budget, worst latency {rt['max_latency_ms']:.0f} ms; "
            "all frames were written"
        )
    return line


# ---------------------------------------------------------------------------------------------- pipeline

STAGES = ("decode", "preprocess", "inference", "postprocess", "write")


class _Run:
    """Per-frame stage times (ms), service times (ms) and wall time of one prediction loop."""

    def __init__(self, fps: float | None, queue_size: int, stream: bool) -> None:
        self.times: dict[str, list[float]] = {s: [] for s in STAGES}
        self.service: list[float] = []
        self.wall_s = 0.0
        self.fps, self.queue_size, self.stream = fps, queue_size, stream

    @property
    def frames(self) -> int:
        return len(self.service)

    def summary(self) -> dict[str, Any]:
        med = {s: statistics.median(v) if v else 0.0 for s, v in self.times.items()}
        p90 = {s: _percentile(v, 0.9) for s, v in self.times.items()}
        out: dict[str, Any] = {
            "frames": self.frames,
            "wall_s": self.wall_s,
            "fps": self.frames / self.wall_s if self.wall_s > 0 else 0.0,
            "latency_ms": med,
            "latency_ms_p90": p90,
            "latency_ms_total": sum(med.values()),
        }
        if self.fps:
            out["realtime"] = simulate_realtime(self.service, self.fps, self.queue_size)
        return out


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def simulate_realtime(service_ms: list[float], fps: float, queue_size: int) -> dict[str, Any]:
    """Replay service times against a live source at `fps` (see `predict_path`); pure, deterministic.

    Frame i arrives at i * 1000 / fps ms. One worker serves frames first-in first-out; at most
    `queue_size` frames wait. A frame arriving to a full buffer is dropped (it never consumes service).
    """
    interval = 1000.0 / fps
    waiting: deque[int] = deque()
    free_at = 0.0  # when the worker finishes its current frame
    dropped: list[int] = []
    max_latency = 0.0

    def serve_until(t: float) -> None:
        nonlocal free_at, max_latency
        while waiting and free_at <= t:
            j = waiting.popleft()
            start = max(free_at, j * interval)
            free_at = start + service_ms[j]
            max_latency = max(max_latency, free_at - j * interval)

    for i in range(len(service_ms)):
        arrival = i * interval
        serve_until(arrival)
        if len(waiting) >= queue_size:
            dropped.append(i)
        else:
            waiting.append(i)
            serve_until(arrival)  # an idle worker starts it at once
    serve_until(float("inf"))
    return {
        "source_fps": fps,
        "budget_ms": interval,
        "queue_size": queue_size,
        "dropped": len(dropped),
        "dropped_indices": dropped[:100],
        "over_budget": sum(s > interval for s in service_ms),
        "max_latency_ms": max_latency,
        "realtime": not dropped,
    }


def _run_pipeline(
    predictor: Predictor,
    frames: Iterator[tuple[str, np.ndarray]],
    sink: Callable[[str, np.ndarray, np.ndarray], None],
    total: int | None,
    *,
    stream: bool,
    progress: bool,
    queue_size: int,
    fps: float | None = None,
) -> _Run:
    from polyprune.progress import progress_bar

    run = _Run(fps, queue_size, stream)
    threshold = predictor.input_spec.threshold

    def process(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[float]]:
        t0 = time.perf_counter()
        x = predictor.preprocess(rgb)
        t1 = time.perf_counter()
        logits = predictor.predict_logits(x[None])[0, 0]
        t2 = time.perf_counter()
        mask = to_mask(predictor.postprocess(logits, rgb.shape[:2]), threshold)
        vis = overlay(rgb, mask, color=(0, 255, 0))
        t3 = time.perf_counter()
        return mask, vis, [(t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3]

    with progress_bar(total=total, desc="predict", enabled=progress) as bar:
        t_start = time.perf_counter()
        if stream:
            _stream(frames, process, sink, run, bar, queue_size)
        else:
            _sequential(frames, process, sink, run, bar)
        run.wall_s = time.perf_counter() - t_start
    return run


def _sequential(
    frames: Iterator[tuple[str, np.ndarray]],
    process: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, list[float]]],
    sink: Callable[[str, np.ndarray, np.ndarray], None],
    run: _Run,
    bar: Any,
) -> None:
    """Decode, process and write each frame in turn, in this thread."""
    try:
        while True:
            t0 = time.perf_counter()
            item = next(frames, None)
            decode_ms = (time.perf_counter() - t0) * 1e3
            if item is None:
                break
            name, rgb = item
            mask, vis, stage_ms = process(rgb)
            t1 = time.perf_counter()
            sink(name, mask, vis)
            write_ms = (time.perf_counter() - t1) * 1e3
            for s, v in zip(STAGES, [decode_ms, *stage_ms, write_ms], strict=True):
                run.times[s].append(v)
            run.service.append(decode_ms + sum(stage_ms) + write_ms)
            bar.advance()
    finally:
        _close(frames)


_DONE = object()


def _close(frames: Iterator[Any]) -> None:
    """Close a frame generator early (releases a VideoCapture held in its `finally`)."""
    close = getattr(frames, "close", None)
    if close is not None:
        close()


def _stream(
    frames: Iterator[tuple[str, np.ndarray]],
    process: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, list[float]]],
    sink: Callable[[str, np.ndarray, np.ndarray], None],
    run: _Run,
    bar: Any,
    queue_size: int,
) -> None:
    """Reader thread -> this thread (process) -> writer thread, bounded queues, errors re-raised here."""
    q_in: queue.Queue = queue.Queue(maxsize=queue_size)
    q_out: queue.Queue = queue.Queue(maxsize=queue_size)
    stop = threading.Event()
    errors: list[BaseException] = []

    def put(q: queue.Queue, item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def get(q: queue.Queue) -> object:
        while True:
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                if stop.is_set():
                    return _DONE

    def reader() -> None:
        try:
            while not stop.is_set():
                t0 = time.perf_counter()
                item = next(frames, None)
                ms = (time.perf_counter() - t0) * 1e3
                if item is None or not put(q_in, (*item, ms)):
                    break
        except BaseException as exc:
            errors.append(exc)
            stop.set()
        finally:
            _close(frames)  # in this thread: a generator cannot be closed from another one while running
            put(q_in, _DONE)

    def writer() -> None:
        try:
            while not stop.is_set() and (item := get(q_out)) is not _DONE:  # after an error: stop at once
                name, mask, vis = item  # type: ignore[misc]
                t0 = time.perf_counter()
                sink(name, mask, vis)
                run.times["write"].append((time.perf_counter() - t0) * 1e3)
                bar.advance()
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=reader, daemon=True), threading.Thread(target=writer, daemon=True)]
    for t in threads:
        t.start()
    try:
        while (item := get(q_in)) is not _DONE and not stop.is_set():
            t0 = time.perf_counter()
            name, rgb, decode_ms = item  # type: ignore[misc]
            mask, vis, stage_ms = process(rgb)
            if not put(q_out, (name, mask, vis)):
                break
            run.service.append((time.perf_counter() - t0) * 1e3)
            run.times["decode"].append(decode_ms)
            for s, v in zip(STAGES[1:4], stage_ms, strict=True):
                run.times[s].append(v)
        put(q_out, _DONE)
    except BaseException:
        stop.set()
        raise
    finally:
        threads[1].join()
        stop.set()  # the reader may be blocked on a full queue after an error
        threads[0].join()
    if errors:
        raise errors[0]
