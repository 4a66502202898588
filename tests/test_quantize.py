"""INT8 through ONNX Runtime's quantizer, on a tiny model trained for a few steps on synthetic polyps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cli_helpers import assert_error, assert_ok, cli
from polyprune.errors import ConfigError, DataError
from polyprune.export import export_onnx, read_onnx_metadata
from polyprune.predictor import Predictor
from polyprune.quantize import INT8_KEY, calibration_images, export_int8, int8_record, quantize_onnx


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synth_dir):
    """A width-8 UNet trained 3 epochs at 64 px: outputs far enough from 0.5 for a meaningful check."""
    from polyprune.train import TrainConfig, train

    out = tmp_path_factory.mktemp("int8") / "run"
    train(TrainConfig(data=[str(synth_dir)], out=str(out), size=64, width=8, epochs=3, batch=4, lr=3e-3,
                      threads=1, precision="fp32", progress=False))  # fmt: skip
    return out / "model.safetensors"


def test_int8_file_runs_keeps_metadata_and_agrees_with_fp32(trained, synth_dir, tmp_path):
    fp32 = export_onnx(trained, tmp_path / "fp32.onnx").path
    images = calibration_images([synth_dir], 12, seed=0)
    report = quantize_onnx(fp32, tmp_path / "int8.onnx", images, min_agreement=0.0)
    meta = read_onnx_metadata(tmp_path / "int8.onnx")
    assert meta.input == read_onnx_metadata(fp32).input and meta.arch == read_onnx_metadata(fp32).arch
    record = int8_record(meta.raw)
    assert record["format"] == "QDQ" and record["calibration"] == {"method": "minmax", "n_images": 12}
    assert record["dice_agreement"] == pytest.approx(report.dice_agreement)
    assert report.file_bytes < 0.5 * report.source_bytes  # int8 weights
    # the stated tolerance for this barely trained model (small masks near the threshold): probabilities
    # within 0.02 on average, masks overlapping at Dice >= 0.8 (the shipped parent: 0.003 and 0.987)
    assert report.mean_abs_diff < 0.02 and report.dice_agreement >= 0.8, report.to_dict()
    rgb = (np.random.default_rng(0).random((70, 90, 3)) * 255).astype(np.uint8)
    with Predictor(tmp_path / "int8.onnx") as p8, Predictor(fp32) as p32:
        assert p8.precision == "int8" and p32.precision == "f32"
        a, b = p8.predict(rgb), p32.predict(rgb)
    assert a.shape == (70, 90) and np.abs(a - b).mean() < 0.05


def test_export_int8_from_a_model_file_and_refusals(trained, synth_dir, tmp_path):
    r = export_int8(trained, tmp_path / "m_int8.onnx", [synth_dir], calib_n=4, min_agreement=0.0)
    assert r.n_calib == 4 and INT8_KEY in read_onnx_metadata(r.path).raw
    with pytest.raises(ConfigError, match="already INT8"):
        quantize_onnx(r.path, tmp_path / "again.onnx", calibration_images([synth_dir], 2))
    with pytest.raises(ConfigError, match="calib_method must be one of"):
        export_int8(trained, tmp_path / "x.onnx", [synth_dir], method="magic")
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    with pytest.raises(DataError):
        calibration_images([empty], 4)


def test_calibration_leaves_test_ids_out(synth_dir, tmp_path):
    ids = tmp_path / "test.txt"
    all_ids = sorted(p.stem for p in (synth_dir / "images").iterdir())
    ids.write_text("\n".join(all_ids[:20]) + "\n")
    picked = calibration_images([synth_dir], 64, exclude_ids=[ids])
    assert sorted(p.stem for p in picked) == all_ids[20:]


def test_cli_export_int8_one_line_errors_and_json(trained, synth_dir, tmp_path, capsys):
    out = tmp_path / "cli_int8.onnx"
    assert_ok(cli(capsys, "export", "--model", trained, "--out", out, "--int8", "--calib-data", synth_dir,
                  "--calib-n", 4, "--json", tmp_path / "q.json"))  # fmt: skip
    assert json.loads((tmp_path / "q.json").read_text())["n_calib"] == 4
    assert_error(
        cli(capsys, "export", "--model", trained, "--out", tmp_path / "y.onnx", "--int8"), "--calib-data"
    )
    missing = tmp_path / "nope"
    assert_error(
        cli(
            capsys,
            "export",
            "--model",
            trained,
            "--out",
            tmp_path / "z.onnx",
            "--int8",
            "--calib-data",
            missing,
        ),
        "nope",
    )
    rc, out_text, _ = cli(capsys, "benchmark", "--model", trained, "--model", out, "--size", 64,
                          "--backend", "onnxruntime", "--runs", 2, "--warmup", 1, "--json", "-")  # fmt: skip
    rows = json.loads(out_text)["rows"]
    assert (
        rc == 0
        and [r["precision"] for r in rows] == ["f32", "int8"]
        and rows[1]["file_mb"] < rows[0]["file_mb"]
    )


def test_prune_int8_latency_target_needs_a_runtime(trained, synth_dir, tmp_path, capsys):
    args = ["prune", "--model", trained, "--data", synth_dir, "--out", tmp_path / "p", "--target-fps", 1000,
            "--int8", "--threads", 1, "-q"]  # fmt: skip
    assert_error(cli(capsys, *args), "--int8 latency needs --backend onnxruntime or openvino")


def test_schedule_times_the_int8_deployment(trained, synth_dir):
    from polyprune.io import load_model
    from polyprune.pruning.session import measure_latency

    model = load_model(trained)
    images = calibration_images([synth_dir], 4)
    ms = measure_latency(model, 64, "onnxruntime", runs=3, threads=1, int8_calib=images)
    assert 0 < ms < 1000


def test_openvino_runs_the_int8_file(trained, synth_dir, tmp_path):
    pytest.importorskip("openvino")
    r = export_int8(trained, tmp_path / "ov_int8.onnx", [synth_dir], calib_n=4, min_agreement=0.0)
    rgb = (np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)
    with Predictor(r.path, backend="openvino", threads=1) as ov, Predictor(r.path, threads=1) as ort:
        a, b = ov.predict(rgb), ort.predict(rgb)
    assert a.shape == b.shape == (64, 64) and np.abs(a - b).mean() < 0.05


def test_minmax_chunk_size_never_divides_the_image_count():
    from polyprune.quantize import _minmax_chunks

    for n in range(5, 200):
        c = _minmax_chunks("minmax", n)["CalibMaxIntermediateOutputs"]
        assert n % c != 0 and 4 <= c < n
    assert _minmax_chunks("minmax", 4) == {} and _minmax_chunks("entropy", 64) == {}


def test_histogram_calibration_that_cannot_fit_is_refused(trained, synth_dir, tmp_path, monkeypatch):
    import polyprune.counting

    fp32 = export_onnx(trained, tmp_path / "fp32.onnx").path
    monkeypatch.setattr(polyprune.counting, "available_memory_bytes", lambda: 10 * 2**20)  # 10 MB left
    with pytest.raises(ConfigError, match=r"percentile calibration keeps every activation.*--calib-n \d+"):
        quantize_onnx(fp32, tmp_path / "p.onnx", calibration_images([synth_dir], 24), method="percentile")


@pytest.mark.parametrize("saturates", [True, False])
def test_weights_are_7_bit_by_default_only_where_8_bit_products_saturate(
    trained, synth_dir, tmp_path, monkeypatch, saturates
):
    import warnings

    import polyprune.quantize as quantize_mod

    monkeypatch.setattr(quantize_mod, "int8_saturates_here", lambda: saturates)
    fp32 = export_onnx(trained, tmp_path / "fp32.onnx").path
    images = calibration_images([synth_dir], 4, seed=0)
    auto = quantize_onnx(fp32, tmp_path / "auto.onnx", images, min_agreement=0.0)
    forced = quantize_onnx(
        fp32, tmp_path / "forced.onnx", images, min_agreement=0.0, reduce_range=not saturates
    )
    assert auto.reduce_range is saturates and forced.reduce_range is not saturates
    for path, seven in ((auto.path, saturates), (forced.path, not saturates)):
        record = int8_record(read_onnx_metadata(path).raw)
        assert record["reduce_range"] is seven and record["weights"].startswith("int7" if seven else "int8")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Predictor(path).close()
        warned = [w for w in caught if "VNNI" in str(w.message)]
        # only an 8-bit file on a CPU where its products saturate is worth a warning
        assert len(warned) == (1 if saturates and not seven else 0), [str(w.message) for w in caught]


@pytest.mark.parametrize(
    ("machine", "caps", "saturates"),
    [
        ("x86_64", {"avx2": True}, True),  # AVX2 only: VPMADDUBSW's 16-bit sums
        ("x86_64", {"avx512_f": True}, True),  # AVX-512 without VNNI: the same instruction
        ("x86_64", {"avx512_vnni": True}, False),
        ("x86_64", {"avx_vnni": True}, False),
        ("aarch64", {}, False),
    ],
)
def test_which_cpus_saturate(monkeypatch, machine, caps, saturates):
    import platform

    import torch

    from polyprune.quantize import int8_saturates_here

    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    assert int8_saturates_here() is saturates
