"""Live prediction: a camera (index or /dev/videoN) or a network stream (rtsp://, http(s)://) segmented
while it plays, shown (`--show`), served as MJPEG (`--serve`) and / or recorded (`--record`).

A live view must never fall behind its source, so a capture thread reads the source as fast as it
delivers and keeps only the newest frame, stamped with its capture time; the segmentation loop takes
the newest frame each time, and every frame it never took counts as dropped. Latency per frame is
capture -> overlay ready (and -> first sent to a viewer, for --serve); the summary holds median,
p90 and p99 of both, captured, processed and dropped frames.

Ends: the source stops (after frames: the summary; before any frame: a DataError), `max_frames` or
`duration_s` is reached, or Ctrl-C (the summary, `interrupted: true`).
"""

from __future__ import annotations

import os
import re
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from polyprune.errors import ConfigError, DataError
from polyprune.files import atomic_path
from polyprune.pipeline import percentile
from polyprune.predictor import Predictor, overlay, to_mask

STREAM_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://")
OPEN_TIMEOUT_MS = 5000  # a URL that does not answer fails in seconds, not minutes
READ_TIMEOUT_MS = 5000


def is_live_source(source: str | Path) -> bool:
    s = str(source)
    return s.isdigit() or bool(re.fullmatch(r"/dev/video\d+", s)) or s.lower().startswith(STREAM_SCHEMES)


def open_source(source: str) -> cv2.VideoCapture:
    """A cv2.VideoCapture on a device index, /dev/videoN or stream URL; DataError if it does not open."""
    from polyprune.images import quiet_opencv

    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # FFmpeg's own lines would repeat the error below
    with quiet_opencv():  # OpenCV's WARN lines too
        cap, what = _open(source)
    if not cap.isOpened():
        cap.release()
        raise DataError(f"cannot open {what} (no such device, or the address does not answer)")
    return cap


def _open(source: str) -> tuple[cv2.VideoCapture, str]:
    if source.isdigit():
        cap, what = cv2.VideoCapture(int(source)), f"camera {source}"
    elif source.startswith("/dev/video"):
        cap, what = cv2.VideoCapture(source, cv2.CAP_V4L2), f"camera {source}"
    else:
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            OPEN_TIMEOUT_MS,
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            READ_TIMEOUT_MS,
        ]
        cap, what = cv2.VideoCapture(source, cv2.CAP_FFMPEG, params), f"stream {source}"
    return cap, what


@dataclass
class Frame:
    index: int  # position in the source (0, 1, ...): gaps are dropped frames
    captured: float  # time.perf_counter() when it was read
    rgb: np.ndarray


class LiveCapture:
    """Reads `cap` in a thread; `newest()` returns the most recent frame not yet returned."""

    def __init__(self, cap: Any) -> None:
        self.cap = cap
        self._cond = threading.Condition()
        self._latest: Frame | None = None
        self._taken = -1  # index of the last frame handed out
        self.captured = 0
        self.ended = False
        self.error: str | None = None
        self._stop = threading.Event()
        self.fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0) if hasattr(cap, "get") else 0.0
        self.thread = threading.Thread(target=self._read, name="polyprune-capture", daemon=True)

    def start(self) -> LiveCapture:
        self.thread.start()
        return self

    def _read(self) -> None:
        try:
            while not self._stop.is_set():
                ok, bgr = self.cap.read()
                if not ok or bgr is None:
                    break
                frame = Frame(self.captured, time.perf_counter(), cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                with self._cond:
                    self._latest = frame
                    self.captured += 1
                    self._cond.notify_all()
        except Exception as exc:  # a stream that breaks mid-way ends the run with its summary
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            with self._cond:
                self.ended = True
                self._cond.notify_all()

    def newest(self, timeout: float = READ_TIMEOUT_MS / 1000) -> Frame | None:
        """The newest frame after the last one returned; None once the source has ended (or timed out)."""
        with self._cond:
            self._cond.wait_for(
                lambda: self.ended or (self._latest is not None and self._latest.index > self._taken), timeout
            )
            if self._latest is None or self._latest.index <= self._taken:
                return None
            self._taken = self._latest.index
            return self._latest

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=2)
        self.cap.release()


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"median": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    return {"median": statistics.median(values), "p90": percentile(values, 0.9), "p99": percentile(values, 0.99),
            "max": max(values)}  # fmt: skip


class LiveStats:
    """The running numbers of a live run (shared with the viewer page)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.latency_ms: list[float] = []
        self.processed = 0
        self.dropped = 0

    def add(self, frame: Frame, ready: float, previous_index: int) -> None:
        self.latency_ms.append((ready - frame.captured) * 1e3)
        self.processed += 1
        self.dropped += max(0, frame.index - previous_index - 1)

    def snapshot(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.t0
        last = self.latency_ms[-1] if self.latency_ms else 0.0
        recent = self.latency_ms[-100:]
        return {
            "frames": self.processed,
            "dropped": self.dropped,
            "fps": self.processed / wall if wall > 0 else 0.0,
            "latency_ms": last,
            "latency_ms_median": statistics.median(recent) if recent else 0.0,
        }


def run_live(
    predictor: Predictor,
    source: str,
    *,
    out_dir: str | Path | None = None,
    show: bool = False,
    serve: str | None = None,
    record: str | Path | None = None,
    max_frames: int | None = None,
    duration_s: float | None = None,
    capture: Any = None,
    on_serve: Any = None,
) -> dict[str, Any]:
    """Segment a live source until it ends (see the module docstring); returns the summary.

    `capture`: an object with OpenCV's `read()` / `release()` / `get()` instead of opening `source`
    (tests use a fake camera). `on_serve(url)` is called once the viewer is listening.
    """
    from polyprune.files import write_json
    from polyprune.serve import FrameServer, parse_address

    if show and not _has_gui():
        raise ConfigError(
            "--show needs OpenCV with a GUI and a display (this OpenCV is headless): use --serve PORT "
            "and open the page in a browser"
        )
    if max_frames is not None and max_frames < 1:
        raise ConfigError(f"--max-frames must be >= 1, got {max_frames}")
    stats = LiveStats()
    server = FrameServer(*parse_address(serve), stats=stats.snapshot) if serve else None
    try:
        cap = LiveCapture(capture if capture is not None else open_source(source))
    except BaseException:
        if server is not None:
            server.close()
        raise
    if server is not None:
        server.start()
        if on_serve is not None:
            on_serve(server.url)
    recorder = _Recorder(record, cap.fps) if record else None
    interrupted = False
    seq_of: dict[int, float] = {}  # published seq -> capture time of its frame
    threshold = predictor.input_spec.threshold
    cap.start()
    try:
        prev = -1
        while max_frames is None or stats.processed < max_frames:
            if duration_s is not None and time.perf_counter() - stats.t0 >= duration_s:
                break
            frame = cap.newest()
            if frame is None:
                break
            prob = predictor.predict(frame.rgb)
            vis = overlay(frame.rgb, to_mask(prob, threshold), color=(0, 255, 0))
            ready = time.perf_counter()
            stats.add(frame, ready, prev)
            prev = frame.index
            bgr = cv2.cvtColor(vis, cv2.COLOR_RGB2BGR)
            if server is not None:
                ok, jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 80])
                if ok:
                    seq_of[stats.processed] = frame.captured
                    server.publish(jpeg.tobytes(), stats.processed)
            if recorder is not None:
                recorder.write(bgr)
            if show:
                cv2.imshow("polyprune", bgr)
                if cv2.waitKey(1) & 0xFF in (27, ord("q")):
                    break
    except KeyboardInterrupt:
        interrupted = True
    finally:
        cap.stop()
        if recorder is not None:
            recorder.close()
        if server is not None:
            server.close()
    if stats.processed == 0:
        raise DataError(f"{source} gave no frame" + (f" ({cap.error})" if cap.error else ""))
    result = _summary(source, predictor, stats, cap, server, seq_of, recorder, interrupted)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_json(Path(out_dir) / "predict.json", result)
    return result


def _has_gui() -> bool:
    info = cv2.getBuildInformation()
    gui = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if line.strip().startswith("GUI:")), ""
    )
    return gui not in ("", "NONE") and bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


class _Recorder:
    """--record: the overlay video, written to a temporary file and renamed at the end (atomic)."""

    def __init__(self, path: str | Path, fps: float) -> None:
        self.path = Path(path)
        self.fps = fps if fps and np.isfinite(fps) and fps > 0 else 25.0
        self._ctx = atomic_path(self.path, suffix=self.path.suffix or ".mp4")
        self._tmp = self._ctx.__enter__()
        self.writer: Any = None
        self.frames = 0

    def write(self, bgr: np.ndarray) -> None:
        if self.writer is None:
            fourcc = "MJPG" if self.path.suffix.lower() == ".avi" else "mp4v"
            h, w = bgr.shape[:2]
            self.writer = cv2.VideoWriter(str(self._tmp), cv2.VideoWriter_fourcc(*fourcc), self.fps, (w, h))
            if not self.writer.isOpened():
                raise DataError(f"cannot write {self.path}: OpenCV has no {fourcc} encoder here")
        self.writer.write(bgr)
        self.frames += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
        if self.frames:
            self._ctx.__exit__(None, None, None)  # rename into place
        else:  # nothing recorded: the temporary file goes, nothing appears at the path
            self._ctx.__exit__(DataError, DataError("no frames"), None)


def _summary(
    source: str,
    predictor: Predictor,
    stats: LiveStats,
    cap: LiveCapture,
    server: Any,
    seq_of: dict[int, float],
    recorder: _Recorder | None,
    interrupted: bool,
) -> dict[str, Any]:
    wall = time.perf_counter() - stats.t0
    result: dict[str, Any] = {
        "kind": "live",
        "source": source,
        "backend": predictor.backend,
        "frames": stats.processed,
        "captured": cap.captured,
        "dropped": cap.captured - stats.processed,  # every frame read but never segmented
        "source_fps": cap.fps,
        "fps": stats.processed / wall if wall > 0 else 0.0,
        "wall_s": wall,
        "latency_ms": _percentiles(stats.latency_ms),
        "interrupted": interrupted,
        "stream_error": cap.error,
        "outputs": {},
    }
    result["dropped_fraction"] = result["dropped"] / max(1, cap.captured)
    if server is not None:
        sent = [(server.sent_at[s] - seq_of[s]) * 1e3 for s in seq_of if s in server.sent_at]
        result["outputs"]["serve"] = server.url
        result["latency_to_sent_ms"] = _percentiles(sent)
        result["frames_sent"] = len(sent)
    if recorder is not None and recorder.frames:
        result["outputs"]["video"] = str(recorder.path)
    return result


def live_summary(result: dict[str, Any]) -> str:
    lat = result["latency_ms"]
    line = (
        f"{result['frames']} of {result['captured']} frames from {result['source']} ({result['backend']}): "
        f"{result['fps']:.1f} FPS, dropped {result['dropped']} ({result['dropped_fraction']:.1%}); capture -> "
        f"overlay median {lat['median']:.1f} ms, p90 {lat['p90']:.1f}, p99 {lat['p99']:.1f}"
    )
    if "latency_to_sent_ms" in result:
        s = result["latency_to_sent_ms"]
        line += f"; -> sent median {s['median']:.1f} ms, p99 {s['p99']:.1f}"
    if result["interrupted"]:
        line += " (stopped by Ctrl-C)"
    return line
