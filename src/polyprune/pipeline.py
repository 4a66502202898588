"""The frame loop of video prediction: decode -> preprocess -> inference -> postprocess -> write, either
sequential or as a threaded stream (bounded queues, so a slow stage holds the decoder back instead of
filling memory), with per-stage times, and `simulate_realtime` (what a live source at a given FPS would
have seen: latency, drops)."""

from __future__ import annotations

import queue
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from polyprune.predictor import Predictor, overlay, to_mask

STAGES = ("decode", "preprocess", "inference", "postprocess", "write")


class PipelineRun:
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
        p90 = {s: percentile(v, 0.9) for s, v in self.times.items()}
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


def percentile(values: list[float], q: float) -> float:
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


def run_pipeline(
    predictor: Predictor,
    frames: Iterator[tuple[str, np.ndarray]],
    sink: Callable[[str, np.ndarray, np.ndarray], None],
    total: int | None,
    *,
    stream: bool,
    progress: bool,
    queue_size: int,
    fps: float | None = None,
) -> PipelineRun:
    from polyprune.progress import progress_bar

    run = PipelineRun(fps, queue_size, stream)
    threshold = predictor.input_spec.threshold

    def process(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[float]]:
        t0 = time.perf_counter()
        x = predictor.preprocess(rgb)
        t1 = time.perf_counter()
        logits = predictor.infer(x)  # the TTA views, if any, count as inference
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
    run: PipelineRun,
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
    run: PipelineRun,
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
