"""Evaluation: run a model over datasets, or score saved probability maps, under both protocols.

Metric definitions are in `polyprune.metrics`. Everything is scored at GT resolution, per image:

- `evaluate_model` runs `Predictor.predict` (probability at the image's own size; bilinearly resized
  to the mask size if the two differ) and feeds `SegmentationMeter`.
- `evaluate_predictions` scores saved 8-bit maps like the PraNet toolbox: the map named like the GT
  (`<id>.png`) is resized to the GT size if it differs (bilinear; MATLAB's `imresize` is bicubic, and
  unlike the toolbox we never overwrite the file), then min-max normalized inside the PraNet metrics.
  Dice@0.5 etc. are computed on the map as saved (v / 255 >= 0.5, no normalization), so they mean
  "model probability >= 0.5" for maps written by `save_preds`.

Maps written by `save_preds` are round(prob * 255) at GT resolution, not normalized (PraNet's MyTest
normalizes before saving; the toolbox normalizes again anyway, so its numbers are unaffected). Scoring
them with `evaluate_predictions` gives exactly the numbers `evaluate_model` reported.

Outputs: `<out_dir>/metrics.json` = `{dataset: {METRIC_KEYS..., n_images}, "_meta": {...}}` and
`<out_dir>/<dataset>_per_image.csv`; prediction PNGs under `<save_preds>/<dataset>/<id>.png`.
"""

from __future__ import annotations

import csv
import io
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from rich.table import Table

from polyprune.data import find_samples, read_ids
from polyprune.errors import ConfigError, DataError, ModelFileError, one_line
from polyprune.files import atomic_write_bytes, atomic_write_text, write_json
from polyprune.images import Sample, check_sizes, png_problem, read_image, read_mask
from polyprune.metrics import JHA_KEYS, SegmentationMeter, to_uint8_map
from polyprune.progress import progress_bar

PROTOCOL_NOTE = (
    "dice/iou/precision/recall/f2: per image at prob >= 0.5 (Jha), empty GT + empty prediction = 1; "
    "mean_dice/mean_iou/max_dice/mean_em/max_em: PraNet toolbox, 256 thresholds on the min-max "
    "normalized 8-bit map, mean/max of the dataset curve; s_measure/wf_measure(beta=1)/mae: "
    "pysodmetrics, per image mean; all at GT resolution"
)
CSV_KEYS = ("id", *JHA_KEYS, "mean_dice", "mean_iou", "s_measure", "wf_measure", "mean_em", "mae")


class EvalResults(dict):
    """`{dataset: summary}` (every METRIC_KEYS key + n_images); `.meta` is written as "_meta" in JSON."""

    def __init__(self, *args: Any, meta: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.meta: dict[str, Any] = meta or {}

    def to_json(self) -> dict[str, Any]:
        return {**self, "_meta": self.meta}


# ------------------------------------------------------------------------------------------ datasets


def _datasets(data_dirs: Sequence[str | Path]) -> list[tuple[str, Path]]:
    """(name, folder) per dataset; name = the folder name, made unique with a suffix if repeated."""
    if not data_dirs:
        raise ConfigError("no dataset given: pass at least one --data DIR")
    out: list[tuple[str, Path]] = []
    seen: set[Path] = set()
    for d in data_dirs:
        root = Path(d)
        if not root.is_dir():
            raise DataError(f"dataset folder not found: {root}")
        if root.resolve() in seen:
            raise ConfigError(f"dataset folder given twice: {root}")
        seen.add(root.resolve())
        name, names, i = root.resolve().name, {n for n, _ in out}, 2
        while name in names:  # two folders both called e.g. "test"
            name, i = f"{root.resolve().name}_{i}", i + 1
        out.append((name, root))
    return out


def _select(root: Path, ids: list[str] | None, ids_file: str | Path | None, skip_bad: bool) -> list[Sample]:
    samples = find_samples(root, require_masks=True, skip_bad=skip_bad)
    if ids is not None:
        wanted = set(ids)
        samples = [s for s in samples if s.id in wanted]
        if not samples:
            raise DataError(f"none of the {len(wanted)} ids in {ids_file} is in {root}")
    if not samples:
        raise DataError(f"no image/mask pairs found in {root}")
    return samples


def _select_all(
    datasets: list[tuple[str, Path]], ids: list[str] | None, ids_file: str | Path | None, skip_bad: bool
) -> dict[str, list[Sample]]:
    """The pairs to score per dataset; an id of the split file found in none of them is a DataError
    (scoring 1 of 2 wanted images without a word is a silently wrong number)."""
    selected = {name: _select(root, ids, ids_file, skip_bad) for name, root in datasets}
    if ids is not None:
        found = {s.id for samples in selected.values() for s in samples}
        absent = [i for i in ids if i not in found]
        if absent:
            raise DataError(
                f"{len(absent)} of the {len(ids)} ids in {ids_file} are in no --data folder, e.g. "
                f"{', '.join(absent[:3])}"
            )
    return selected


# --------------------------------------------------------------------------------------------- files


def write_png(path: str | Path, image: np.ndarray) -> Path:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise DataError(f"cannot encode {path} as PNG")
    return atomic_write_bytes(path, buf.tobytes())


def read_prediction(path: Path) -> np.ndarray:
    """A saved map as the toolbox reads it: first channel of RGB (R), uint8; 16-bit -> float in [0, 1]."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
        problem = "empty file" if data.size == 0 else png_problem(data)  # libpng would print its own lines
        if problem:
            raise DataError(f"cannot decode prediction {path}: {problem}")
        img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except (OSError, cv2.error) as exc:
        raise DataError(f"cannot read prediction {path} ({one_line(exc)})") from exc
    if img is None:
        raise DataError(f"cannot decode prediction {path}: not an image")
    if img.ndim == 3:
        img = img[:, :, 2] if img.shape[2] >= 3 else img[:, :, 0]  # OpenCV is BGR(A): index 2 is R
    if img.dtype == np.uint16:
        return img.astype(np.float64) / 65535.0
    if img.dtype != np.uint8:
        raise DataError(f"prediction {path} has pixel type {img.dtype}; expected 8-bit gray")
    return img


def write_per_image_csv(path: str | Path, rows: list[dict]) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_KEYS)
    for r in rows:
        writer.writerow([r["id"], *(f"{r[k]:.6f}" for k in CSV_KEYS[1:])])
    return atomic_write_text(path, buf.getvalue())


def write_outputs(out_dir: str | Path, results: EvalResults, meters: dict[str, SegmentationMeter]) -> None:
    """`<out_dir>/metrics.json` and one `<out_dir>/<dataset>_per_image.csv` per dataset."""
    out_dir = Path(out_dir)
    for name, meter in meters.items():
        write_per_image_csv(out_dir / f"{name}_per_image.csv", meter.rows)
    write_json(out_dir / "metrics.json", results.to_json())


def _resize_to(pred: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if pred.shape == shape:
        return pred
    return cv2.resize(pred, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


# ---------------------------------------------------------------------------------------- evaluation


def _predictor(model: Any, backend: str, threads: int | None, tta: str) -> Any:
    """A Predictor-like object (anything with `.predict(rgb) -> prob`), or one built from a path/module."""
    if callable(getattr(model, "predict", None)):
        if tta != "none":
            raise ConfigError("tta is set on the Predictor itself (Predictor(..., tta=...)), not here")
        return model
    from polyprune.predictor import Predictor  # here: scoring saved maps never needs the backends

    return Predictor(model, backend=backend, threads=threads, tta=tta)


def _model_label(model: Any, predictor: Any) -> str:
    if isinstance(model, str | Path):
        return str(model)
    return getattr(predictor, "source", None) or type(model).__name__


def evaluate_model(
    model: Any,
    data_dirs: Sequence[str | Path],
    *,
    ids_file: str | Path | None = None,
    backend: str = "auto",
    threads: int | None = None,
    save_preds: str | Path | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    skip_bad: bool = False,
    tta: str = "none",
) -> EvalResults:
    """Run `model` on every image/mask pair of each dataset folder; one summary per dataset.

    `model`: a model file (.safetensors / .onnx), an nn.Module, or any object with
    `.predict(rgb_uint8) -> float (H, W) probabilities` (a `Predictor`). Returns `EvalResults`
    `{dataset folder name: {METRIC_KEYS..., n_images}}` with the run's context in `.meta`.
    `tta` (`polyprune.tta`: none | hflip | flips | d4) averages the logits over flipped / turned views.
    """
    datasets = _datasets(data_dirs)
    ids = read_ids(ids_file) if ids_file is not None else None
    predictor = _predictor(model, backend, threads, tta)
    label = _model_label(model, predictor)
    spec = getattr(predictor, "input_spec", None)
    results = EvalResults(
        meta={
            "mode": "model",
            "model": label,
            "backend": getattr(predictor, "backend", backend),
            "input_size": getattr(spec, "size", None),
            "threshold": 0.5,
            "tta": getattr(predictor, "tta", "none"),
            "ids_file": str(ids_file) if ids_file is not None else None,
            "data": {name: str(root) for name, root in datasets},
            "save_preds": str(save_preds) if save_preds is not None else None,
            "protocol": PROTOCOL_NOTE,
            "skipped": {},
            "seconds": {},
        }
    )
    meters: dict[str, SegmentationMeter] = {}
    selected = _select_all(datasets, ids, ids_file, skip_bad)
    for name, root in datasets:
        samples = selected[name]
        meter, skipped, t0 = SegmentationMeter(), [], time.perf_counter()
        with progress_bar(total=len(samples), desc=f"evaluate {name}", enabled=progress) as bar:
            for s in samples:
                bar.advance()
                try:
                    image, gt = read_image(s.image), read_mask(s.mask)
                    check_sizes(s, image, gt)  # a pair of different sizes is not aligned: as in training
                except DataError:
                    if not skip_bad:
                        raise
                    skipped.append(s.id)
                    warnings.warn(f"skipped unreadable pair {s.image} / {s.mask}", UserWarning, stacklevel=2)
                    continue
                prob = _resize_to(np.asarray(predictor.predict(image), dtype=np.float32), gt.shape)
                if not np.isfinite(prob).all():
                    raise ModelFileError(f"{label} gives NaN/inf probabilities on {s.image}")
                prob = np.clip(prob, 0.0, 1.0)  # fp16 / ONNX backends can overshoot by an ulp
                meter.step(prob, gt, s.id)
                if save_preds is not None:
                    write_png(Path(save_preds) / name / f"{s.id}.png", to_uint8_map(prob))
        if not len(meter):
            raise DataError(f"every pair in {root} was unreadable (skipped {len(skipped)})")
        results[name] = meter.summary()
        results.meta["skipped"][name] = skipped
        results.meta["seconds"][name] = round(time.perf_counter() - t0, 3)
        meters[name] = meter
    if out_dir is not None:
        write_outputs(out_dir, results, meters)
    return results


def evaluate_predictions(
    pred_dir: str | Path,
    data_dirs: Sequence[str | Path],
    *,
    ids_file: str | Path | None = None,
    progress: bool = True,
    out_dir: str | Path | None = None,
    skip_bad: bool = False,
) -> EvalResults:
    """Score saved maps `<pred_dir>/<dataset>/<id>.png` (or `<pred_dir>/<id>.png`) against the GT masks.

    Same result type as `evaluate_model`. A GT without its map is a DataError naming the missing file.
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise DataError(f"prediction folder not found: {pred_dir}")
    datasets = _datasets(data_dirs)
    ids = read_ids(ids_file) if ids_file is not None else None
    results = EvalResults(
        meta={
            "mode": "predictions",
            "preds": str(pred_dir),
            "threshold": 0.5,
            "ids_file": str(ids_file) if ids_file is not None else None,
            "data": {name: str(root) for name, root in datasets},
            "protocol": PROTOCOL_NOTE,
            "pred_folders": {},
        }
    )
    meters: dict[str, SegmentationMeter] = {}
    selected = _select_all(datasets, ids, ids_file, skip_bad)
    reshaped: list[str] = []
    for name, _root in datasets:
        samples = selected[name]
        folder = pred_dir / name if (pred_dir / name).is_dir() else pred_dir
        missing = [folder / f"{s.id}.png" for s in samples if not (folder / f"{s.id}.png").is_file()]
        if missing:  # check all first: fail before minutes of scoring, and say how many
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(f"no prediction for GT {name}/{missing[0].stem}: {missing[0]} is missing{more}")
        meter = SegmentationMeter()
        with progress_bar(total=len(samples), desc=f"score {name}", enabled=progress) as bar:
            for s in samples:
                gt = read_mask(s.mask)
                pred = read_prediction(folder / f"{s.id}.png")
                if (
                    abs(pred.shape[0] / pred.shape[1] - gt.shape[0] / gt.shape[1])
                    > 0.01 * gt.shape[0] / gt.shape[1]
                ):
                    reshaped.append(f"{name}/{s.id}")  # a map of another image, or cropped: say so
                meter.step(_resize_to(pred, gt.shape), gt, s.id)
                bar.advance()
        results[name] = meter.summary()
        results.meta["pred_folders"][name] = str(folder)
        meters[name] = meter
    if reshaped:
        warnings.warn(
            f"{len(reshaped)} prediction maps have another aspect ratio than their ground truth and were "
            f"stretched to it (e.g. {', '.join(reshaped[:3])}): are they maps of these images?",
            UserWarning,
            stacklevel=2,
        )
    results.meta["reshaped"] = reshaped
    if out_dir is not None:
        write_outputs(out_dir, results, meters)
    return results


# ------------------------------------------------------------------------------------------- display

TABLE_COLUMNS = (  # (header, key): the PraNet paper tables plus the Jha @0.5 scores
    ("Dice@0.5", "dice"),
    ("IoU@0.5", "iou"),
    ("mDice", "mean_dice"),
    ("mIoU", "mean_iou"),
    ("maxDice", "max_dice"),
    ("Sα", "s_measure"),
    ("wFβ", "wf_measure"),
    ("mEφ", "mean_em"),
    ("maxEφ", "max_em"),
    ("MAE", "mae"),
)


def results_table(results: dict[str, dict]) -> Table:
    """One row per dataset: n, Dice@0.5, IoU@0.5, mDice, mIoU, maxDice, Sα, wFβ, mEφ, maxEφ, MAE."""
    table = Table(title="polyp segmentation (Dice/IoU@0.5: Jha; m/max: PraNet toolbox, 256 thresholds)")
    table.add_column("dataset")
    table.add_column("n", justify="right")
    for header, _ in TABLE_COLUMNS:
        table.add_column(header, justify="right")
    for name, r in results.items():
        if name.startswith("_"):
            continue
        table.add_row(name, str(r["n_images"]), *(f"{r[k]:.3f}" for _, k in TABLE_COLUMNS))
    return table


def summary_line(results: dict[str, dict]) -> str:
    """One line: per dataset n, Dice@0.5 and PraNet mDice."""
    parts = [
        f"{name} n={r['n_images']} Dice@0.5 {r['dice']:.4f} mDice {r['mean_dice']:.4f}"
        + (f" false alarms {r['fp_frames']}/{r['n_empty']} polyp-free" if r.get("n_empty") else "")
        for name, r in results.items()
        if not name.startswith("_")
    ]
    return "evaluated " + "; ".join(parts)
