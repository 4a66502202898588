"""Latency of one forward pass at batch 1: warm-up runs first, then `runs` timed runs; median, p90 and min
in milliseconds. `torch_latency` times eager torch; `onnxruntime_latency` / `int8_latency` /
`openvino_latency` time the runtime call on a preprocessed input through `predictor.Predictor` (the same
session settings as deployment)."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from polyprune.io import InputSpec

if TYPE_CHECKING:
    from polyprune.predictor import Predictor


@dataclass
class Latency:
    median_ms: float
    p90_ms: float
    min_ms: float
    runs: int

    @property
    def fps(self) -> float:
        return 1000.0 / self.median_ms if self.median_ms > 0 else float("inf")

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "fps": self.fps}


def time_callable(fn: Callable[[], object], *, runs: int = 20, warmup: int = 3) -> Latency:
    """Median / p90 / min wall time of `fn()` over `runs` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return _summary(times)


def time_interleaved(calls: list[Callable[[], object]], *, runs: int, warmup: int) -> list[float]:
    """Median ms of each call, timing them in turn within every run: load that comes and goes shifts them
    alike, not their differences (what a comparison of the calls needs)."""
    for _ in range(warmup):
        for call in calls:
            call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(runs):
        for call, ts in zip(calls, times, strict=True):
            t0 = time.perf_counter()
            call()
            ts.append((time.perf_counter() - t0) * 1000.0)
    return [statistics.median(ts) for ts in times]


def time_round_robin(
    calls: Sequence[Callable[[], object]],
    *,
    runs: int = 20,
    warmup: int = 3,
    rounds: int = 5,
    pause_s: float = 0.5,
    rewarm: int = 2,
    on_round: Callable[[], None] | None = None,
) -> list[Latency]:
    """Latency of each call, timed in turn: `rounds` rounds in which every call gets its share of `runs`
    timed runs (`runs` in all), each share after a `pause_s` pause and `rewarm` untimed runs.

    Why: models timed one after another minutes apart see different machine load, so their ratio (a
    speed-up) drifts; in turns they share it. The pause lets the previous runtime's idle thread pool stop
    spinning (ONNX Runtime's spin for a while after a run and slowed the next model up to 1.6x here)."""
    for call in calls:
        for _ in range(warmup):
            call()
    n_rounds = max(1, min(rounds, runs))
    shares = [runs // n_rounds + (i < runs % n_rounds) for i in range(n_rounds)]
    times: list[list[float]] = [[] for _ in calls]
    for share in shares:
        for call, ts in zip(calls, times, strict=True):
            if pause_s > 0:
                time.sleep(pause_s)
            for _ in range(rewarm):
                call()
            for _ in range(share):
                t0 = time.perf_counter()
                call()
                ts.append((time.perf_counter() - t0) * 1000.0)
        if on_round is not None:
            on_round()
    return [_summary(ts) for ts in times]


def _summary(times: list[float]) -> Latency:
    times = sorted(times)
    p90 = times[min(len(times) - 1, round(0.9 * (len(times) - 1)))]
    return Latency(median_ms=statistics.median(times), p90_ms=p90, min_ms=times[0], runs=len(times))


def torch_latency(
    model: nn.Module, size: int, *, runs: int = 20, warmup: int = 3, threads: int | None = None
) -> Latency:
    """Eager torch latency at batch 1 (eval, inference mode) on the model's device."""
    if threads:
        torch.set_num_threads(threads)
    return time_callable(torch_forward(model, size), runs=runs, warmup=warmup)


def torch_forward(model: nn.Module, size: int) -> Callable[[], None]:
    """One eager batch-1 forward pass of `model` (eval, inference mode) on its device, as a call."""
    device = next(model.parameters()).device
    model.eval()
    x = torch.randn(1, 3, size, size, device=device)

    def run() -> None:
        with torch.inference_mode():
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return run


# ---------------------------------------------------------------------------------------- runtimes


def input_spec_at(model_or_path: str | Path | nn.Module, size: int) -> InputSpec:
    """The model's InputSpec (ImageNet defaults if it has none) with `size` replaced."""
    if isinstance(model_or_path, nn.Module):
        meta = getattr(model_or_path, "polyprune_meta", None)
        spec = meta.input if meta else InputSpec.for_model(model_or_path)
    elif Path(model_or_path).suffix.lower() == ".onnx":
        from polyprune.export import read_onnx_metadata

        spec = read_onnx_metadata(model_or_path).input or InputSpec()
    else:
        from polyprune.io import read_metadata

        spec = read_metadata(model_or_path).input
    return replace(spec, size=int(size))


def runtime_latency(
    backend: str,
    model_or_path: str | Path | nn.Module,
    size: int,
    *,
    runs: int,
    warmup: int,
    threads: int | None,
    precision: str | None = None,
) -> tuple[Latency, str]:
    """Latency of `Predictor.predict_logits` at batch 1 and the runtime's precision name."""
    with open_runtime(backend, model_or_path, size, threads=threads, precision=precision) as p:
        lat = time_callable(runtime_forward(p, size), runs=runs, warmup=warmup)
        return lat, p.precision


def open_runtime(
    backend: str,
    model_or_path: str | Path | nn.Module,
    size: int,
    *,
    threads: int | None,
    precision: str | None = None,
    tta: str = "none",
) -> Predictor:
    """A Predictor on `backend` for batch-1 input at `size`, with the model's own preprocessing."""
    from polyprune.predictor import Predictor

    spec = input_spec_at(model_or_path, size)
    return Predictor(
        model_or_path, backend=backend, threads=threads, input_spec=spec, precision=precision, tta=tta
    )


def runtime_forward(predictor: Predictor, size: int) -> Callable[[], object]:
    """One `predict_logits` call of `predictor` on a fixed random preprocessed batch-1 input."""
    x = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
    return lambda: predictor.predict_logits(x)


def runtime_infer(predictor: Predictor, size: int) -> Callable[[], object]:
    """One `infer` call of `predictor` (all its TTA views, turned back and averaged) on a fixed random
    preprocessed input."""
    x = np.random.default_rng(0).standard_normal((3, size, size), dtype=np.float32)
    return lambda: predictor.infer(x)


def onnxruntime_latency(
    model_or_onnx_path: str | Path | nn.Module,
    size: int,
    *,
    runs: int = 20,
    warmup: int = 3,
    threads: int | None = None,
) -> Latency:
    """ONNX Runtime (CPU) latency at batch 1. A module or .safetensors file is first exported (static, at
    `size`) to a temporary file; a static .onnx file must have been exported at `size`."""
    return runtime_latency(
        "onnxruntime", model_or_onnx_path, size, runs=runs, warmup=warmup, threads=threads
    )[0]


def int8_latency(
    model: nn.Module,
    size: int,
    calib: Sequence[str | Path],
    *,
    backend: str = "onnxruntime",
    runs: int = 20,
    warmup: int = 3,
    threads: int | None = None,
) -> Latency:
    """Latency of the model as it would be deployed in INT8: exported at `size`, quantized statically
    (ONNX Runtime's quantizer, calibrated on `calib` images), then timed on `backend`."""
    from polyprune.export import export_onnx
    from polyprune.quantize import quantize_onnx

    with tempfile.TemporaryDirectory(prefix="polyprune-int8-lat-") as tmp:
        fp32 = export_onnx(model, Path(tmp) / "fp32.onnx", size=size, check=False).path
        quantize_onnx(fp32, Path(tmp) / "int8.onnx", calib, min_agreement=0.0, threads=threads)
        return runtime_latency(
            backend, Path(tmp) / "int8.onnx", size, runs=runs, warmup=warmup, threads=threads
        )[0]


def openvino_latency(
    model_or_onnx_path: str | Path | nn.Module,
    size: int,
    *,
    runs: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    precision: str | None = None,
) -> Latency:
    """OpenVINO (CPU) latency at batch 1; the model is reshaped to a static (1, 3, size, size).

    `precision` None = OpenVINO's default for the CPU (bf16 where the CPU has AVX512_BF16 / AMX).
    ConfigError if openvino is not installed (optional extra `polyprune[openvino]`).
    """
    return runtime_latency(
        "openvino", model_or_onnx_path, size, runs=runs, warmup=warmup, threads=threads, precision=precision
    )[0]
