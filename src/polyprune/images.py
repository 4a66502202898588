"""Decoding images and masks: bytes -> OpenCV (odd paths work, .tif files Pillow refuses open), RGB uint8
images, {0, 1} masks (> 127 cleans JPEG masks; a lossless label map with max <= 127 reads as polyp),
and a `DataError` naming any file that does not decode."""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from polyprune.errors import DataError

# ---------------------------------------------------------------------------------------------- decode


@dataclass(frozen=True)
class Sample:
    """One image and its mask (None for prediction-only folders), paired by file stem."""

    id: str  # file stem
    image: Path
    mask: Path | None


def warn_data(message: str) -> None:
    """A data problem that does not stop the run (the caller's caller is named)."""
    warnings.warn(message, UserWarning, stacklevel=3)


def _read_bytes(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if data.size == 0:
        raise DataError(f"cannot decode {what}: {path} (empty file)")
    return data


def _tiff_samples(data: np.ndarray, decoded: np.ndarray | None) -> np.ndarray | None:
    """OpenCV reads a TIFF with 3 samples but a grayscale photometric tag (the original CVC-ClinicDB
    .tif files) as one channel, silently dropping colour. tifffile (installed with scikit-image) reads
    every sample; its RGB result is returned as BGR, like OpenCV's."""
    try:
        import tifffile

        with tifffile.TiffFile(io.BytesIO(data.tobytes())) as tif:
            arr = tif.pages[0].asarray()
    except Exception:  # not importable, or a TIFF tifffile cannot read: keep OpenCV's answer
        return decoded
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar (separate) samples
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        return np.ascontiguousarray(arr[..., [2, 1, 0, *range(3, arr.shape[-1])]])
    return decoded


_quiet_lock = threading.Lock()
_quiet_state = {"depth": 0, "level": 0, "tifffile": 0}


@contextlib.contextmanager
def quiet_opencv() -> Iterator[None]:
    """Silence OpenCV's log (libtiff tags, "imdecode_: can't read data" for a truncated BMP/TIFF) and
    tifffile's logger while decoding: a bad file is reported once, as a DataError. Counted, so
    concurrent decoding threads restore the user's levels exactly."""
    tiff_log = logging.getLogger("tifffile")
    with _quiet_lock:
        if _quiet_state["depth"] == 0:
            _quiet_state["level"] = cv2.utils.logging.getLogLevel()
            _quiet_state["tifffile"] = tiff_log.level
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
            tiff_log.setLevel(logging.CRITICAL + 1)
        _quiet_state["depth"] += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_state["depth"] -= 1
            if _quiet_state["depth"] == 0:
                cv2.utils.logging.setLogLevel(_quiet_state["level"])
                tiff_log.setLevel(_quiet_state["tifffile"])


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_problem(data: np.ndarray) -> str | None:
    """Walk a PNG's chunks (length, CRC, IEND) before libpng sees them: libpng prints its own
    'libpng error: ...' lines to stderr for a truncated or corrupt file before OpenCV gives up, and
    an error must stay one line. None for a sound PNG or for anything that is not a PNG."""
    if data.size < 8 or data[:8].tobytes() != _PNG_SIGNATURE:
        return None
    buf = memoryview(data)
    pos = 8
    while pos + 12 <= len(buf):
        length = int.from_bytes(buf[pos : pos + 4], "big")
        end = pos + 12 + length
        if end > len(buf):
            return "truncated PNG"
        kind = bytes(buf[pos + 4 : pos + 8])
        critical = kind[:1].isupper()  # libpng only warns about ancillary chunks (tEXt, iCCP, ...)
        if critical and zlib.crc32(buf[pos + 4 : pos + 8 + length]) != int.from_bytes(
            buf[end - 4 : end], "big"
        ):
            return f"corrupt PNG: CRC error in chunk {kind.decode('latin-1')!r}"
        if kind == b"IEND":
            return None
        pos = end
    return "truncated PNG"


def _decode(path: str | Path, what: str) -> np.ndarray:
    """Decode a file with OpenCV (IMREAD_UNCHANGED, BGR order); DataError for anything unreadable."""
    path = Path(path)
    data = _read_bytes(path, what)
    problem = png_problem(data)
    if problem:
        raise DataError(f"cannot decode {what}: {path} ({problem})")
    with quiet_opencv():
        try:
            img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
        except cv2.error:
            img = None
        if path.suffix.lower() in (".tif", ".tiff") and (img is None or img.ndim == 2):
            img = _tiff_samples(data, img)
    if img is None or img.size == 0:
        why = " (or it is over OpenCV's OPENCV_IO_MAX_IMAGE_PIXELS limit)" if len(data) > 2**16 else ""
        raise DataError(f"cannot decode {what}: {path}{why}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (2, 3, 4)):
        raise DataError(f"unsupported {what} shape {img.shape}: {path}")
    return _to_uint8(img, path, what)


def _to_uint8(img: np.ndarray, path: Path, what: str) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return ((img.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if img.dtype in (np.float32, np.float64):
        scale = 255.0 if np.nanmax(img) <= 1.0 else 1.0  # float images in [0, 1] or [0, 255]
        return np.clip(np.nan_to_num(img) * scale + 0.5, 0, 255).astype(np.uint8)
    raise DataError(f"unsupported {what} pixel type {img.dtype}: {path}")


def read_image(path: str | Path) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3): gray -> 3 channels, alpha dropped, 16-bit -> 8-bit."""
    img = _decode(path, "image")
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 2:  # gray + alpha
        return cv2.cvtColor(np.ascontiguousarray(img[..., 0]), cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_mask(path: str | Path) -> np.ndarray:
    """A mask file as uint8 (H, W) in {0, 1}: colour -> max over channels, 16-bit -> 8-bit, > 127.

    The rule: a value > 127 is polyp. A lossless mask (PNG, TIFF, BMP) whose values are all <= 127
    but not all 0 is a label map ({0,1}, {0,2}, {0,100}: common outside Kvasir/CVC): there every
    nonzero pixel is polyp, since thresholding it at 127 would silently empty it. JPEG masks are always
    thresholded (their compression noise near 0 is not a label); one whose maximum is 32..127 gets a
    warning, as it looks like a label map saved as JPEG.
    """
    path = Path(path)
    m = _decode(path, "mask")
    if m.ndim == 3 and m.shape[2] == 4 and not m[..., :3].any():
        m = m[..., 3]  # black colour, the mask drawn in the alpha channel
    elif m.ndim == 3:
        m = m[..., 0] if m.shape[2] == 2 else m[..., :3].max(axis=2)
    top = int(m.max())
    if path.suffix.lower() not in (".jpg", ".jpeg") and 0 < top <= 127:
        return (m > 0).astype(np.uint8)  # a lossless label map ({0,1}, {0,2}, {0,100}, ...): nonzero is polyp
    if path.suffix.lower() in (".jpg", ".jpeg") and 32 <= top <= 127:
        warn_data(
            f"mask {path} has no value above 127 (max {top}): read as empty; a label map saved as JPEG?"
        )
    return (m > 127).astype(np.uint8)


def check_pair(sample: Sample) -> tuple[int, int]:
    """Decode image and mask; DataError when their sizes differ. Returns (H, W)."""
    image = read_image(sample.image)
    if sample.mask is None:
        return image.shape[0], image.shape[1]
    mask = read_mask(sample.mask)
    check_sizes(sample, image, mask)
    return image.shape[0], image.shape[1]


def check_sizes(sample: Sample, image: np.ndarray, mask: np.ndarray) -> None:
    if image.shape[:2] != mask.shape[:2]:
        raise DataError(
            f"image {sample.image} is {image.shape[1]}x{image.shape[0]} but its mask {sample.mask} "
            f"is {mask.shape[1]}x{mask.shape[0]}"
        )
