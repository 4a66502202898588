"""Datasets: layout detection, image/mask pairing, decoding (OpenCV), splits, augmentation.

Layouts `detect_layout(root)` recognizes (folder names are matched case-insensitively):

    kvasir        root/images/*.jpg + root/masks/*      (Kvasir-SEG; also `polyprune synth` output)
    pranet        root/image(s)/*.png + root/mask(s)/*  (a PraNet TrainDataset or TestDataset/<name> dir)
    cvc-original  root/Original/*.tif + root/Ground Truth/*.tif   (CVC-ClinicDB as distributed)
    folders       any other image folder (image(s), img(s), original) + mask folder (mask(s), label(s),
                  gt, ground truth)

`find_samples` pairs image and mask by file stem. Decoding always goes through `read_image` /
`read_mask`: bytes -> OpenCV, so odd paths work, .tif files Pillow refuses open, and a file that does not
decode is a `DataError` naming it. Images come back RGB uint8 (H, W, 3); masks uint8 {0, 1} (> 127,
which also cleans JPEG masks like Kvasir's). EXIF orientation is ignored for images and masks alike,
so a pair stays aligned.

`SegmentationDataset` decodes every pair once, resizes it to the model size and keeps the uint8
arrays in memory. Item i of epoch e is augmented from a generator seeded by (seed, e, i) only, so a
resumed run sees the same batches; `set_epoch` writes to shared memory, so DataLoader workers
(persistent ones included) see the new epoch when the next epoch's iterator starts.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import random
import threading
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch

from polyprune.checks import check_size
from polyprune.errors import ConfigError, DataError
from polyprune.io import InputSpec
from polyprune.progress import progress_bar

IMAGE_EXTS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
LAYOUTS: tuple[str, ...] = ("kvasir", "pranet", "cvc-original", "folders")

# folder names, lower-cased with spaces, "_" and "-" removed
_IMAGE_DIRS = ("image", "images", "img", "imgs", "original", "originals")
_MASK_DIRS = ("mask", "masks", "label", "labels", "gt", "gts", "groundtruth", "annotation", "annotations")
_IGNORED_FILES = ("thumbs.db", "desktop.ini")


def preprocess_image(image_rgb: np.ndarray, spec: InputSpec) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> float32 (3, S, S): bilinear resize to the model size, /255, mean/std.

    The one preprocessing used by training, evaluation, export checks and inference alike.
    """
    resized = cv2.resize(image_rgb, (spec.size, spec.size), interpolation=cv2.INTER_LINEAR)
    x = resized.astype(np.float32) / 255.0
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


# ---------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Sample:
    id: str  # file stem
    image: Path
    mask: Path | None


def _norm(name: str) -> str:
    return name.lower().replace(" ", "").replace("_", "").replace("-", "")


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _check_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.exists():
        raise DataError(f"dataset folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"dataset path is not a folder: {root}")
    return root


def _locate(root: Path) -> tuple[str, Path | None, Path | None]:
    """(layout, image dir, mask dir) of a dataset folder; dirs are None when not found."""
    subdirs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    images = [d for d in subdirs if _norm(d.name) in _IMAGE_DIRS]
    masks = [d for d in subdirs if _norm(d.name) in _MASK_DIRS]
    for kind, found in (("image", images), ("mask", masks)):
        if len(found) > 1:
            names = ", ".join(sorted(d.name for d in found))
            raise DataError(f"{root} has several {kind} folders ({names}); keep one")
    image_dir = images[0] if images else None
    mask_dir = masks[0] if masks else None
    if image_dir is None or mask_dir is None:
        return "", image_dir, mask_dir
    exts = {p.suffix.lower() for p in _image_files(image_dir)}
    pair = (_norm(image_dir.name), _norm(mask_dir.name))
    if pair == ("original", "groundtruth"):
        layout = "cvc-original"
    elif pair == ("images", "masks") and exts and exts <= {".jpg", ".jpeg"}:
        layout = "kvasir"
    elif pair[0] in ("image", "images") and pair[1] in ("mask", "masks") and exts == {".png"}:
        layout = "pranet"
    else:
        layout = "folders"
    return layout, image_dir, mask_dir


def detect_layout(root: str | Path) -> str:
    """Name the layout of a dataset folder: one of LAYOUTS. DataError when there is none."""
    root = _check_root(root)
    layout, image_dir, _ = _locate(root)
    if layout:
        if not _image_files(image_dir):
            raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) in {image_dir}")
        return layout
    if image_dir is not None:
        raise DataError(
            f"{root} has an image folder ({image_dir.name}) but no mask folder (masks, labels, gt)"
        )
    if not any(root.iterdir()):
        raise DataError(f"dataset folder is empty: {root}")
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    hint = f" (subfolders: {', '.join(subdirs[:6])}; pass one dataset folder)" if subdirs else ""
    raise DataError(f"no image/mask folders (e.g. images/ + masks/) in {root}{hint}")


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


def _list_names(paths: Sequence[object], limit: int = 20) -> str:
    names = [str(p) for p in paths]
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _by_stem(folder: Path) -> dict[str, Path]:
    """Image files of a folder by stem; other files are ignored with a warning (never silently)."""
    files, others = {}, []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.name.lower() in _IGNORED_FILES or p.is_dir():
            continue
        if p.suffix.lower() not in IMAGE_EXTS:
            others.append(p.name)
            continue
        if p.stem in files:
            raise DataError(f"two files with the id {p.stem!r} in {folder}: {files[p.stem].name}, {p.name}")
        files[p.stem] = p
    if others:
        _warn(f"ignored {len(others)} non-image files in {folder}: {_list_names(others)}")
    return files


def find_samples(root: str | Path, *, require_masks: bool = True, skip_bad: bool = False) -> list[Sample]:
    """Pair images and masks of one dataset folder by file stem, sorted by id.

    An image without a mask is a DataError naming it; with `skip_bad` every such image is listed in
    one warning and left out. With `require_masks=False` unmatched images get `mask=None`, and a folder
    of bare images (no mask folder) is accepted too.
    """
    root = _check_root(root)
    layout, image_dir, mask_dir = _locate(root)
    if not layout:
        if require_masks or (image_dir is None and not _image_files(root)):
            detect_layout(root)  # raises the precise error
        image_dir = image_dir or root
    images = _by_stem(image_dir)
    if not images:
        raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) in {image_dir}")
    masks = _by_stem(mask_dir) if mask_dir is not None else {}
    samples, missing = [], []
    for stem, path in sorted(images.items()):
        mask = masks.get(stem)
        if mask is None and require_masks:
            missing.append(path)
            continue
        samples.append(Sample(stem, path, mask))
    if missing and not skip_bad:
        raise DataError(f"no mask for image {missing[0]} in {mask_dir} ({len(missing)} images lack a mask)")
    if missing:
        _warn(f"skipped {len(missing)} images without a mask in {mask_dir}: {_list_names(missing)}")
    orphans = sorted(set(masks) - set(images))
    if orphans:
        _warn(f"{len(orphans)} masks in {mask_dir} have no image: {_list_names(orphans)}")
    if not samples:
        raise DataError(f"no usable image/mask pairs in {root}")
    return samples


# ---------------------------------------------------------------------------------------------- decode


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
        _warn(f"mask {path} has no value above 127 (max {top}): read as empty; a label map saved as JPEG?")
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


# ---------------------------------------------------------------------------------------------- splits


def read_ids(path: str | Path) -> list[str]:
    """A split file: one id per line (file names allowed: folders and image extensions are stripped)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read split file {path}: {exc}") from exc
    ids: list[str] = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name = line.replace("\\", "/").rsplit("/", 1)[-1]
        stem, ext = os.path.splitext(name)
        ids.append(stem if ext.lower() in IMAGE_EXTS else name)
    if not ids:
        raise DataError(f"split file has no ids: {path}")
    return list(dict.fromkeys(ids))  # drop repeats, keep order


@dataclass
class Split:
    train: list[Sample]
    val: list[Sample]
    test: list[Sample] = field(default_factory=list)


def split_samples(
    samples: Sequence[Sample], *, test_ids: list[str] | None = None, val_fraction: float = 0.1, seed: int = 0
) -> Split:
    """Test = the samples named by `test_ids`; val = a seeded random `val_fraction` of the rest.

    Deterministic for a seed; the three parts are disjoint and each is sorted by id. Test ids that are
    not in the data are a DataError (a wrong split file would otherwise leak test images into training).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    by_id = {s.id: s for s in samples}
    if len(by_id) != len(samples):
        dup = sorted(k for k, n in Counter(s.id for s in samples).items() if n > 1)
        raise DataError(f"duplicate sample ids (merge datasets with distinct names): {_list_names(dup, 5)}")
    test_set = set(test_ids or [])
    absent = sorted(test_set - set(by_id))
    if absent:
        raise DataError(f"{len(absent)} test ids are not in the data, e.g. {_list_names(absent, 5)}")
    test = sorted((s for s in samples if s.id in test_set), key=lambda s: s.id)
    rest = sorted((s for s in samples if s.id not in test_set), key=lambda s: s.id)
    n_val = 0
    if val_fraction > 0 and len(rest) > 1:
        n_val = min(max(1, round(len(rest) * val_fraction)), len(rest) - 1)  # keep >= 1 for training
    order = np.random.default_rng(seed).permutation(len(rest))
    val_idx = set(order[:n_val].tolist())
    val = [s for i, s in enumerate(rest) if i in val_idx]
    train = [s for i, s in enumerate(rest) if i not in val_idx]
    return Split(train=train, val=val, test=test)


# ---------------------------------------------------------------------------------------------- dataset


def build_augment() -> A.Compose:
    """Training augmentation: flips, 90-degree turns, affine (rotation, scale 0.75-1.25), colour jitter.

    Geometric transforms move the mask too, with nearest-neighbour interpolation so it stays binary.
    """
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
            A.Affine(
                scale=(0.75, 1.25),
                rotate=(-30, 30),
                translate_percent=(-0.05, 0.05),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=0,
                p=0.7,
            ),
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.15, hue=0.02, p=0.8),
        ]
    )


def _load_pair(sample: Sample, size: int) -> tuple[np.ndarray, np.ndarray]:
    image = read_image(sample.image)
    if sample.mask is None:
        raise DataError(f"no mask for image {sample.image}")
    mask = read_mask(sample.mask)
    check_sizes(sample, image, mask)
    # the same resize as preprocess_image, so an unaugmented item equals what inference computes
    image = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
    mask = cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)
    return image, mask


class SegmentationDataset(torch.utils.data.Dataset):
    """Image/mask pairs decoded once into memory at the model size; item = (image (3,S,S), mask (1,S,S))."""

    def __init__(
        self,
        samples: Sequence[Sample],
        spec: InputSpec,
        *,
        augment: bool = False,
        seed: int = 0,
        skip_bad: bool = False,
        progress: bool = False,
    ) -> None:
        self.spec = spec
        size = check_size(spec.size)
        self.augment, self.seed = augment, int(seed)
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()  # seen by DataLoader workers
        self._transform = build_augment() if augment else None
        self.skipped: list[tuple[Path, str]] = []
        if not samples:
            raise DataError("no samples to load")

        def load(s: Sample) -> tuple[np.ndarray, np.ndarray] | DataError:
            try:
                return _load_pair(s, size)
            except DataError as exc:
                return exc

        images, masks, kept = [], [], []
        # OpenCV releases the GIL while decoding: threads make the one-time load several times faster
        workers = max(1, min(8, os.cpu_count() or 1))
        pool = ThreadPoolExecutor(workers)
        try:
            with progress_bar(len(samples), "load", enabled=progress) as bar:
                for s, res in zip(samples, pool.map(load, samples), strict=True):
                    bar.advance()
                    if isinstance(res, DataError):
                        if not skip_bad:
                            raise res
                        self.skipped.append((s.image, str(res)))
                        continue
                    images.append(res[0])
                    masks.append(res[1])
                    kept.append(s)
        finally:
            pool.shutdown(cancel_futures=True)  # a DataError stops the remaining decodes
        if self.skipped:
            listing = "; ".join(reason for _, reason in self.skipped)
            _warn(f"skipped {len(self.skipped)} unusable samples: {listing}")
        if not kept:
            raise DataError(f"none of the {len(samples)} samples could be loaded")
        self.samples: list[Sample] = kept
        self.images = np.stack(images)  # (N, S, S, 3) uint8
        self.masks = np.stack(masks)  # (N, S, S) uint8 {0, 1}

    def __len__(self) -> int:
        return len(self.samples)

    def unaugmented(self) -> SegmentationDataset:
        """The same decoded images without augmentation (shares the arrays: nothing is decoded again)."""
        plain = copy.copy(self)
        plain.augment, plain._transform = False, None
        return plain

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation of `epoch`; call before iterating the DataLoader for that epoch."""
        self._epoch[0] = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.images[i], self.masks[i]
        if self._transform is not None:
            # one generator, seeded by (seed, epoch, i) only, drives every transform of this item
            ss = np.random.SeedSequence([self.seed, self.epoch, int(i)])
            self._transform.set_random_state(
                np.random.default_rng(ss), random.Random(int(ss.generate_state(1)[0]))
            )
            out = self._transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        x = torch.from_numpy(preprocess_image(image, self.spec))
        y = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None]
        return x, y
