"""Counting and timing: hand-computed MACs, runtime latencies, benchmark rows, peak memory, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from polyprune.benchmark import PeakRSS, benchmark_models, resolve_backends
from polyprune.counting import count_params
from polyprune.errors import ConfigError
from polyprune.export import export_onnx
from polyprune.io import InputSpec, save_model
from polyprune.latency import onnxruntime_latency, openvino_latency
from polyprune.models import build_model

SIZE = 32
ROW_KEYS = {
    "model", "name", "backend", "precision", "size", "threads", "tta", "params", "macs", "median_ms", "p90_ms",
    "min_ms", "runs", "fps", "file_mb", "peak_rss_mb", "peak_rss_delta_mb", "speedup", "params_ratio", "macs_ratio",
}  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    parent, pruned = d / "parent.safetensors", d / "pruned.safetensors"
    save_model(parent, build_model("unet", base_width=8), input_spec=InputSpec(size=SIZE))
    widths = {
        "enc0.conv1": 3,
        "enc1.conv2": 9,
        "bottleneck.conv1": 40,
        "bottleneck.conv2": 70,
        "dec1.conv1": 5,
    }
    save_model(pruned, build_model("unet", base_width=8, widths=widths), input_spec=InputSpec(size=SIZE))
    return parent, pruned


@pytest.fixture(scope="module")
def pruned_onnx(models, tmp_path_factory):
    return export_onnx(models[1], tmp_path_factory.mktemp("onnx") / "pruned.onnx", check=False).path


def test_runtime_latencies(models, pruned_onnx):
    lat = onnxruntime_latency(pruned_onnx, SIZE, runs=3, warmup=1, threads=1)
    assert lat.runs == 3 and 0 < lat.min_ms <= lat.median_ms <= lat.p90_ms
    assert lat.fps == pytest.approx(1000.0 / lat.median_ms)
    lat = onnxruntime_latency(
        models[1], SIZE, runs=2, warmup=0, threads=1
    )  # .safetensors: exported on the fly
    assert lat.median_ms > 0


def test_openvino_latency(pruned_onnx):
    pytest.importorskip("openvino", reason="openvino (optional extra polyprune[openvino]) is not installed")
    lat = openvino_latency(pruned_onnx, SIZE, runs=3, warmup=1, threads=1)
    assert lat.median_ms > 0 and lat.fps == pytest.approx(1000.0 / lat.median_ms)


def test_benchmark_rows(models, tmp_path):
    parent, pruned = models
    rows = benchmark_models(
        [parent, pruned], sizes=[SIZE], backends=["torch", "onnxruntime"], runs=3, pause_s=0
    )
    rows += benchmark_models(
        [parent, pruned], sizes=[2 * SIZE], backends="torch", runs=3, pause_s=0
    )  # no export: cheap
    assert len(rows) == 2 * 2 + 2
    assert [(r["name"], r["size"], r["backend"]) for r in rows[:2]] == [
        ("parent", SIZE, "torch"),
        ("parent", SIZE, "onnxruntime"),
    ]
    for r in rows:
        assert set(r) == ROW_KEYS
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert r["fps"] == pytest.approx(1000.0 / r["median_ms"])
        assert r["speedup"] > 0 and r["peak_rss_mb"] > 0 and r["peak_rss_delta_mb"] >= 0
        assert r["threads"] >= 1 and r["precision"] == "f32" and r["runs"] == 3
    first = [r for r in rows if r["name"] == "parent"]
    assert all(r["speedup"] == 1.0 and r["params_ratio"] == 1.0 for r in first)
    small = [r for r in rows if r["name"] == "pruned"]
    assert all(r["params_ratio"] < 1.0 and r["macs_ratio"] < 1.0 for r in small)
    by = {(r["name"], r["backend"], r["size"]): r for r in rows}
    for size in (SIZE, 2 * SIZE):  # the second call's first model is its own reference
        assert by["pruned", "torch", size]["speedup"] == pytest.approx(
            by["parent", "torch", size]["median_ms"] / by["pruned", "torch", size]["median_ms"]
        )
    assert by["parent", "torch", 2 * SIZE]["macs"] == 4 * by["parent", "torch", SIZE]["macs"]
    json.dumps(rows)  # JSON-able as is


def test_benchmark_onnx_model_has_no_torch_row(pruned_onnx):
    onnx = pruned_onnx
    rows = benchmark_models([onnx], sizes=[SIZE], backends=["torch", "onnxruntime"], runs=2, warmup=0)
    assert [r["backend"] for r in rows] == ["onnxruntime"]
    assert rows[0]["params"] == count_params(build_model("unet", **_arch(onnx)))  # from the ONNX metadata
    with pytest.raises(ConfigError, match="no torch backend"):
        benchmark_models([onnx], sizes=[SIZE], backends="torch")
    with pytest.raises(ConfigError, match="fixed input size"):
        benchmark_models([onnx], sizes=[2 * SIZE], backends="onnxruntime", runs=1)


def _arch(onnx):
    from polyprune.export import read_onnx_metadata

    arch = dict(read_onnx_metadata(onnx).arch)
    arch.pop("name")
    return arch


def test_benchmark_user_errors(models):
    with pytest.raises(ConfigError, match="multiple of 16"):
        benchmark_models([models[0]], sizes=[40], backends="torch")
    with pytest.raises(ConfigError, match="unknown backend"):
        resolve_backends(["tensorrt"])
    with pytest.raises(ConfigError, match="not found"):
        benchmark_models(["missing.safetensors"], sizes=[SIZE])
    assert resolve_backends("all")[:2] == ["torch", "onnxruntime"]


def test_benchmark_tta_times_every_view_on_every_backend(models, monkeypatch):
    from polyprune.predictor import Predictor

    batches = []
    real = Predictor.predict_logits

    def spy(self, batch):
        batches.append(len(batch))
        return real(self, batch)

    monkeypatch.setattr(Predictor, "predict_logits", spy)
    rows = benchmark_models(
        [models[0]], sizes=[SIZE], backends=["torch", "onnxruntime"], runs=2, warmup=1, pause_s=0, tta="flips"
    )
    assert [(r["backend"], r["tta"]) for r in rows] == [("torch", "flips"), ("onnxruntime", "flips")]
    assert batches and set(batches) == {4}  # every timed call ran the 4 views as one batch
    assert len(batches) >= 2 * (1 + 2)  # at least warm-up + timed runs, both backends
    with pytest.raises(ConfigError, match="unknown TTA mode"):
        benchmark_models([models[0]], sizes=[SIZE], backends="torch", tta="rot")


def test_peak_rss_sees_an_allocation():
    with PeakRSS() as mem:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        del block
    assert mem.delta_mb > 40 and mem.peak_mb > mem.delta_mb


def test_cli_benchmark(models, tmp_path):
    from typer.testing import CliRunner

    from polyprune.cli import app

    out = tmp_path / "bench.json"
    args = ["benchmark", "--model", str(models[0]), "--model", str(models[1]), "--size", str(SIZE)]
    res = CliRunner().invoke(app, [*args, "--backend", "torch", "--runs", "2", "--json", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert len(doc["rows"]) == 2 and set(doc["rows"][0]) == ROW_KEYS and doc["system"]["cores"] >= 1
    assert "speed-up" in res.output and "pruned" in res.output
    res = CliRunner().invoke(app, [*args, "--backend", "torch", "--runs", "1", "--tta", "hflip", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "TTA hflip: 2 views" in res.output


def test_model_labels_tell_run_folders_apart():
    from pathlib import Path

    from polyprune.benchmark import model_labels

    runs = [Path("/x/parent/model.safetensors"), Path("/x/pruned/model.safetensors")]
    assert model_labels(runs) == ["parent/model.safetensors", "pruned/model.safetensors"]
    assert model_labels([Path("a.onnx"), Path("a.safetensors")]) == ["a.onnx", "a.safetensors"]
    assert model_labels([Path("p.safetensors"), Path("c.onnx")]) == ["p", "c"]


def test_round_robin_times_every_call_in_turns_with_a_pause_and_rewarm(monkeypatch):
    import polyprune.latency as latency_mod
    from polyprune.latency import time_round_robin

    events: list[str] = []
    monkeypatch.setattr(latency_mod.time, "sleep", lambda s: events.append(f"pause {s}"))
    calls = [lambda name=name: events.append(name) for name in "ab"]
    lats = time_round_robin(calls, runs=5, warmup=1, rounds=2, pause_s=0.5, rewarm=1)
    assert [lat.runs for lat in lats] == [5, 5]  # 3 + 2 timed runs each over the two rounds
    expected = ["a", "b"]  # warm-up
    for share in (3, 2):
        for name in "ab":
            expected += ["pause 0.5", name] + [name] * share  # rest, one untimed run, then the timed share
    assert events == expected
