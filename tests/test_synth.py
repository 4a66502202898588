"""Synthetic polyps: deterministic, in the Kvasir-SEG layout, and not solvable by a colour threshold."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from polyprune.data import detect_layout, find_samples
from polyprune.errors import ConfigError
from polyprune.images import read_image, read_mask
from polyprune.synth import make_synthetic_dataset, synth_sample


def test_synth_sample_is_deterministic_and_well_formed():
    a = synth_sample(np.random.default_rng(3), 64)
    b = synth_sample(np.random.default_rng(3), 64)
    c = synth_sample(np.random.default_rng(4), 64)
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    assert a[0].tobytes() != c[0].tobytes()
    image, mask = a
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert mask.shape == (64, 64) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    with pytest.raises(ConfigError, match="got 16"):
        synth_sample(np.random.default_rng(0), 16)


def test_dataset_files_are_deterministic_and_kvasir_layout(synth_dir, tmp_path):
    assert detect_layout(synth_dir) == "kvasir"
    samples = find_samples(synth_dir)
    assert len(samples) == 24 and samples[0].id == "synth_00000" and samples[0].mask.suffix == ".png"
    again = make_synthetic_dataset(tmp_path / "again", n=3, size=64, seed=0)
    for s in samples[:3]:
        for kind, path in (("images", s.image), ("masks", s.mask)):
            assert (again / kind / path.name).read_bytes() == path.read_bytes()
    image, mask = read_image(samples[0].image), read_mask(samples[0].mask)
    assert image.shape == (64, 64, 3) and mask.shape == (64, 64)
    # the PNG mask is exact: it is what synth_sample drew
    _, drawn = synth_sample(np.random.default_rng((0, 0)), 64)
    np.testing.assert_array_equal(mask, drawn)
    with pytest.raises(ConfigError):
        make_synthetic_dataset(tmp_path / "x", n=1, size=31)


def _best_threshold_dice(values: list[np.ndarray], masks: list[np.ndarray]) -> float:
    """Dice of the best single threshold (either direction) over all images, chosen knowing the masks."""
    fg = sum(np.bincount(v[m == 1], minlength=256) for v, m in zip(values, masks, strict=True))
    bg = sum(np.bincount(v[m == 0], minlength=256) for v, m in zip(values, masks, strict=True))
    best = 0.0
    for f, b in ((fg, bg), (fg[::-1], bg[::-1])):  # predict polyp for v >= t, or for v <= t
        tp, fp = np.cumsum(f[::-1]), np.cumsum(b[::-1])
        best = max(best, float((2 * tp / (tp + fp + fg.sum())).max()))
    return best


def test_colour_threshold_cannot_segment_the_polyps():
    pairs = [synth_sample(np.random.default_rng((11, k)), 96) for k in range(20)]
    images, masks = [p[0] for p in pairs], [p[1] for p in pairs]
    fractions = [m.mean() for m in masks]
    assert 0.02 < np.mean(fractions) < 0.4
    assert sum(m.any() for m in masks) >= 18  # nearly every frame shows a polyp
    features = {
        "R": [im[..., 0] for im in images],
        "G": [im[..., 1] for im in images],
        "B": [im[..., 2] for im in images],
        "gray": [cv2.cvtColor(im, cv2.COLOR_RGB2GRAY) for im in images],
        "hue": [cv2.cvtColor(im, cv2.COLOR_RGB2HSV)[..., 0] for im in images],
        "saturation": [cv2.cvtColor(im, cv2.COLOR_RGB2HSV)[..., 1] for im in images],
    }
    for name, values in features.items():
        assert _best_threshold_dice(values, masks) < 0.5, name


def test_cli_synth_writes_pairs_and_rejects_a_bad_size(tmp_path):
    from polyprune.cli import app

    runner = CliRunner()
    out = tmp_path / "s"
    res = runner.invoke(
        app, ["synth", "--out", str(out), "--n", "2", "--size", "48", "--seed", "1", "--quiet"]
    )
    assert res.exit_code == 0, res.output
    assert f"wrote 2 synthetic pairs (48 px) to {out}" in res.output
    assert len(find_samples(out)) == 2
    res = runner.invoke(app, ["synth", "--out", str(tmp_path / "t"), "--size", "8", "--quiet"])
    assert isinstance(res.exception, ConfigError) and "8" in str(res.exception)
