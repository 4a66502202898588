"""`polyprune benchmark`: one row per model x size x backend (timing: `latency`, counts: `counting`).

`benchmark_models` makes one row per model x size x backend: all rows are loaded first, then timed in
turns. Peak memory there is the process's resident set size (RSS, /proc/self/statm) sampled every 5 ms
from a helper thread while the model is loaded / the session is built and warmed up: `peak_rss_mb` is
the largest sample and `peak_rss_delta_mb` that minus the RSS just before. It is approximate: memory
freed by an earlier row and kept by the allocator is reused without showing up, so rows after the
first can read low.
"""

from __future__ import annotations

import contextlib
import os
import resource
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polyprune.checks import check_int, check_number, check_size, check_threads
from polyprune.counting import count_macs, count_params
from polyprune.errors import ConfigError
from polyprune.latency import time_round_robin
from polyprune.tta import TTA_VIEWS, check_tta

# ---------------------------------------------------------------------------------------- benchmark

BENCH_BACKENDS = ("torch", "onnxruntime", "openvino")


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # no /proc: the lifetime peak is the best there is
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRSS:
    """Context manager: samples the process RSS every `interval` s; `.peak_mb`, `.delta_mb` after exit."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = _rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def resolve_backends(backends: str | Sequence[str]) -> list[str]:
    """ "all" -> torch, onnxruntime and openvino if installed; otherwise names are validated."""
    names = [backends] if isinstance(backends, str) else list(backends)
    if "all" in names:
        try:
            import openvino  # noqa: F401

            return list(BENCH_BACKENDS)
        except ImportError:
            return ["torch", "onnxruntime"]
    bad = [b for b in names if b not in BENCH_BACKENDS]
    if bad or not names:
        raise ConfigError(
            f"unknown backend {bad[0] if bad else ''!r}; choose from {', '.join(BENCH_BACKENDS)}, all"
        )
    return list(dict.fromkeys(names))


def model_labels(paths: list[Path]) -> list[str]:
    """Short distinct names: the stem, else the file name (a.safetensors vs a.onnx), else run/file.

    Run folders all hold a `model.safetensors`, so the folder name is what tells them apart.
    """
    for make in (lambda p: p.stem, lambda p: p.name, lambda p: f"{p.parent.name}/{p.name}", str):
        labels = [make(p) for p in paths]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def benchmark_models(
    models: Sequence[str | Path],
    sizes: Sequence[int] | None = None,
    backends: str | Sequence[str] = ("torch", "onnxruntime"),
    threads: int | None = None,
    runs: int = 20,
    *,
    warmup: int = 3,
    rounds: int = 5,
    pause_s: float = 0.5,
    progress: bool = False,
    tta: str = "none",
) -> list[dict[str, Any]]:
    """One row per model x size x backend: params, MACs, latency, FPS, peak memory, ratios to models[0].

    `models`: .safetensors model files and/or .onnx files (an .onnx file gets no torch row; a model left
    with no row at all is a ConfigError). `threads` None = torch's current thread count, used for every
    backend. Sizes must be multiples of the model's stride; None: a static .onnx at its own size, the rest at
    352. Every row is loaded and warmed up first, then all are timed in turns (`latency.time_round_robin`:
    `rounds` rounds, a `pause_s` pause before each model's turn), so the speed-ups compare models under
    the same machine load. `tta` other than "none" times one frame's whole test-time augmentation
    (`polyprune.tta`: the views made, run as one batch, turned back and averaged) on every backend, torch
    included, through `Predictor.infer`: what `predict --tta` / `evaluate --tta` cost per frame.

    Row keys: model, name (file stem; file name where two models share a stem), backend, precision,
    size, threads, tta, params, macs, median_ms, p90_ms, min_ms, runs, fps (= 1000 / median_ms),
    peak_rss_mb, peak_rss_delta_mb, speedup (median of the first model's row with the same backend and
    size / this median), params_ratio, macs_ratio (this / first).
    params / macs are None for an .onnx file without polyprune architecture metadata.
    """
    from polyprune.progress import progress_bar

    check_tta(tta)
    names = resolve_backends(backends)
    threads = threads or torch.get_num_threads()
    paths = [Path(m) for m in models]
    _check_benchmark_inputs(paths, names, sizes, threads, runs, warmup)
    check_int("rounds", rounds, low=1, high=10_000)
    check_number("pause_s", pause_s, low=0, high=60)
    labels = model_labels(paths)
    with (
        contextlib.ExitStack() as open_runners,
        tempfile.TemporaryDirectory(prefix="polyprune-bench-") as tmp,
    ):
        rows, calls = [], []
        with progress_bar(total=None, desc="benchmark: load", enabled=progress) as bar:
            for k, path in enumerate(paths):
                for row, call in _load_rows(
                    path, labels[k], k, names, sizes, threads, warmup, Path(tmp), open_runners, tta
                ):
                    rows.append(row)
                    calls.append(call)
                    bar.advance()
        with progress_bar(total=min(rounds, runs), desc="benchmark: time", enabled=progress) as bar:
            lats = time_round_robin(
                calls, runs=runs, warmup=0, rounds=rounds, pause_s=pause_s, on_round=bar.advance
            )
    for row, lat in zip(rows, lats, strict=True):
        row.update(lat.to_dict())
    _add_ratios(rows)
    return rows


def _load_rows(
    path: Path,
    label: str,
    k: int,
    names: list[str],
    sizes: Sequence[int] | None,
    threads: int,
    warmup: int,
    tmp: Path,
    open_runners: contextlib.ExitStack,
    tta: str,
) -> Iterator[tuple[dict[str, Any], Callable[[], object]]]:
    """(row without timings, a warmed-up call of one forward pass) for each size x backend of `path`; peak
    memory is sampled while the model is loaded / the session is built and warmed up."""
    from polyprune.export import export_onnx, read_onnx_metadata
    from polyprune.io import load_model
    from polyprune.models import build_model

    is_onnx = path.suffix.lower() == ".onnx"
    ref = _build_from_arch(read_onnx_metadata(path).arch, build_model) if is_onnx else load_model(path)
    stride = int(getattr(ref, "stride", 1)) if ref is not None else 1
    for size in sizes or [_default_size(path, is_onnx)]:
        check_size(size, stride)
        onnx_path = path
        if not is_onnx and any(b != "torch" for b in names):  # export outside the memory sampling
            onnx_path = tmp / f"{k}_{size}.onnx"
            export_onnx(path, onnx_path, size=size, check=False)
        for backend in names:
            if backend == "torch" and is_onnx:
                continue
            with PeakRSS() as mem:
                call, precision = _runner(backend, path, onnx_path, size, threads, open_runners, tta)
                for _ in range(warmup):
                    call()
            row = {
                "model": str(path), "name": label, "backend": backend, "precision": precision, "size": size,
                "threads": threads, "tta": tta,
                "params": count_params(ref) if ref is not None else None,
                "macs": count_macs(ref, size) if ref is not None else None,
                "file_mb": path.stat().st_size / 2**20,  # what a deployment ships
                "peak_rss_mb": mem.peak_mb, "peak_rss_delta_mb": mem.delta_mb,
            }  # fmt: skip
            yield row, call


def _runner(
    backend: str,
    path: Path,
    onnx_path: Path,
    size: int,
    threads: int,
    open_runners: contextlib.ExitStack,
    tta: str = "none",
) -> tuple[Callable[[], object], str]:
    """One frame's forward pass (batch 1; with `tta`, all its views) on `backend` as a call, and the
    backend's precision name."""
    from polyprune.io import load_model
    from polyprune.latency import open_runtime, runtime_infer, torch_forward

    if backend == "torch":
        torch.set_num_threads(threads)
        if tta == "none":  # the bare module, as before: no Predictor around it
            return torch_forward(load_model(path), size), "f32"
    source = path if backend == "torch" else onnx_path
    p = open_runners.enter_context(open_runtime(backend, source, size, threads=threads, tta=tta))
    return runtime_infer(p, size), p.precision  # tta "none": one batch-1 predict_logits call


def _check_benchmark_inputs(
    paths: list[Path], names: list[str], sizes: Sequence[int] | None, threads: int, runs: int, warmup: int
) -> None:
    if not paths:
        raise ConfigError("benchmark needs at least one model")
    if runs < 1 or warmup < 0:
        raise ConfigError(f"runs must be >= 1 and warmup >= 0, got {runs}, {warmup}")
    for p in paths:
        if p.suffix.lower() == ".onnx" and names == ["torch"]:
            raise ConfigError(f"{p} is an ONNX file: it has no torch backend (use onnxruntime or openvino)")
        if not p.is_file():
            raise ConfigError(f"model file not found: {p}")
    if sizes is not None and not sizes:
        raise ConfigError("benchmark needs at least one size")
    check_threads(threads)
    check_int("runs", runs, low=1, high=100_000)
    check_int("warmup", warmup, low=0, high=100_000)


DEFAULT_BENCH_SIZE = 352  # the field's input size


def _default_size(path: Path, is_onnx: bool) -> int:
    """No --size: a static .onnx runs at its own size (it cannot run at another), the rest at 352."""
    from polyprune.export import onnx_static_size

    return (onnx_static_size(path) if is_onnx else None) or DEFAULT_BENCH_SIZE


def _build_from_arch(arch: dict[str, Any] | None, build_model: Callable[..., nn.Module]) -> nn.Module | None:
    """A randomly initialized module of the .onnx file's architecture (for params / MACs), or None."""
    if not arch or not arch.get("name"):
        return None
    cfg = {k: v for k, v in arch.items() if k != "name"}
    return build_model(arch["name"], **cfg).eval()


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """speedup / params_ratio / macs_ratio against the first model's row of the same backend and size."""
    first = rows[0]["model"] if rows else None
    refs: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        if r["model"] == first:
            refs.setdefault((r["backend"], r["size"]), r)  # a file listed twice: its first rows
    for r in rows:
        ref = refs.get((r["backend"], r["size"]))
        r["speedup"] = ref["median_ms"] / r["median_ms"] if ref and r["median_ms"] > 0 else None
        r["params_ratio"] = r["params"] / ref["params"] if ref and ref["params"] and r["params"] else None
        r["macs_ratio"] = r["macs"] / ref["macs"] if ref and ref["macs"] and r["macs"] else None


def system_info() -> dict[str, Any]:
    """Where the numbers were measured: CPU, cores, library versions."""
    import platform

    info: dict[str, Any] = {
        "cpu": _cpu_name() or platform.processor(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for mod in ("onnxruntime", "openvino"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


def _cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def benchmark_table(rows: list[dict[str, Any]]) -> Any:
    """A rich Table of `benchmark_models` rows (speed-up and ratio columns against the first model)."""
    from rich.table import Table

    title = "latency at batch 1 (ms)"
    tta = rows[0].get("tta", "none") if rows else "none"
    if tta != "none":
        title = f"latency per frame (ms) with TTA {tta}: {len(TTA_VIEWS[tta])} views each"
    table = Table(title=title, header_style="bold")
    for col in ("model", "backend", "prec", "size", "params", "GMACs", "median", "p90", "min", "FPS"):
        table.add_column(col, justify="left" if col in ("model", "backend", "prec") else "right")
    for col in ("file MB", "mem +MB", "speed-up", "params x", "MACs x"):
        table.add_column(col, justify="right")

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for r in rows:
        table.add_row(
            r["name"],
            r["backend"],
            r["precision"],
            str(r["size"]),
            num(r["params"] and r["params"] / 1e6, ".3f") + ("M" if r["params"] else ""),
            num(r["macs"] and r["macs"] / 1e9, ".3f"),
            num(r["median_ms"], ".2f"),
            num(r["p90_ms"], ".2f"),
            num(r["min_ms"], ".2f"),
            num(r["fps"], ".1f"),
            num(r.get("file_mb"), ".1f"),
            num(r["peak_rss_delta_mb"], ".0f"),
            num(r["speedup"], ".2f") + ("x" if r["speedup"] else ""),
            num(r["params_ratio"], ".3f"),
            num(r["macs_ratio"], ".3f"),
        )
    return table
