"""`polyprune predict`: image, folder and video prediction to masks, overlays and a summary.

    p = Predictor("model.onnx")
    predict_path(p, "video.mp4", "out/", stream=True)

The model side is `predictor.Predictor`; the frame loop of videos is `pipeline`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from polyprune.errors import ConfigError, DataError, OutputError
from polyprune.files import atomic_path, atomic_write_bytes, write_json
from polyprune.images import quiet_opencv
from polyprune.pipeline import STAGES, run_pipeline
from polyprune.predictor import Predictor

VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".mpg", ".mpeg", ".webm", ".wmv")


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
    from polyprune.images import read_image

    files = list_images(source)

    def frames() -> Iterator[tuple[str, np.ndarray]]:
        for name, path in files:
            yield name, read_image(path)

    def sink(name: str, mask: np.ndarray, vis: np.ndarray) -> None:
        atomic_write_bytes(out_dir / "masks" / f"{name}.png", _png(mask))
        atomic_write_bytes(out_dir / "overlays" / f"{name}.png", _png(cv2.cvtColor(vis, cv2.COLOR_RGB2BGR)))

    run = run_pipeline(
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
                    with quiet_opencv():  # "Failed to write frame" per frame; reported once below
                        run = run_pipeline(
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
