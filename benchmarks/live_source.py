"""A stand-in for an endoscopy tower's video output: a folder of images (or a video) served as an MJPEG
stream on loopback at a fixed frame rate and size, so `polyprune predict --source http://...` can be
measured live without a capture card.

    python benchmarks/live_source.py ../shared/data/Kvasir-SEG/images --size 720x576 --fps 25 --port 8554
    polyprune predict --model M --source http://127.0.0.1:8554/stream.mjpg --duration 60 --serve 8080

Run it as its own process (JPEG encoding here must not share the measured process's cores' GIL).
Frames are decoded, resized and JPEG-encoded once up front, then published on a fixed clock: frame i
goes out at t0 + i / fps (a late frame is not made up later, like a camera).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2

from polyprune.images import read_image
from polyprune.serve import FrameServer


def frames(source: Path, width: int, height: int, limit: int) -> list[bytes]:
    if source.is_dir():
        paths = sorted(p for p in source.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:limit]
        rgbs = [read_image(p) for p in paths]
    else:
        cap, rgbs = cv2.VideoCapture(str(source)), []
        while len(rgbs) < limit and (got := cap.read())[0]:
            rgbs.append(cv2.cvtColor(got[1], cv2.COLOR_BGR2RGB))
    out = []
    for rgb in rgbs:
        bgr = cv2.cvtColor(cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2BGR)
        out.append(cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    if not out:
        raise SystemExit(f"no frames in {source}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path)
    ap.add_argument("--size", default="720x576", help="WIDTHxHEIGHT")
    ap.add_argument("--fps", type=float, default=25.0)
    ap.add_argument("--port", type=int, default=8554)
    ap.add_argument("--frames", type=int, default=200, help="distinct frames, looped")
    ap.add_argument("--seconds", type=float, default=600.0, help="stop after this long")
    args = ap.parse_args()
    w, h = map(int, args.size.lower().split("x"))
    jpegs = frames(args.source, w, h, args.frames)
    with FrameServer("127.0.0.1", args.port) as srv:
        print(f"serving {len(jpegs)} frames {w}x{h} at {args.fps:g} FPS on {srv.url}stream.mjpg", flush=True)
        t0, i = time.perf_counter(), 0
        while time.perf_counter() - t0 < args.seconds:
            due = t0 + i / args.fps
            now = time.perf_counter()
            if due > now:
                time.sleep(due - now)
            srv.publish(jpegs[i % len(jpegs)], i + 1)
            i += 1


if __name__ == "__main__":
    main()
