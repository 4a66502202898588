"""Segmentation metrics: the Jha protocol (binary mask at 0.5) and the PraNet toolbox protocol.

Both are computed per image at GT resolution and averaged over images. Notation: G is the binary GT,
P the binarized prediction, TP = |P ∩ G|, FP = |P \\ G|, FN = |G \\ P|.

Inputs. `prob` is a float map in [0, 1] or an 8-bit map 0..255 (read as v / 255), already at the GT
size (resizing is the caller's job). `gt` is bool, {0, 1}, or 0..255 (then binarized `> 128`, as the
toolbox does).

Jha protocol (Jha et al., IEEE Access 2021; what a deployed binary overlay shows)
    P = prob >= threshold (0.5). Jha's code uses `> 0.5`, the PraNet toolbox `>=`; the two differ only
    for pixels exactly at 0.5, which no 8-bit map holds (127/255 < 0.5 < 128/255).
        dice      = 2 TP / (2 TP + FP + FN)
        iou       = TP / (TP + FP + FN)
        precision = TP / (TP + FP)
        recall    = TP / (TP + FN)
        f2        = 5 precision recall / (4 precision + recall)
    Empty-GT convention: when TP = 0 every score is 0, except when G and P are both empty (a correct
    negative frame), where every score (dice, iou, precision, recall, f2) is 1. So an empty GT scores
    1 with an empty prediction and 0 with any false positive.
    Reported: the mean over images of each per-image score.

PraNet protocol (replicates `eval/main.m` of the PraNet MATLAB toolbox)
    The map is taken as the 8-bit image the toolbox would read, round(prob * 255), and min-max
    normalized per image (MATLAB `mapminmax`; a constant map is left as v / 255).
    Thresholds t_k = k / 255 for k = 255, 254, ..., 0 (`1:-1/255:0`, 256 values), P_k = map >= t_k.
    Per image and threshold, with the toolbox convention "TP = 0 gives 0" (even when G and P_k are
    both empty, so an empty-GT image always scores 0 here):
        dice_k = 2 TP / (|G| + |P_k|)
        iou_k  = TP / (|P_k| + FN)
    Dataset curve: the mean over images at each threshold.
        mean_dice = mean of the dice curve over the 256 thresholds   ("meanDic", not Dice@0.5)
        mean_iou  = mean of the iou curve                             ("meanIoU")
        max_dice  = max of the dice curve (one global threshold, picked on the data itself)
    Threshold t_0 = 0 turns every pixel on, so even a perfect binary map gets mean_dice slightly
    below 1: (255 + 2|G| / (|G| + N)) / 256 for N pixels.
    The thresholding is exact integer arithmetic on the 8-bit map (pixel v passes t_k iff
    255 (v - vmin) >= k (vmax - vmin)), computed for all 256 thresholds at once from a histogram and
    a cumulative sum. Float implementations (MATLAB, pysodmetrics) can flip pixels lying exactly on a
    threshold; on typical maps mean_dice moves by under 1e-4.
    From pysodmetrics (`py_sod_metrics`, fed the same 8-bit map and the GT as 0/255; it min-max
    normalizes like the toolbox), per image and then averaged over images:
        s_measure  = S_alpha, alpha = 0.5 (Fan et al. ICCV 2017); empty GT: 1 - mean(map)
        wf_measure = weighted F (Margolin et al. CVPR 2014) with beta = 1 as in the toolbox
                     (pysodmetrics' `WeightedFmeasure` default; it computes (1 + beta) R P / (R + beta P),
                     identical to the toolbox's (1 + beta^2) ... / (R + beta P) at beta = 1);
                     empty GT: 0 (the toolbox gives NaN there)
        mean_em, max_em = E_phi (Fan et al. IJCAI 2018) over the same 256 thresholds, mean / max of
                     the dataset curve like the Dice. pysodmetrics binarizes with `>=`; the toolbox's
                     main.m uses `>` for E_phi only, so E_phi can differ from the toolbox in the 3rd digit.
        mae        = mean |map - G| on the normalized map
    GT binarization: the toolbox uses `gt > 128`; `polyprune.images.read_mask` uses `> 127` (pixels of
    value 128 in a raw mask differ).
"""

from __future__ import annotations

import numpy as np
from py_sod_metrics import MAE, Emeasure, Smeasure, WeightedFmeasure

METRIC_KEYS = (
    "dice",
    "iou",
    "precision",
    "recall",
    "f2",
    "mean_dice",
    "mean_iou",
    "max_dice",
    "s_measure",
    "wf_measure",
    "mean_em",
    "max_em",
    "mae",
)
JHA_KEYS = ("dice", "iou", "precision", "recall", "f2")
N_THRESHOLDS = 256


# ------------------------------------------------------------------------------------------- inputs


def binarize_gt(gt: np.ndarray) -> np.ndarray:
    """bool as is; {0, 1} maps -> `> 0.5`; 0..255 maps -> `> 128` (the toolbox's GT rule)."""
    gt = np.asarray(gt)
    if gt.dtype == bool:
        return gt
    return gt > (128 if gt.size and gt.max() > 1 else 0.5)


def _check_prob(prob: np.ndarray) -> np.ndarray:
    prob = np.asarray(prob)
    if prob.ndim != 2:
        raise ValueError(f"prediction must be a 2-D map, got shape {prob.shape}")
    if prob.dtype != np.uint8 and prob.dtype != bool:
        if not np.isfinite(prob).all():
            raise ValueError("prediction holds NaN or inf values")
        if prob.size and (prob.min() < -1e-6 or prob.max() > 1 + 1e-6):
            raise ValueError(f"float prediction must lie in [0, 1], got [{prob.min():.4g}, {prob.max():.4g}]")
    return prob


def to_uint8_map(prob: np.ndarray) -> np.ndarray:
    """The 8-bit map the toolbox would read: uint8 as is, bool -> 0/255, float -> round(prob * 255)."""
    prob = np.asarray(prob)
    if prob.dtype == np.uint8:
        return prob
    if prob.dtype == bool:
        return prob.astype(np.uint8) * 255
    # float64: float32 products can round 0.49999997 * 255 up to 127.5, breaking `>= 0.5` <=> `>= 128`
    return np.rint(np.clip(prob.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)


def _as_float(prob: np.ndarray) -> np.ndarray:
    if prob.dtype == np.uint8:
        return prob.astype(np.float64) / 255.0
    return prob


# ---------------------------------------------------------------------------------------------- Jha


def jha_scores(prob: np.ndarray, gt: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Per-image dice, iou, precision, recall, f2 of `prob >= threshold` (see the module docstring)."""
    prob = _check_prob(prob)
    g = binarize_gt(gt)
    if prob.shape != g.shape:
        raise ValueError(f"prediction {prob.shape} and GT {g.shape} differ in size")
    p = prob if prob.dtype == bool else _as_float(prob) >= threshold
    tp = int(np.count_nonzero(p & g))
    fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(g)) - tp
    if tp == 0:  # nothing found: 0, unless there was nothing to find and nothing was claimed
        value = 1.0 if fp == 0 and fn == 0 else 0.0
        return dict.fromkeys(JHA_KEYS, value)
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return {
        "dice": 2 * tp / (2 * tp + fp + fn),
        "iou": tp / (tp + fp + fn),
        "precision": precision,
        "recall": recall,
        "f2": 5 * precision * recall / (4 * precision + recall),
    }


# ------------------------------------------------------------------------------------------- PraNet


def threshold_levels(map8: np.ndarray) -> np.ndarray:
    """Per pixel, the largest k (0..255) with normalized map >= k / 255: it passes thresholds t_0..t_k.

    Exact in integers: after mapminmax the pixel is (v - lo) / (hi - lo), and (v - lo) / (hi - lo)
    >= k / 255 <=> 255 (v - lo) >= k (hi - lo). A constant map is not rescaled (mapminmax leaves it),
    so its pixels sit at v / 255 and pass k <= v.
    """
    v = np.asarray(map8, dtype=np.int64)
    lo, hi = int(v.min()), int(v.max())
    if hi == lo:
        return v
    return (255 * (v - lo)) // (hi - lo)


def pranet_curves(map8: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image Dice and IoU at the toolbox's 256 thresholds, ordered like `1:-1/255:0`.

    One histogram of threshold levels over the GT pixels and one over all pixels; reversed cumulative
    sums give TP and |P| for every threshold at once.
    """
    g = binarize_gt(gt)
    levels = threshold_levels(map8)
    fg_hist = np.bincount(levels[g], minlength=N_THRESHOLDS)
    all_hist = np.bincount(levels.ravel(), minlength=N_THRESHOLDS)
    tp = np.cumsum(fg_hist[::-1]).astype(np.float64)  # index 0 <-> t = 1 (k = 255), index 255 <-> t = 0
    npred = np.cumsum(all_hist[::-1]).astype(np.float64)
    ngt = float(np.count_nonzero(g))
    fn = ngt - tp
    ok = tp > 0  # toolbox: TP = 0 -> 0, also when GT and prediction are both empty
    dice = np.divide(2 * tp, ngt + npred, out=np.zeros(N_THRESHOLDS), where=ok)
    iou = np.divide(tp, npred + fn, out=np.zeros(N_THRESHOLDS), where=ok)
    return dice, iou


# -------------------------------------------------------------------------------------------- meter


class SegmentationMeter:
    """Accumulates both protocols over a dataset; `step` per image, `summary` at the end.

    `rows` holds one dict per image for the CSV: id, the Jha scores, and the per-image PraNet values
    (mean_dice, mean_iou, mean_em = means over this image's 256 thresholds; s_measure, wf_measure,
    mae). Dataset max_dice / max_em are maxima of the mean curve, so they have no per-image value.
    """

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold
        self.rows: list[dict] = []
        self.dice_curves: list[np.ndarray] = []
        self.iou_curves: list[np.ndarray] = []
        self._sm, self._wfm, self._em, self._mae = Smeasure(), WeightedFmeasure(beta=1), Emeasure(), MAE()

    def __len__(self) -> int:
        return len(self.rows)

    def step(self, prob: np.ndarray, gt: np.ndarray, image_id: str = "") -> dict[str, float]:
        prob = _check_prob(prob)
        g = binarize_gt(gt)
        if prob.shape != g.shape:
            raise ValueError(
                f"{image_id or 'image'}: prediction {prob.shape} and GT {g.shape} differ in size"
            )
        map8 = to_uint8_map(prob)
        gt8 = g.astype(np.uint8) * 255  # pysodmetrics binarizes its GT with > 128
        row: dict = {"id": image_id, **jha_scores(prob, g, self.threshold)}
        # a polyp-free frame with any pixel over the threshold is a false alarm to the clinician
        row["empty_gt"] = not g.any()
        row["false_alarm"] = row["empty_gt"] and bool((prob >= self.threshold).any())
        dice, iou = pranet_curves(map8, g)
        self.dice_curves.append(dice)
        self.iou_curves.append(iou)
        for metric in (self._sm, self._wfm, self._em, self._mae):
            metric.step(pred=map8, gt=gt8)
        row.update(
            mean_dice=float(dice.mean()),
            mean_iou=float(iou.mean()),
            s_measure=float(self._sm.sms[-1]),
            wf_measure=float(self._wfm.weighted_fms[-1]),
            mean_em=float(np.mean(self._em.changeable_ems[-1])),
            mae=float(self._mae.maes[-1]),
        )
        self.rows.append(row)
        return row

    def dice_curve(self) -> np.ndarray:
        """Dataset Dice curve over the 256 thresholds (t = 1 first)."""
        return np.mean(self.dice_curves, axis=0)

    def summary(self) -> dict[str, float]:
        """Every METRIC_KEYS value over the images seen so far, plus n_images, and n_empty (frames whose
        GT is empty) with fp_frames (those of them with any predicted pixel: false alarms)."""
        if not self.rows:
            raise ValueError("SegmentationMeter.summary() before any step()")
        out = {k: float(np.mean([r[k] for r in self.rows])) for k in JHA_KEYS}
        dice_curve, iou_curve = self.dice_curve(), np.mean(self.iou_curves, axis=0)
        em_curve = self._em.get_results()["em"]["curve"]
        out.update(
            mean_dice=float(dice_curve.mean()),
            mean_iou=float(iou_curve.mean()),
            max_dice=float(dice_curve.max()),
            s_measure=float(self._sm.get_results()["sm"]),
            wf_measure=float(self._wfm.get_results()["wfm"]),
            mean_em=float(em_curve.mean()),
            max_em=float(em_curve.max()),
            mae=float(self._mae.get_results()["mae"]),
        )
        return {
            **{k: out[k] for k in METRIC_KEYS},
            "n_images": len(self.rows),
            "n_empty": sum(r["empty_gt"] for r in self.rows),
            "fp_frames": sum(r["false_alarm"] for r in self.rows),
        }
