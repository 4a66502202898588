from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from py_sod_metrics import MAE, DICEHandler, Emeasure, FmeasureV2, IOUHandler, Smeasure, WeightedFmeasure

from polyprune.metrics import (
    METRIC_KEYS,
    SegmentationMeter,
    jha_scores,
    pranet_curves,
    threshold_levels,
    to_uint8_map,
)


def _disc(h: int, w: int, cy: int, cx: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)


def _blurry_map(gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    import cv2

    prob = cv2.GaussianBlur(gt.astype(np.float32), (0, 0), 3) * rng.uniform(0.4, 1.0) + rng.uniform(0, 0.2)
    return np.clip(prob + rng.normal(0, 0.05, prob.shape), 0, 1)


# ----------------------------------------------------------------------------------------------- Jha


def test_jha_hand_worked_counts():
    gt = np.zeros((10, 10), np.uint8)
    gt[0, :10] = 1  # |G| = 10
    prob = np.zeros((10, 10), np.float32)
    prob[0, :6] = 0.9  # TP = 6, FN = 4
    prob[5, :2] = 0.7  # FP = 2
    s = jha_scores(prob, gt)
    assert s["precision"] == pytest.approx(0.75)
    assert s["recall"] == pytest.approx(0.6)
    assert s["dice"] == pytest.approx(12 / 18)
    assert s["iou"] == pytest.approx(0.5)
    assert s["f2"] == pytest.approx(5 * 0.75 * 0.6 / (4 * 0.75 + 0.6))  # 0.625
    assert s["f2"] == pytest.approx(0.625)


def test_jha_threshold_is_inclusive_and_uint8_reads_v_over_255():
    gt = np.array([[1, 1, 0, 0]], np.uint8)
    assert jha_scores(np.array([[0.5, 0.4999, 0.0, 0.0]]), gt)["recall"] == 0.5  # 0.5 >= 0.5 counts
    s8 = jha_scores(np.array([[128, 127, 0, 0]], np.uint8), gt)  # 128/255 >= 0.5 > 127/255
    assert s8["recall"] == 0.5 and s8["precision"] == 1.0
    assert jha_scores(np.array([[0.9, 0.9, 0.0, 0.0]]), gt, threshold=0.95)["dice"] == 0.0


def test_jha_empty_gt_conventions():
    empty = np.zeros((8, 8), np.uint8)
    some = empty.copy()
    some[2:4, 2:4] = 1
    both_empty = jha_scores(np.zeros((8, 8)), empty)
    assert both_empty == dict.fromkeys(("dice", "iou", "precision", "recall", "f2"), 1.0)
    false_alarm = jha_scores(some.astype(np.float32), empty)  # GT empty, prediction not
    assert set(false_alarm.values()) == {0.0}
    missed = jha_scores(np.zeros((8, 8)), some)  # GT non-empty, prediction empty
    assert set(missed.values()) == {0.0}


def test_gt_accepts_01_255_and_bool():
    rng = np.random.default_rng(1)
    gt = _disc(20, 24, 10, 12, 6)
    prob = _blurry_map(gt, rng)
    a = jha_scores(prob, gt)
    assert jha_scores(prob, gt * 255) == a
    assert jha_scores(prob, gt.astype(bool)) == a


@settings(max_examples=60, deadline=None)
@given(
    gt=arrays(np.bool_, (6, 7)),
    prob=arrays(np.float64, (6, 7), elements=st.floats(0, 1)),
)
def test_jha_properties(gt, prob):
    s = jha_scores(prob, gt)
    assert all(0.0 <= v <= 1.0 for v in s.values())
    assert s["dice"] == pytest.approx(2 * s["iou"] / (1 + s["iou"]))
    perfect = jha_scores(gt.astype(np.float64), gt)
    assert set(perfect.values()) == {1.0}


# -------------------------------------------------------------------------------------------- PraNet


def test_pranet_two_level_map_by_hand():
    gt = np.zeros((4, 4), np.uint8)
    gt[0, :] = 1  # |G| = 4 of N = 16
    map8 = np.zeros((4, 4), np.uint8)
    map8[0, :3] = 255  # 3 TP
    map8[3, 3] = 255  # 1 FP
    dice, iou = pranet_curves(map8, gt)
    # t = 1 .. 1/255 (255 thresholds): P = the four 255-pixels: dice 6/8, iou 3/(4 + 1)
    # t = 0: every pixel on: dice 2*4/(4 + 16), iou 4/16
    assert np.allclose(dice[:255], 0.75) and dice[255] == pytest.approx(0.4)
    assert np.allclose(iou[:255], 0.6) and iou[255] == pytest.approx(0.25)
    m = SegmentationMeter()
    row = m.step(map8, gt, "a")
    s = m.summary()
    assert s["mean_dice"] == pytest.approx((255 * 0.75 + 0.4) / 256)
    assert s["mean_iou"] == pytest.approx((255 * 0.6 + 0.25) / 256)
    assert s["max_dice"] == pytest.approx(0.75)
    assert s["mae"] == pytest.approx(2 / 16)  # one FP and one FN pixel on the {0, 1} map
    assert row["dice"] == pytest.approx(0.75) and row["mean_dice"] == s["mean_dice"]


def test_pranet_three_level_map_minmax_by_hand():
    gt = np.zeros((4, 4), np.uint8)
    gt[0, :] = 1
    map8 = np.zeros((4, 4), np.uint8)
    map8[0, :2] = 200  # normalized 1.0 -> passes every t
    map8[0, 2] = 100  # normalized 0.5 -> passes t <= 127/255 (0.5 < 128/255)
    map8[2, 2] = 100  # a background pixel at 0.5
    assert threshold_levels(map8)[0, 2] == 127 and threshold_levels(map8)[0, 0] == 255
    dice, iou = pranet_curves(map8, gt)
    assert np.allclose(dice[:128], 2 / 3) and np.allclose(iou[:128], 0.5)  # k = 255..128: P = 2 TP
    assert np.allclose(dice[128:255], 0.75) and np.allclose(iou[128:255], 0.6)  # k = 127..1: 3 TP + 1 FP
    assert dice[255] == pytest.approx(0.4)
    expected = (128 * 2 / 3 + 127 * 0.75 + 0.4) / 256
    m = SegmentationMeter()
    m.step(map8.astype(np.float64) / 255, gt)  # the same map as floats: round(prob * 255) gives it back
    assert m.summary()["mean_dice"] == pytest.approx(expected)


def test_pranet_conventions_perfect_constant_and_empty_gt():
    gt = _disc(20, 20, 10, 10, 5)
    g, n = gt.sum(), gt.size
    dice, _ = pranet_curves(gt * 255, gt)
    assert np.allclose(dice[:255], 1.0) and dice[255] == pytest.approx(2 * g / (g + n))
    assert dice.mean() == pytest.approx((255 + 2 * g / (g + n)) / 256)
    dice0, _ = pranet_curves(np.zeros_like(gt), gt)  # constant map stays at 0: only t = 0 turns it on
    assert np.all(dice0[:255] == 0) and dice0[255] == pytest.approx(2 * g / (g + n))
    dice_c, _ = pranet_curves(np.full_like(gt, 77), gt)  # constant 77/255: on for t <= 77/255
    assert np.all(dice_c[: 255 - 77] == 0) and np.allclose(dice_c[255 - 77 :], 2 * g / (g + n))
    empty = np.zeros_like(gt)
    for m8 in (empty, gt * 255):
        d, i = pranet_curves(m8, empty)  # toolbox: TP = 0 -> 0, even when both are empty
        assert not d.any() and not i.any()


def _brute_force_toolbox(map8: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Fmeasure_calu's Dice at 1:-1/255:0 on the mapminmax map, in exact rational arithmetic."""
    v = [int(x) for x in map8.ravel()]
    g = gt.ravel().astype(bool)
    lo, hi = min(v), max(v)
    p = [Fraction(x, 255) if hi == lo else Fraction(x - lo, hi - lo) for x in v]
    out = []
    for k in range(255, -1, -1):
        pred = [x >= Fraction(k, 255) for x in p]
        tp = sum(a and b for a, b in zip(pred, g, strict=True))
        out.append(0.0 if tp == 0 else 2 * tp / (int(g.sum()) + sum(pred)))
    return np.array(out)


@settings(max_examples=25, deadline=None)
@given(
    map8=arrays(np.uint8, (3, 4)),
    gt=arrays(np.bool_, (3, 4)),
)
def test_pranet_curves_match_brute_force_and_dice_iou_identity(map8, gt):
    dice, iou = pranet_curves(map8, gt)
    assert np.allclose(dice, _brute_force_toolbox(map8, gt))
    assert np.all((dice >= 0) & (dice <= 1))
    assert np.allclose(dice, 2 * iou / (1 + iou))


def _sod_dice_iou():
    return FmeasureV2({"dice": DICEHandler(True, False), "iou": IOUHandler(True, False)})


def test_pranet_dice_iou_agree_with_pysodmetrics():
    """FmeasureV2 + DICE/IOU handlers: same thresholds (>= k/255, order 1 -> 0), same TP = 0 -> 0.

    The one difference: pysodmetrics normalizes in floats and truncates p * 255, so a pixel lying
    exactly on a threshold can drop one level. With 0 and 255 in the map there are no such ties and the
    curves are identical; otherwise they agree to ~1e-4 in the mean.
    """
    rng = np.random.default_rng(0)
    exact, sod_exact = SegmentationMeter(), _sod_dice_iou()
    loose, sod_loose = SegmentationMeter(), _sod_dice_iou()
    for i in range(12):
        gt = _disc(30, 40, int(rng.integers(8, 22)), int(rng.integers(8, 32)), int(rng.integers(3, 9)))
        if i == 5:
            gt[:] = 0  # an empty GT frame: both give 0 at every threshold
        map8 = to_uint8_map(_blurry_map(gt, rng))
        full = map8.copy()
        full[0, 0], full[-1, -1] = 0, 255
        exact.step(full, gt)
        sod_exact.step(pred=full, gt=gt * 255)
        loose.step(map8, gt)
        sod_loose.step(pred=map8, gt=gt * 255)
    r = sod_exact.get_results()
    assert np.allclose(exact.dice_curve(), r["dice"]["dynamic"], atol=1e-12)
    assert np.allclose(np.mean(exact.iou_curves, axis=0), r["iou"]["dynamic"], atol=1e-12)
    s = exact.summary()
    assert s["mean_dice"] == pytest.approx(r["dice"]["dynamic"].mean(), abs=1e-12)
    assert s["max_dice"] == pytest.approx(r["dice"]["dynamic"].max(), abs=1e-12)
    assert s["mean_iou"] == pytest.approx(r["iou"]["dynamic"].mean(), abs=1e-12)
    r2, s2 = sod_loose.get_results(), loose.summary()
    assert s2["mean_dice"] == pytest.approx(r2["dice"]["dynamic"].mean(), abs=1e-3)
    assert s2["mean_iou"] == pytest.approx(r2["iou"]["dynamic"].mean(), abs=1e-3)
    assert s2["max_dice"] == pytest.approx(r2["dice"]["dynamic"].max(), abs=1e-3)


def test_meter_sod_metrics_are_pysodmetrics_on_the_8bit_map():
    rng = np.random.default_rng(3)
    meter = SegmentationMeter()
    sm, wfm, em, mae = Smeasure(), WeightedFmeasure(), Emeasure(), MAE()
    for _ in range(4):
        gt = _disc(24, 32, 12, 16, int(rng.integers(3, 9)))
        prob = _blurry_map(gt, rng)
        meter.step(prob, gt)
        map8 = np.rint(prob * 255).astype(np.uint8)
        for metric in (sm, wfm, em, mae):
            metric.step(pred=map8, gt=gt * 255)
    s = meter.summary()
    assert s["s_measure"] == pytest.approx(sm.get_results()["sm"])
    assert s["wf_measure"] == pytest.approx(wfm.get_results()["wfm"])
    assert s["mae"] == pytest.approx(mae.get_results()["mae"])
    curve = em.get_results()["em"]["curve"]
    assert s["mean_em"] == pytest.approx(curve.mean()) and s["max_em"] == pytest.approx(curve.max())
    assert WeightedFmeasure().beta == 1  # documented: beta = 1 as in the PraNet toolbox


# --------------------------------------------------------------------------------------------- meter


def test_meter_summary_keys_rows_and_averages():
    rng = np.random.default_rng(2)
    meter = SegmentationMeter()
    for i in range(5):
        gt = _disc(20, 30, 10, 10 + i, 4 + i)
        meter.step(_blurry_map(gt, rng), gt, f"img{i}")
    s = meter.summary()
    assert tuple(s) == (*METRIC_KEYS, "n_images", "n_empty", "fp_frames") and s["n_images"] == 5
    assert [r["id"] for r in meter.rows] == [f"img{i}" for i in range(5)]
    for k in ("dice", "iou", "precision", "recall", "f2", "mean_dice", "mean_iou", "s_measure", "mae"):
        assert s[k] == pytest.approx(np.mean([r[k] for r in meter.rows]))  # per-image means
    assert s["max_dice"] >= s["mean_dice"] and s["max_em"] >= s["mean_em"]
    assert all(0 <= s[k] <= 1 for k in METRIC_KEYS if k not in ("mean_em", "max_em"))


def test_meter_perfect_prediction():
    gt = _disc(32, 32, 16, 16, 8)
    meter = SegmentationMeter()
    meter.step(gt.astype(np.float32), gt)
    s = meter.summary()
    assert s["dice"] == s["iou"] == s["max_dice"] == 1.0
    assert s["mae"] == 0.0 and s["s_measure"] == pytest.approx(1.0, abs=1e-6)
    assert s["wf_measure"] == pytest.approx(1.0, abs=1e-6)


_NEAR_HALF = [float(np.nextafter(np.float32(0.5), np.float32(d))) for d in (0, 1)] + [0.5]


@settings(max_examples=30, deadline=None)
@given(
    prob=arrays(
        np.float32, (5, 6), elements=st.one_of(st.floats(0.25, 0.75, width=32), st.sampled_from(_NEAR_HALF))
    )
)
def test_float_and_saved_uint8_maps_score_identically(prob):
    """Scoring round(prob * 255) (a saved PNG) gives the same row as scoring prob: `>= 0.5` <=> `>= 128`."""
    gt = np.zeros((5, 6), np.uint8)
    gt[1:4, 1:4] = 1
    a, b = SegmentationMeter(), SegmentationMeter()
    assert a.step(prob, gt) == b.step(to_uint8_map(prob), gt)


def test_meter_rejects_bad_inputs():
    m = SegmentationMeter()
    with pytest.raises(ValueError, match="differ in size"):
        m.step(np.zeros((4, 4)), np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        m.step(np.full((4, 4), np.nan), np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        m.step(np.full((4, 4), 3.0), np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="before any step"):
        m.summary()


def test_false_alarms_on_polyp_free_frames():
    empty = np.zeros((32, 32), np.uint8)
    meter = SegmentationMeter()
    meter.step(np.zeros((32, 32), np.float32), empty, "clean")  # empty frame, nothing predicted
    speck = np.zeros((32, 32), np.float32)
    speck[3, 4] = 0.6  # one pixel over 0.5 on a polyp-free frame: a false alarm
    meter.step(speck, empty, "speck")
    low = np.full((32, 32), 0.49, np.float32)  # below the threshold everywhere: no alarm
    meter.step(low, empty, "low")
    gt = _disc(32, 32, 16, 16, 8)
    meter.step(gt.astype(np.float32), gt, "polyp")  # frames with a polyp never count
    s = meter.summary()
    assert (s["n_empty"], s["fp_frames"]) == (3, 1)
    assert [r["false_alarm"] for r in meter.rows] == [False, True, False, False]
