"""Make a colonoscopy-like test video from Kvasir-SEG stills (for `polyprune predict --stream` timing).

Kvasir-SEG has no videos, so this pans and zooms slowly across a sequence of real frames, 25 fps,
`--frames` frames at 720x576 (PAL, a common endoscope output), written with OpenCV. The video goes
wherever --out says (keep it outside the repository: it is derived from the dataset).

    python benchmarks/make_video.py --out /tmp/kvasir_pan.mp4 --frames 300
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

from polyprune.files import atomic_path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "Kvasir-SEG"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--fps", type=float, default=25.0)
    ap.add_argument("--per-still", type=int, default=50, help="frames spent on each still")
    args = ap.parse_args()

    stills = sorted((args.data / "images").glob("*.jpg"))
    if not stills:
        print(f"error: no Kvasir-SEG images under {args.data}", file=sys.stderr)
        return 2
    w, h = 720, 576
    with atomic_path(args.out, suffix=args.out.suffix) as tmp:  # the container follows the suffix
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), args.fps, (w, h))
        if not writer.isOpened():
            print(f"error: cannot open a video writer for {args.out}", file=sys.stderr)
            raise SystemExit(2)  # an exception: atomic_path then deletes its temp file
        for i in range(args.frames):
            img = cv2.imread(str(stills[(i // args.per_still) % len(stills)]))
            t = (i % args.per_still) / args.per_still
            zoom = 1.0 + 0.25 * t  # slow push-in with a drift, like a scope moving forward
            ih, iw = img.shape[:2]
            cw, ch = int(iw / zoom), int(ih / zoom)
            x0 = int((iw - cw) * (0.5 + 0.3 * np.sin(2 * np.pi * t) / 2))
            y0 = int((ih - ch) * 0.5)
            frame = cv2.resize(img[y0 : y0 + ch, x0 : x0 + cw], (w, h), interpolation=cv2.INTER_LINEAR)
            writer.write(frame)
        writer.release()
    print(f"wrote {args.frames} frames ({w}x{h}, {args.fps:g} fps) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
