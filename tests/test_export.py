"""ONNX export: ORT vs torch round trip (unpruned, pruned, dynamic), metadata, fallback, failures, CLI."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from polyprune.errors import ConfigError, ModelFileError
from polyprune.export import export_onnx, read_onnx_metadata, synthetic_image
from polyprune.io import InputSpec, load_model, save_model
from polyprune.models import build_model
from polyprune.predictor import Predictor

SIZE = 32
# what a physically pruned UNet is: every conv keeps its own, uneven number of channels
PRUNED_WIDTHS = {
    "enc0.conv1": 5,
    "enc0.conv2": 7,
    "enc1.conv1": 11,
    "enc2.conv2": 19,
    "bottleneck.conv1": 37,
    "bottleneck.conv2": 50,
    "up3": 41,
    "dec3.conv1": 23,
    "up1": 9,
    "dec0.conv2": 3,
}


def _trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BN statistics, so the check sees more than freshly initialised BN layers."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "unet.safetensors"
    model = _trained_like(build_model("unet", base_width=4))
    save_model(path, model, input_spec=InputSpec(size=SIZE, threshold=0.4))
    return path


@pytest.fixture(scope="module")
def onnx_file(model_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("o") / "unet.onnx"
    report = export_onnx(model_file, out, size=SIZE)
    return out, report


def _ort_vs_torch(onnx_path, model, shape, seed=0) -> float:
    x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    assert got.shape == ref.shape
    return float(np.abs(got - ref).max())


def test_export_round_trip_unpruned(model_file, onnx_file):
    out, report = onnx_file
    assert out.is_file() and not out.with_name(out.name + ".data").exists()  # one self-contained file
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp file left behind
    assert report.exporter == "dynamo" and report.fallback_reason is None
    assert set(report.checks) == {f"random@{SIZE}", f"image@{SIZE}"}
    assert report.max_abs_diff < 1e-4
    assert report.file_bytes == out.stat().st_size
    assert _ort_vs_torch(out, load_model(model_file), (1, 3, SIZE, SIZE), seed=7) < 1e-4


def test_export_round_trip_pruned(tmp_path):
    model = _trained_like(build_model("unet", base_width=8, widths=PRUNED_WIDTHS))
    assert model.widths()["enc0.conv1"] == 5
    path = tmp_path / "pruned.safetensors"
    save_model(path, model, input_spec=InputSpec(size=SIZE))
    report = export_onnx(path, tmp_path / "pruned.onnx")
    assert report.size == SIZE and report.max_abs_diff < 1e-4
    assert _ort_vs_torch(report.path, load_model(path), (1, 3, SIZE, SIZE), seed=3) < 1e-4
    assert read_onnx_metadata(report.path).arch["widths"] == model.widths()


def test_dynamic_export_runs_at_two_sizes(model_file, tmp_path):
    report = export_onnx(model_file, tmp_path / "dyn.onnx", size=SIZE, dynamic=True)
    assert report.dynamic and len(report.checks) == 3  # random, image, and a second non-square size
    model = load_model(model_file)
    for shape in [(1, 3, 32, 32), (2, 3, 64, 64), (1, 3, 48, 32)]:
        assert _ort_vs_torch(report.path, model, shape) < 1e-4
    assert read_onnx_metadata(report.path).dynamic


def test_metadata_is_enough_to_run(model_file, onnx_file):
    out, _ = onnx_file
    meta = read_onnx_metadata(out)
    assert meta.input == InputSpec(size=SIZE, threshold=0.4)
    assert meta.arch == load_model(model_file).config()
    assert meta.version == "1" and not meta.dynamic
    assert meta.raw["polyprune.source"] == model_file.name
    assert json.loads(meta.raw["polyprune.input"])["threshold"] == 0.4

    p = Predictor(out)  # nothing but the .onnx file
    assert p.backend == "onnxruntime" and p.input_spec == meta.input
    image = synthetic_image(50, 70, seed=3)
    ref = Predictor(model_file).predict(image)
    assert np.abs(p.predict(image) - ref).max() < 1e-4


def test_legacy_fallback_is_reported(model_file, tmp_path, monkeypatch):
    real = torch.onnx.export

    def dynamo_broken(*args, **kwargs):
        if kwargs.get("dynamo", True):
            raise RuntimeError("simulated dynamo failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_broken)
    report = export_onnx(model_file, tmp_path / "legacy.onnx", dynamic=True)
    assert report.exporter == "legacy"
    assert "simulated dynamo failure" in report.fallback_reason
    assert report.max_abs_diff < 1e-4
    assert read_onnx_metadata(report.path).raw["polyprune.exporter"] == "legacy"


def test_diff_above_tolerance_writes_nothing(model_file, tmp_path, monkeypatch):
    import polyprune.export as ex

    monkeypatch.setattr(ex, "check_onnx", lambda *a, **k: {"random@32": 0.5, "image@32": 1e-6})
    monkeypatch.setattr(torch.onnx, "export", _legacy_only(torch.onnx.export))  # fast: legacy
    with pytest.raises(ModelFileError, match=r"differs from torch by 0\.5 on random@32"):
        export_onnx(model_file, tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []


def _legacy_only(real):
    def export(*args, **kwargs):
        kwargs["dynamo"] = False
        kwargs.pop("external_data", None)
        kwargs.pop("dynamic_shapes", None)
        kwargs.pop("verbose", None)
        return real(*args, **kwargs)

    return export


def test_export_user_errors(model_file, tmp_path, onnx_file):
    with pytest.raises(ConfigError, match="multiple of 16"):
        export_onnx(model_file, tmp_path / "x.onnx", size=40)
    with pytest.raises(ConfigError, match=r"must end in \.onnx"):
        export_onnx(model_file, tmp_path / "x.pt")
    with pytest.raises(ModelFileError, match="not found"):
        export_onnx(tmp_path / "missing.safetensors", tmp_path / "x.onnx")
    with pytest.raises(ConfigError, match="already an ONNX file"):
        export_onnx(onnx_file[0], tmp_path / "x.onnx")
    with pytest.raises(ModelFileError, match="not a readable ONNX"):
        (tmp_path / "junk.onnx").write_bytes(b"\x00garbage")
        read_onnx_metadata(tmp_path / "junk.onnx")


def test_cli_export(model_file, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from polyprune.cli import app

    monkeypatch.setattr(
        torch.onnx, "export", _legacy_only(torch.onnx.export)
    )  # the CLI path, not dynamo again
    out = tmp_path / "cli.onnx"
    res = CliRunner().invoke(app, ["export", "--model", str(model_file), "--out", str(out), "--json", "-"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["path"] == str(out) and doc["max_abs_diff"] < 1e-4 and out.is_file()
