import csv
import json
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from polyprune.cli import app, main
from polyprune.errors import ConfigError, DataError, ModelFileError
from polyprune.evaluate import evaluate_model, evaluate_predictions, results_table, summary_line
from polyprune.files import read_json
from polyprune.io import InputSpec, save_model
from polyprune.metrics import METRIC_KEYS
from polyprune.models import build_model
from polyprune.predictor import Predictor

H, W = 40, 48  # not the model size (32) and not square: predictions are resized to the GT


def _write_dataset(root: Path, ids: list[str], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, name in enumerate(ids):
        mask = np.zeros((H, W), np.uint8)
        cv2.circle(mask, (14 + 4 * i, 20), 6 + i, 255, -1)
        image = rng.integers(0, 80, (H, W, 3), dtype=np.uint8)
        image[mask > 0] += 120
        cv2.imwrite(str(root / "images" / f"{name}.png"), image)
        cv2.imwrite(str(root / "masks" / f"{name}.png"), mask)
    return root


@pytest.fixture
def dataset(tmp_path) -> Path:
    return _write_dataset(tmp_path / "tiny", ["a0", "a1", "a2", "a3"], seed=0)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model("unet", base_width=4).eval()
    return save_model(
        tmp_path_factory.mktemp("model") / "m.safetensors", model, input_spec=InputSpec(size=32)
    )


def _gt_preds(dataset: Path, out: Path) -> Path:
    """The GT masks themselves, saved as 0/255 prediction PNGs."""
    out.mkdir(parents=True, exist_ok=True)
    for m in sorted((dataset / "masks").glob("*.png")):
        shutil.copy(m, out / m.name)
    return out


def _perfect_mean_dice(dataset: Path) -> float:
    """Toolbox mean Dice of a perfect binary map: 255 thresholds at 1, and t = 0 where all pixels are on."""
    vals = []
    for m in sorted((dataset / "masks").glob("*.png")):
        g = (cv2.imread(str(m), cv2.IMREAD_GRAYSCALE) > 127).sum()
        vals.append((255 + 2 * g / (g + H * W)) / 256)
    return float(np.mean(vals))


# -------------------------------------------------------------------------------------- predictions


def test_gt_masks_as_predictions_score_one(dataset, tmp_path):
    results = evaluate_predictions(_gt_preds(dataset, tmp_path / "preds"), [dataset], progress=False)
    r = results["tiny"]
    assert set(r) == {*METRIC_KEYS, "n_images", "n_empty", "fp_frames"} and r["n_images"] == 4
    for k in ("dice", "iou", "precision", "recall", "f2", "max_dice", "s_measure", "wf_measure"):
        assert r[k] == pytest.approx(1.0, abs=1e-6), k
    assert r["mae"] == 0.0
    assert r["mean_dice"] == pytest.approx(_perfect_mean_dice(dataset))
    assert results.meta["mode"] == "predictions"


def test_per_dataset_pred_folders_resizing_and_table(dataset, tmp_path):
    other = _write_dataset(tmp_path / "other", ["b0", "b1"], seed=1)
    preds = tmp_path / "preds"
    _gt_preds(dataset, preds / "tiny")
    for m in sorted((other / "masks").glob("*.png")):  # half-size maps: resized to the GT like the toolbox
        small = cv2.resize(cv2.imread(str(m), cv2.IMREAD_GRAYSCALE), (W // 2, H // 2))
        (preds / "other").mkdir(exist_ok=True)
        cv2.imwrite(str(preds / "other" / m.name), small)
    results = evaluate_predictions(preds, [dataset, other], progress=False)
    assert list(results) == ["tiny", "other"] and results["other"]["n_images"] == 2
    assert results["tiny"]["dice"] == 1.0
    assert 0.8 < results["other"]["dice"] < 1.0
    console = Console(record=True, width=200)
    console.print(results_table({**results, "_meta": results.meta}))
    text = console.export_text()
    for header in ("Dice@0.5", "mDice", "maxDice", "Sα", "wFβ", "mEφ", "MAE", "tiny", "other"):
        assert header in text
    assert summary_line(results).startswith("evaluated tiny n=4 Dice@0.5 1.0000")


def test_missing_prediction_names_the_file(dataset, tmp_path):
    preds = _gt_preds(dataset, tmp_path / "preds")
    (preds / "a2.png").unlink()
    with pytest.raises(DataError, match=r"a2\.png is missing"):
        evaluate_predictions(preds, [dataset], progress=False)
    with pytest.raises(DataError, match="prediction folder not found"):
        evaluate_predictions(tmp_path / "nope", [dataset], progress=False)


def test_ids_file_restricts_and_no_match_is_an_error(dataset, tmp_path):
    preds = _gt_preds(dataset, tmp_path / "preds")
    ids = tmp_path / "ids.txt"
    ids.write_text("a1\na3\n")
    assert evaluate_predictions(preds, [dataset], ids_file=ids, progress=False)["tiny"]["n_images"] == 2
    ids.write_text("a1\na3\nzz_not_here\n")  # an id in no dataset: scoring 2 of 3 silently is wrong
    with pytest.raises(
        DataError, match=r"1 of the 3 ids in .*ids\.txt are in no --data folder, e\.g\. zz_not_here"
    ):
        evaluate_predictions(preds, [dataset], ids_file=ids, progress=False)
    ids.write_text("x1\nx2\n")
    with pytest.raises(DataError, match=r"none of the 2 ids in .*ids\.txt is in .*tiny"):
        evaluate_predictions(preds, [dataset], ids_file=ids, progress=False)


# -------------------------------------------------------------------------------------------- model


def test_evaluate_model_writes_outputs_and_saved_maps_score_the_same(dataset, model_file, tmp_path):
    preds, out = tmp_path / "preds", tmp_path / "out"
    res = evaluate_model(model_file, [dataset], save_preds=preds, out_dir=out, progress=False)
    r = res["tiny"]
    assert r["n_images"] == 4 and all(0.0 <= r[k] <= 1.0 for k in METRIC_KEYS if "em" not in k)
    pngs = sorted(preds.glob("tiny/*.png"))
    assert [p.stem for p in pngs] == ["a0", "a1", "a2", "a3"]
    assert cv2.imread(str(pngs[0]), cv2.IMREAD_UNCHANGED).shape == (H, W)  # GT resolution, 8-bit gray
    with open(out / "tiny_per_image.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [row["id"] for row in rows] == ["a0", "a1", "a2", "a3"] and "mean_dice" in rows[0]
    saved = read_json(out / "metrics.json")
    assert saved["tiny"] == pytest.approx(r) and saved["_meta"]["model"] == str(model_file)
    assert saved["_meta"]["input_size"] == 32
    again = evaluate_predictions(preds, [dataset], progress=False)  # the PNGs reproduce every number
    assert again["tiny"] == r


class _ConstantPredictor:
    """Anything with `.predict(rgb) -> prob` is a predictor."""

    def predict(self, image: np.ndarray) -> np.ndarray:
        return np.full(image.shape[:2], 0.7, np.float32)


def test_evaluate_model_accepts_predictor_objects_and_modules(dataset):
    res = evaluate_model(_ConstantPredictor(), [dataset], progress=False)
    expected = []  # everything predicted: dice = 2|G| / (|G| + N) per image
    for m in sorted((dataset / "masks").glob("*.png")):
        g = (cv2.imread(str(m), cv2.IMREAD_GRAYSCALE) > 127).sum()
        expected.append(2 * g / (g + H * W))
    assert res["tiny"]["dice"] == pytest.approx(np.mean(expected))
    assert res["tiny"]["recall"] == 1.0
    torch.manual_seed(0)
    module = build_model("unet", base_width=4).eval()
    a = evaluate_model(module, [dataset], progress=False)
    b = evaluate_model(Predictor(module, input_spec=InputSpec(size=256)), [dataset], progress=False)
    assert a["tiny"] == b["tiny"]  # a bare module runs at the default InputSpec (256)


def test_evaluate_model_errors(dataset, tmp_path):
    with pytest.raises(DataError, match="dataset folder not found"):
        evaluate_model(_ConstantPredictor(), [tmp_path / "nope"], progress=False)
    with pytest.raises(ConfigError, match="no dataset"):
        evaluate_model(_ConstantPredictor(), [], progress=False)
    with pytest.raises(ConfigError, match="given twice"):
        evaluate_model(_ConstantPredictor(), [dataset, dataset], progress=False)


class _NaNPredictor:
    def predict(self, image: np.ndarray) -> np.ndarray:
        return np.full(image.shape[:2], np.nan, np.float32)


def test_unreadable_pairs_and_nan_predictions(dataset):
    (dataset / "images" / "a1.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"a1\.png"):
        evaluate_model(_ConstantPredictor(), [dataset], progress=False)
    with pytest.warns(UserWarning, match="skipped unreadable pair"):
        res = evaluate_model(_ConstantPredictor(), [dataset], progress=False, skip_bad=True)
    assert res["tiny"]["n_images"] == 3 and res.meta["skipped"] == {"tiny": ["a1"]}
    with pytest.raises(ModelFileError, match="NaN"):
        evaluate_model(_NaNPredictor(), [dataset], progress=False, skip_bad=True)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_model_then_preds(dataset, model_file, tmp_path):
    runner = CliRunner()
    out_json, csv_dir, preds = tmp_path / "m.json", tmp_path / "csv", tmp_path / "preds"
    args = ["evaluate", "--model", str(model_file), "--data", str(dataset), "--json", str(out_json)]
    res = runner.invoke(app, [*args, "--csv-dir", str(csv_dir), "--save-preds", str(preds), "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "mDice" in res.stdout and "evaluated tiny n=4" in res.output
    saved = json.loads(out_json.read_text())
    assert set(saved) == {"tiny", "_meta"} and (csv_dir / "tiny_per_image.csv").is_file()
    assert len(list(preds.glob("tiny/*.png"))) == 4
    res2 = runner.invoke(
        app, ["evaluate", "--preds", str(preds), "--data", str(dataset), "--json", "-", "-q"]
    )
    assert res2.exit_code == 0, res2.output
    assert json.loads(res2.stdout)["tiny"] == saved["tiny"]  # stdout is pure JSON with --json -


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "exactly one of --model"),
        (["--model", "m.safetensors", "--preds", "p"], "exactly one of --model"),
        (["--preds", "p", "--save-preds", "q"], "--save-preds needs --model"),
    ],
)
def test_cli_option_errors_exit_2(dataset, monkeypatch, capsys, extra, message):
    monkeypatch.setattr(sys, "argv", ["polyprune", "evaluate", "--data", str(dataset), *extra])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------ real data


@pytest.mark.realdata
def test_real_kvasir_gt_blurred_and_shifted(shared_data, tmp_path):
    from polyprune.images import read_mask

    kvasir = shared_data / "Kvasir-SEG"
    ids = (shared_data / "splits" / "kvasir_pranet_test.txt").read_text().split()[:4]
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("\n".join(ids) + "\n")
    exact, blurred = tmp_path / "exact" / "Kvasir-SEG", tmp_path / "blurred"
    exact.mkdir(parents=True)
    blurred.mkdir()
    for i in ids:
        gt = read_mask(kvasir / "masks" / f"{i}.jpg") * 255
        cv2.imwrite(str(exact / f"{i}.png"), gt)
        soft = cv2.GaussianBlur(np.roll(gt, (12, -9), axis=(0, 1)), (0, 0), 8)
        cv2.imwrite(str(blurred / f"{i}.png"), soft)
    r = evaluate_predictions(tmp_path / "exact", [kvasir], ids_file=ids_file, progress=False)["Kvasir-SEG"]
    assert r["n_images"] == 4
    assert r["dice"] == r["iou"] == r["max_dice"] == 1.0 and r["mae"] == 0.0
    assert 0.99 < r["mean_dice"] < 1.0  # the toolbox's t = 0 threshold turns every pixel on
    b = evaluate_predictions(blurred, [kvasir], ids_file=ids_file, progress=False)["Kvasir-SEG"]
    assert 0.6 < b["dice"] < 0.99 and b["iou"] < b["dice"]
    assert 0.5 < b["mean_dice"] < b["max_dice"] < 1.0
    assert 0.5 < b["s_measure"] < 1.0 and 0.0 < b["mae"] < 0.2 and b["wf_measure"] < b["dice"]
    # the PraNet Kvasir split matches no CVC-ClinicDB id: an error, not an empty result
    with pytest.raises(DataError, match="none of the 100 ids"):
        evaluate_predictions(
            blurred,
            [shared_data / "CVC-ClinicDB"],
            ids_file=shared_data / "splits" / "kvasir_pranet_test.txt",
            progress=False,
        )
