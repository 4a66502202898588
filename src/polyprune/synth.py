"""Procedural synthetic polyps: an endoscopy-like dataset that needs no download.

    make_synthetic_dataset(out, n=200, size=256, seed=0)
        -> out/images/synth_00000.jpg (JPEG q95) + out/masks/synth_00000.png (0/255, lossless)

That is the Kvasir-SEG layout, so `polyprune.data.find_samples(out)` reads it like the real thing.
Sample k is drawn from `np.random.default_rng((seed, k))`: the same seed gives the same files, and
sample k does not depend on n.

What a frame holds (`synth_sample`), built in float32 RGB in [0, 1]:
  mucosa     pink/red base colour modulated by low-frequency noise, fine vessels, dark folds with a
             lit edge, sometimes the dark lumen of the colon;
  polyps     1-3 blobs (superformula-perturbed ellipses, sometimes tiny), a dome height field from the
             distance transform, shaded by a light near the camera, a granular texture, a tint that is
             only slightly off the mucosa colour (redder or paler, brighter or darker at random), and
             a contact shadow on one side;
  camera     specular highlights (on polyps and on the background), vignetting, global gain, sensor
             noise, sometimes the black round border of an endoscope image.
The mask is the exact union of the polyp polygons (inside the visible field). Colour alone does not
separate polyp from mucosa (see tests/test_synth.py): a model has to use shape, shading and edges.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from polyprune.checks import check_seed
from polyprune.errors import ConfigError
from polyprune.files import atomic_write_bytes
from polyprune.progress import progress_bar

MIN_SIZE = 32


def _noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth value noise in [0, 1]: a random cells x cells grid, bicubic-upsampled to size x size."""
    grid = rng.random((cells + 3, cells + 3), dtype=np.float32)
    big = cv2.resize(
        grid, (size + size * 3 // cells, size + size * 3 // cells), interpolation=cv2.INTER_CUBIC
    )
    off = size * 3 // cells // 2  # crop the border where bicubic has no neighbours
    return big[off : off + size, off : off + size]


def _shift(a: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Translate a 2-D map by (dx, dy) pixels, zeros entering (np.roll would wrap around)."""
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(a, m, (a.shape[1], a.shape[0]), flags=cv2.INTER_NEAREST, borderValue=0)


def _noise_hw(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth noise of shape (h, w): a crop of square noise."""
    return _noise(rng, max(h, w), cells)[:h, :w]


def _fractal(rng: np.random.Generator, size: int, cells: int, octaves: int) -> np.ndarray:
    out, amp, total = np.zeros((size, size), np.float32), 1.0, 0.0
    for o in range(octaves):
        out += amp * _noise(rng, size, cells * 2**o)
        total += amp
        amp *= 0.5
    return out / total


def _polyp_polygon(rng: np.random.Generator, cx: float, cy: float, r: float) -> np.ndarray:
    """An irregular closed outline: an ellipse whose radius carries a few random harmonics."""
    t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    rad = np.ones_like(t)
    for k in range(2, 6):
        rad += rng.uniform(0, 0.16 / k**0.5) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    aspect, rot = rng.uniform(0.65, 1.0), rng.uniform(0, np.pi)
    x, y = r * rad * np.cos(t), r * aspect * rad * np.sin(t)
    xr = cx + x * np.cos(rot) - y * np.sin(rot)
    yr = cy + x * np.sin(rot) + y * np.cos(rot)
    return np.stack([xr, yr], axis=1)


def synth_sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic frame: RGB uint8 (size, size, 3) and its mask uint8 (size, size) in {0, 1}."""
    s = int(size)
    if s < MIN_SIZE:
        raise ConfigError(f"synthetic image size must be >= {MIN_SIZE}, got {size}")
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    img, lit, folds = _mucosa(rng, s, xx, yy)
    # --- polyps, each rendered inside its own bounding box (keeps generation fast)
    mask = np.zeros((s, s), np.uint8)
    light = np.array([rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5), 1.0], np.float32)
    light /= np.linalg.norm(light)
    n_polyps = int(rng.choice([1, 2, 3], p=[0.65, 0.25, 0.1]))
    for j in range(n_polyps):
        _render_polyp(rng, img, mask, s, light, j)
    # --- camera: specular glints (some on fold crests), vignetting, gain, noise, the round scope border
    glints = np.zeros((s, s), np.float32)
    for _ in range(int(rng.integers(3, 15))):
        gx0, gy0 = int(rng.integers(0, s)), int(rng.integers(0, s))
        ax = max(1, int(rng.uniform(0.003, 0.015) * s))
        ay = max(1, int(ax * rng.uniform(0.3, 1.0)))
        cv2.ellipse(glints, (gx0, gy0), (ax, ay), float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
    crest = np.clip(lit - folds, 0, 1) * (_noise(rng, s, 16) > 0.8)
    glints = np.maximum(glints, (crest > 0.3).astype(np.float32))
    glints = cv2.GaussianBlur(glints, (3, 3), 0)
    img = img * (1 - glints[..., None]) + glints[..., None] * np.float32(1.05)

    vx, vy = rng.uniform(0.4, 0.6), rng.uniform(0.4, 0.6)
    rr = ((xx - vx) ** 2 + (yy - vy) ** 2) / 0.5
    img *= (1 - rng.uniform(0.4, 0.8) * rr**1.5)[..., None]
    img *= rng.uniform(0.75, 1.25)
    img += rng.normal(0, rng.uniform(0.005, 0.02), img.shape).astype(np.float32)

    if rng.random() < 0.3:  # black round border of the scope; the mask ends where the image does
        field = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2) < rng.uniform(0.22, 0.3)
        img *= field[..., None]
        mask &= field.astype(np.uint8)

    out = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    if rng.random() < 0.3:  # slight defocus
        out = cv2.GaussianBlur(out, (3, 3), 0)
    return out, mask


def _mucosa(
    rng: np.random.Generator, s: int, xx: np.ndarray, yy: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The colon wall: base colour x low-frequency shading x vessels x folds (+ the lumen); with the
    fold field and its lit edge, which the camera's glints reuse."""

    # --- mucosa: base colour x low-frequency shading x vessels x folds
    r0 = rng.uniform(0.72, 0.95)
    base = np.array([r0, r0 * rng.uniform(0.38, 0.62), 0.0], np.float32)
    base[2] = base[1] * rng.uniform(0.75, 1.1)
    low = _fractal(rng, s, 3, 3)
    hue = _noise(rng, s, 4) - 0.5  # slow drift between redder and paler patches
    img = base * (0.6 + 0.7 * low)[..., None]
    img[..., 1:] *= (1 - 0.35 * hue)[..., None]

    vessels = np.abs(_fractal(rng, s, 6, 3) - 0.5)
    vessel = np.exp(-((vessels / 0.01) ** 2)) * rng.uniform(0.05, 0.2)  # thin dark-red lines
    img *= 1 - vessel[..., None] * np.array([0.3, 1.0, 0.9], np.float32)

    fold_field = _fractal(rng, s, 2, 2)
    fold_w = rng.uniform(0.03, 0.07)
    folds = np.exp(-(((fold_field - 0.5) / fold_w) ** 2))
    shift = max(1, s // 64)
    lit = _shift(folds, -shift, -shift)  # lit upper edge of each fold
    img *= (1 - rng.uniform(0.25, 0.5) * folds + 0.25 * np.clip(lit - folds, 0, 1))[..., None]

    if rng.random() < 0.4:  # the dark lumen, far down the colon
        lx, ly, lr = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.25)
        d = np.sqrt((xx - lx) ** 2 + (yy - ly) ** 2) / lr
        img *= (1 - 0.85 * np.exp(-(d**2)))[..., None]
    return img, lit, folds


def _render_polyp(
    rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, s: int, light: np.ndarray, j: int
) -> None:
    """Polyp j, rendered into `img` and `mask` (in place) inside its own bounding box."""
    tiny = (j > 0 and rng.random() < 0.5) or rng.random() < 0.08
    r = s * (rng.uniform(0.03, 0.06) if tiny else rng.uniform(0.08, 0.24))
    poly = _polyp_polygon(rng, rng.uniform(0.1, 0.9) * s, rng.uniform(0.1, 0.9) * s, r)
    pad = int(r * 0.4) + 3
    x0, y0 = (np.floor(poly.min(0)).astype(int) - pad).clip(0, s)
    x1, y1 = (np.ceil(poly.max(0)).astype(int) + pad).clip(0, s)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return
    h, w = y1 - y0, x1 - x0
    one = np.zeros((h, w), np.uint8)
    cv2.fillPoly(one, [np.round((poly - (x0, y0)) * 16).astype(np.int32)], 1, cv2.LINE_8, 4)
    if not one.any():
        return
    roi = img[y0:y1, x0:x1]
    # dome height from the distance to the outline; surface normals from its gradient
    dist = cv2.distanceTransform(one, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    dmax = max(float(dist.max()), 1.0)
    height = np.sqrt(1 - (1 - np.clip(dist / dmax, 0, 1)) ** 2) * dmax * rng.uniform(0.6, 1.2)
    height = cv2.GaussianBlur(height, (0, 0), max(1.0, dmax * 0.15))  # a smooth dome, no ridge
    gx = cv2.Sobel(height, cv2.CV_32F, 1, 0, ksize=3) / 8
    gy = cv2.Sobel(height, cv2.CV_32F, 0, 1, ksize=3) / 8
    diffuse = np.clip((-gx * light[0] - gy * light[1] + light[2]) / np.sqrt(gx**2 + gy**2 + 1), 0, 1)

    # contact shadow just outside the outline, on the side away from the light
    k = max(3, int(r * 0.3) | 1)
    soft = cv2.GaussianBlur(one.astype(np.float32), (k, k), 0)
    dx, dy = round(float(-light[0] * r * 0.2)), round(float(-light[1] * r * 0.2))
    shadow = np.clip(_shift(soft, dx, dy) - one, 0, 1) * rng.uniform(0.25, 0.5)
    roi *= (1 - shadow)[..., None]

    # a tint a little off the mucosa, either way: never the same, never a fixed colour
    bright = 1 + rng.choice([-1, 1]) * rng.uniform(0.06, 0.2)
    red = rng.choice([-1, 1]) * rng.uniform(0.04, 0.15)
    tint = np.array([1.0, 1 - red, 1 - 0.8 * red], np.float32) * bright
    cells = max(3, int(max(h, w) / max(2.0, s / 48)))
    grain = 1 + rng.uniform(0.05, 0.2) * (_noise_hw(rng, h, w, cells) - 0.5)
    polyp = roi * tint * (0.55 + 0.55 * diffuse * grain)[..., None]
    # specular: the brightest part of the dome, broken into a few blobs by smooth noise
    glare = diffuse ** rng.uniform(8, 30) * (0.5 + _noise_hw(rng, h, w, 4))
    polyp += np.clip((glare - 0.6) * 5, 0, 1)[..., None] * rng.uniform(0.4, 1.0)
    inside = one.astype(bool)
    roi[inside] = polyp[inside]
    mask[y0:y1, x0:x1] |= one


def make_synthetic_dataset(
    out: str | Path, n: int = 200, size: int = 256, seed: int = 0, *, progress: bool = False
) -> Path:
    """Write n synthetic pairs in the Kvasir-SEG layout under `out`; return `out`."""
    if size < MIN_SIZE:
        raise ConfigError(f"synthetic image size must be >= {MIN_SIZE}, got {size}")
    if n < 1:
        raise ConfigError(f"number of synthetic images must be >= 1, got {n}")
    check_seed(seed)
    out = Path(out)
    with progress_bar(total=n, desc="synth", enabled=progress) as bar:
        for k in range(n):
            image, mask = synth_sample(np.random.default_rng((seed, k)), size)
            name = f"synth_{k:05d}"
            ok1, jpg = cv2.imencode(
                ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95]
            )
            ok2, png = cv2.imencode(".png", mask * np.uint8(255))
            assert ok1 and ok2  # encoding in-memory arrays of a fixed type cannot fail
            atomic_write_bytes(out / "images" / f"{name}.jpg", jpg.tobytes())
            atomic_write_bytes(out / "masks" / f"{name}.png", png.tobytes())
            bar.advance()
    return out
