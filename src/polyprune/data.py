"""Datasets: layout detection, image/mask pairing, splits, augmentation (decoding: `images`).

Layouts `detect_layout(root)` recognizes (folder names are matched case-insensitively):

    kvasir        root/images/*.jpg + root/masks/*      (Kvasir-SEG; also `polyprune synth` output)
    pranet        root/image(s)/*.png + root/mask(s)/*  (a PraNet TrainDataset or TestDataset/<name> dir)
    cvc-original  root/Original/*.tif + root/Ground Truth/*.tif   (CVC-ClinicDB as distributed)
    folders       any other image folder (image(s), img(s), original) + mask folder (mask(s), label(s),
                  gt, ground truth)

`find_samples` pairs image and mask by file stem. Decoding always goes through `images.read_image` /
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

import copy
import os
import random
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from polyprune.checks import check_size
from polyprune.errors import ConfigError, DataError
from polyprune.images import Sample, check_sizes, read_image, read_mask, warn_data
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
        warn_data(f"ignored {len(others)} non-image files in {folder}: {_list_names(others)}")
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
        warn_data(f"skipped {len(missing)} images without a mask in {mask_dir}: {_list_names(missing)}")
    orphans = sorted(set(masks) - set(images))
    if orphans:
        warn_data(f"{len(orphans)} masks in {mask_dir} have no image: {_list_names(orphans)}")
    if not samples:
        raise DataError(f"no usable image/mask pairs in {root}")
    return samples


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
            warn_data(f"skipped {len(self.skipped)} unusable samples: {listing}")
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


def epoch_loader(
    train_ds: Dataset, epoch: int, batch: int, seed: int, workers: int, world: int
) -> DataLoader:
    """Epoch `epoch`'s batches: the shuffle (and augmentation) depend on (seed, epoch) only."""
    if hasattr(train_ds, "set_epoch"):
        train_ds.set_epoch(epoch)
    if world > 1:
        sampler = DistributedSampler(train_ds, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return DataLoader(train_ds, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=False)
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return DataLoader(train_ds, batch_size=batch, shuffle=True, generator=gen, num_workers=workers)
