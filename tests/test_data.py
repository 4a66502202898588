"""Data layer: layouts (from a few real files), decoding, bad inputs, splits, the in-memory dataset."""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from polyprune.data import (
    SegmentationDataset,
    check_size,
    detect_layout,
    find_samples,
    preprocess_image,
    read_ids,
    split_samples,
)
from polyprune.errors import ConfigError, DataError
from polyprune.images import Sample, check_pair, read_image, read_mask
from polyprune.io import InputSpec

KVASIR_IDS = ("cju0qkwl35piu0993l0dewei2", "cju0qoxqj9q6s0835b43399p4", "cju0qx73cjw570799j4n5cjze")
CLINIC_IDS = ("1", "2", "3")


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src, dst)


def _layout(tmp: Path, name: str, pairs: list[tuple[Path, Path]], img_dir: str, mask_dir: str) -> Path:
    root = tmp / name
    for image, mask in pairs:
        _link(image, root / img_dir / image.name)
        _link(mask, root / mask_dir / mask.name)
    return root


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cv2.imencode(path.suffix, arr)[1].tobytes())
    return path


def _pair_dir(tmp: Path, n: int = 3, size: tuple[int, int] = (40, 48)) -> Path:
    """A tiny valid dataset (images/*.png + masks/*.png) that needs no real data."""
    rng = np.random.default_rng(0)
    for k in range(n):
        _png(tmp / "images" / f"s{k}.png", rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        _png(tmp / "masks" / f"s{k}.png", (rng.random(size) > 0.5).astype(np.uint8) * 255)
    return tmp


# ------------------------------------------------------------------------------------------ layouts


@pytest.mark.realdata
def test_every_layout_from_real_files(shared_data, tmp_path):
    kv = shared_data / "Kvasir-SEG"
    kv_pairs = [(kv / "images" / f"{i}.jpg", kv / "masks" / f"{i}.jpg") for i in KVASIR_IDS]
    cl = shared_data / "CVC-ClinicDB"
    cl_pairs = [(cl / "images" / f"{i}.png", cl / "masks" / f"{i}.png") for i in CLINIC_IDS]
    tif = shared_data / "CVC-ClinicDB-tif"
    tif_pairs = [(tif / "images" / f"{i}.tif", tif / "masks" / f"{i}.tif") for i in ("1", "2")]
    cases = [
        (_layout(tmp_path, "Kvasir-SEG", kv_pairs, "images", "masks"), "kvasir", 3),
        (_layout(tmp_path, "TrainDataset", cl_pairs, "images", "masks"), "pranet", 3),
        (_layout(tmp_path, "TestDataset/CVC-ClinicDB", cl_pairs, "images", "masks"), "pranet", 3),
        (_layout(tmp_path, "TestDataset/Kvasir", cl_pairs[:2], "image", "mask"), "pranet", 2),
        (_layout(tmp_path, "CVC-ClinicDB", tif_pairs, "Original", "Ground Truth"), "cvc-original", 2),
        (_layout(tmp_path, "tif", tif_pairs, "images", "masks"), "folders", 2),
        (_layout(tmp_path, "generic", kv_pairs[:2], "img", "label"), "folders", 2),
        (_layout(tmp_path, "upper", kv_pairs[:1], "IMAGES", "GT"), "folders", 1),
    ]
    for root, layout, n in cases:
        assert detect_layout(root) == layout, root
        samples = find_samples(root)
        assert len(samples) == n and [s.id for s in samples] == sorted(s.id for s in samples)
        for s in samples:
            h, w = check_pair(s)
            image, mask = read_image(s.image), read_mask(s.mask)
            assert image.shape == (h, w, 3) and image.dtype == np.uint8
            assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 1} and mask.any()
    # a PraNet TestDataset with several sub-datasets is not one dataset: the error says what to pass
    with pytest.raises(DataError, match="pass one dataset folder"):
        find_samples(tmp_path / "TestDataset")


@pytest.mark.realdata
def test_rgb_tif_decodes_in_colour_like_its_png(shared_data):
    # the original .tif has 3 samples under a grayscale tag: OpenCV alone returns one channel
    tif = read_image(shared_data / "CVC-ClinicDB-tif" / "images" / "1.tif")
    png = read_image(shared_data / "CVC-ClinicDB" / "images" / "1.png")
    assert tif.shape == (288, 384, 3)
    np.testing.assert_array_equal(tif, png)
    np.testing.assert_array_equal(
        read_mask(shared_data / "CVC-ClinicDB-tif" / "masks" / "1.tif"),
        read_mask(shared_data / "CVC-ClinicDB" / "masks" / "1.png"),
    )


@pytest.mark.realdata
def test_kvasir_jpeg_mask_is_binary_and_split_ids_exist(shared_data):
    path = shared_data / "Kvasir-SEG" / "masks" / f"{KVASIR_IDS[0]}.jpg"
    raw = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    assert len(np.unique(raw)) > 2  # JPEG noise around 0 and 255
    mask = read_mask(path)
    assert set(np.unique(mask)) == {0, 1}
    np.testing.assert_array_equal(mask, (raw > 127).astype(np.uint8))
    ids = read_ids(shared_data / "splits" / "kvasir_pranet_test.txt")
    assert len(ids) == 100 and all(
        (shared_data / "Kvasir-SEG" / "images" / f"{i}.jpg").is_file() for i in ids
    )


def test_detect_layout_names_kvasir_and_pranet_by_extension(tmp_path):
    _pair_dir(tmp_path / "png")
    assert detect_layout(tmp_path / "png") == "pranet"
    root = tmp_path / "jpg"
    _png(root / "images" / "a.jpg", np.zeros((8, 8, 3), np.uint8))
    _png(root / "masks" / "a.png", np.zeros((8, 8), np.uint8))
    assert detect_layout(root) == "kvasir"


# ------------------------------------------------------------------------------------------ decoding


def test_mask_binarizes_above_127_and_keeps_label_maps(tmp_path):
    grey = np.array([[0, 100, 127, 128, 200, 255]], np.uint8)
    assert read_mask(_png(tmp_path / "g.png", grey)).tolist() == [[0, 0, 0, 1, 1, 1]]
    labels = np.array([[0, 1, 1, 0]], np.uint8)  # a 0/1 label map must not be emptied by > 127
    assert read_mask(_png(tmp_path / "l.png", labels)).tolist() == [[0, 1, 1, 0]]
    colour = np.zeros((2, 2, 3), np.uint8)
    colour[0, 0] = (0, 0, 255)  # a red (BGR) annotation counts as foreground
    assert read_mask(_png(tmp_path / "c.png", colour)).tolist() == [[1, 0], [0, 0]]
    assert read_mask(_png(tmp_path / "m16.png", np.array([[0, 65535]], np.uint16))).tolist() == [[0, 1]]
    alpha = np.zeros((1, 2, 4), np.uint8)
    alpha[0, 1, 3] = 255  # black colour, mask in the alpha channel
    assert read_mask(_png(tmp_path / "a.png", alpha)).tolist() == [[0, 1]]


def test_gray_rgba_and_16bit_images_load_as_rgb_uint8(tmp_path):
    gray = _png(tmp_path / "gray.png", np.full((6, 7), 80, np.uint8))
    rgba = _png(
        tmp_path / "rgba.png",
        np.dstack([np.full((6, 7, 3), (10, 20, 30), np.uint8), np.zeros((6, 7), np.uint8)]),
    )
    deep = _png(tmp_path / "deep.png", np.full((6, 7, 3), 65535, np.uint16))
    bmp = _png(tmp_path / "x.bmp", np.full((6, 7, 3), 5, np.uint8))
    for path in (gray, rgba, deep, bmp):
        img = read_image(path)
        assert img.shape == (6, 7, 3) and img.dtype == np.uint8, path
    assert read_image(rgba)[0, 0].tolist() == [30, 20, 10]  # BGR on disk -> RGB in memory
    assert read_image(deep).max() == 255 and read_image(gray)[0, 0].tolist() == [80, 80, 80]


def test_unicode_path_decodes(tmp_path):
    path = _png(tmp_path / "pólipo ü" / "bild 1.png", np.full((5, 5, 3), 9, np.uint8))
    assert read_image(path).shape == (5, 5, 3)


def _bad_files(tmp: Path) -> dict[str, Path]:
    good = cv2.imencode(".jpg", np.full((64, 64, 3), 120, np.uint8))[1].tobytes()
    files = {
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "random": np.random.default_rng(0).bytes(2000),
        "text": b"this is not an image\n",
    }
    out = {}
    for name, data in files.items():
        (tmp / f"{name}.jpg").write_bytes(data)
        out[name] = tmp / f"{name}.jpg"
    return out


def test_bad_images_raise_data_error_naming_the_file(tmp_path):
    for name, path in _bad_files(tmp_path).items():
        with pytest.raises(DataError, match="cannot decode") as info:
            read_image(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value), name
        with pytest.raises(DataError, match=re.escape(path.name)):
            read_mask(path)
    with pytest.raises(DataError, match=r"not found: .*missing\.png"):
        read_image(tmp_path / "missing.png")


# ------------------------------------------------------------------------------------------ pairing


def test_missing_mask_is_an_error_or_a_warned_skip(tmp_path):
    root = _pair_dir(tmp_path / "d", n=3)
    (root / "masks" / "s1.png").unlink()
    with pytest.raises(DataError, match=r"no mask for image .*s1\.png"):
        find_samples(root)
    with pytest.warns(UserWarning, match=r"skipped 1 images without a mask.*s1\.png"):
        samples = find_samples(root, skip_bad=True)
    assert [s.id for s in samples] == ["s0", "s2"]
    assert all(s.mask is None for s in find_samples(root / "images", require_masks=False))


def test_empty_and_missing_folders_name_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    for fn in (detect_layout, find_samples):
        with pytest.raises(DataError, match=re.escape(f"empty: {tmp_path / 'empty'}")):
            fn(tmp_path / "empty")
        with pytest.raises(DataError, match=re.escape(f"not found: {tmp_path / 'nope'}")):
            fn(tmp_path / "nope")
    (tmp_path / "e2" / "images").mkdir(parents=True)
    (tmp_path / "e2" / "masks").mkdir()
    with pytest.raises(DataError, match="no images"):
        find_samples(tmp_path / "e2")
    (tmp_path / "other" / "stuff").mkdir(parents=True)
    with pytest.raises(DataError, match="no image/mask folders"):
        detect_layout(tmp_path / "other")


def test_size_mismatch_names_both_files(tmp_path):
    root = _pair_dir(tmp_path / "d", n=2)
    _png(root / "masks" / "s1.png", np.zeros((10, 12), np.uint8))
    bad = find_samples(root)[1]
    with pytest.raises(DataError, match=r"s1\.png is 48x40 but its mask .*s1\.png is 12x10"):
        check_pair(bad)


def test_read_ids_strips_extensions_and_blanks(tmp_path):
    path = tmp_path / "split.txt"
    path.write_text("a.jpg\n\n  b  \nsub/c.png\nd.v2\na\n")
    assert read_ids(path) == ["a", "b", "c", "d.v2"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DataError, match="no ids"):
        read_ids(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="not found"):
        read_ids(tmp_path / "none.txt")


def test_split_samples_respects_test_ids_and_is_deterministic():
    samples = [Sample(f"{k:03d}", Path(f"{k}.png"), Path(f"m{k}.png")) for k in range(50)]
    test_ids = ["003", "010", "049"]
    a = split_samples(samples, test_ids=test_ids, val_fraction=0.2, seed=1)
    b = split_samples(list(reversed(samples)), test_ids=test_ids, val_fraction=0.2, seed=1)
    c = split_samples(samples, test_ids=test_ids, val_fraction=0.2, seed=2)
    assert [s.id for s in a.test] == test_ids
    assert len(a.val) == 9 and len(a.train) == 38
    ids = [{s.id for s in part} for part in (a.train, a.val, a.test)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert set().union(*ids) == {s.id for s in samples}
    assert a == b and a.val != c.val and set(s.id for s in c.test) == set(test_ids)
    assert split_samples(samples, val_fraction=0).val == []
    with pytest.raises(DataError, match=r"2 test ids are not in the data, e\.g\. x, y"):
        split_samples(samples, test_ids=["001", "x", "y"])
    with pytest.raises(ConfigError, match=r"1\.5"):
        split_samples(samples, val_fraction=1.5)


# ------------------------------------------------------------------------------------------ dataset


def test_check_size():
    assert check_size(256) == 256 and check_size(48) == 48 and check_size(8, stride=8) == 8
    for bad in (0, -16, 100, 250):
        with pytest.raises(ConfigError, match=f"got {bad}"):
            check_size(bad)
    with pytest.raises(ConfigError, match="100"):
        SegmentationDataset([], InputSpec(size=100))


def test_dataset_unaugmented_equals_preprocess_image(tmp_path):
    root = _pair_dir(tmp_path / "d", n=3, size=(40, 56))
    spec = InputSpec(size=32)
    ds = SegmentationDataset(find_samples(root), spec)
    assert len(ds) == 3 and ds.skipped == [] and ds.spec is spec
    for i, s in enumerate(ds.samples):
        x, y = ds[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert y.shape == (1, 32, 32) and y.dtype == torch.float32
        np.testing.assert_array_equal(x.numpy(), preprocess_image(read_image(s.image), spec))
        ref = cv2.resize(read_mask(s.mask), (32, 32), interpolation=cv2.INTER_NEAREST)
        np.testing.assert_array_equal(y[0].numpy(), ref.astype(np.float32))


def test_dataset_skip_bad_lists_each_file(tmp_path):
    root = _pair_dir(tmp_path / "d", n=4)
    _png(root / "masks" / "s1.png", np.zeros((10, 12), np.uint8))
    (root / "images" / "s2.png").write_bytes(b"")
    samples = find_samples(root)
    with pytest.raises(DataError, match=r"s1\.png"):
        SegmentationDataset(samples, InputSpec(size=16))
    with pytest.warns(UserWarning, match=r"skipped 2 unusable samples.*s1\.png.*s2\.png"):
        ds = SegmentationDataset(samples, InputSpec(size=16), skip_bad=True)
    assert [s.id for s in ds.samples] == ["s0", "s3"] and [p.name for p, _ in ds.skipped] == [
        "s1.png",
        "s2.png",
    ]


def test_augmentation_is_a_pure_function_of_seed_epoch_index(synth_dir):
    samples = find_samples(synth_dir)[:6]
    spec = InputSpec(size=32)
    a = SegmentationDataset(samples, spec, augment=True, seed=5)
    b = SegmentationDataset(samples, spec, augment=True, seed=5)
    plain = SegmentationDataset(samples, spec)
    a.set_epoch(3)
    b.set_epoch(3)
    first = [a[i] for i in range(6)]
    for i in reversed(range(6)):  # another order, another instance: the same items
        assert torch.equal(b[i][0], first[i][0]) and torch.equal(b[i][1], first[i][1])
    b.set_epoch(4)
    assert any(not torch.equal(b[i][0], first[i][0]) for i in range(6))
    assert any(not torch.equal(a[i][0], plain[i][0]) for i in range(6))
    for e in range(4):
        a.set_epoch(e)
        for i in range(6):
            x, y = a[i]
            assert x.shape == (3, 32, 32) and set(torch.unique(y).tolist()) <= {0.0, 1.0}


def test_set_epoch_reaches_persistent_workers(synth_dir):
    ds = SegmentationDataset(find_samples(synth_dir)[:4], InputSpec(size=32), augment=True, seed=1)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1, persistent_workers=True)
    seen = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        seen.append(next(iter(loader))[0])
    ds.set_epoch(1)
    np.testing.assert_array_equal(seen[1].numpy(), torch.stack([ds[i][0] for i in range(4)]).numpy())
    assert not torch.equal(seen[0], seen[1])


def test_no_stray_warnings_for_a_clean_folder(tmp_path):
    root = _pair_dir(tmp_path / "d", n=2)
    shutil.copy(root / "images" / "s0.png", root / "images" / ".hidden.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(find_samples(root)) == 2
    (root / "images" / "notes.txt").write_text("x")
    with pytest.warns(UserWarning, match="notes.txt"):
        find_samples(root)


def test_unaugmented_view_shares_arrays_and_matches_plain_dataset(synth_dir):
    from polyprune.data import SegmentationDataset, find_samples
    from polyprune.io import InputSpec

    samples = find_samples(synth_dir)[:4]
    spec = InputSpec(size=32)
    aug = SegmentationDataset(samples, spec, augment=True, seed=1)
    plain = SegmentationDataset(samples, spec, augment=False)
    view = aug.unaugmented()
    assert view.images is aug.images
    for i in range(len(samples)):
        assert torch.equal(view[i][0], plain[i][0]) and torch.equal(view[i][1], plain[i][1])
