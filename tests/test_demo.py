"""`polyprune demo --quick` end to end, once per module: the report exists and its numbers are the JSON's."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import parse_table
from polyprune.cli import app
from polyprune.demo import MARKER, _prepare
from polyprune.errors import ConfigError
from polyprune.report_catalog import SCORE_COLUMNS


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, dict, float]:
    """(OUT, the --json result, wall seconds) of one quick demo (one thread: tests run two at a time)."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    t0 = time.perf_counter()
    res = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out), "--threads", "1", "--json", "-"])
    assert res.exit_code == 0, res.output
    return out, json.loads(res.stdout), time.perf_counter() - t0


@pytest.mark.slow
def test_demo_writes_every_stage(demo_run):
    out, result, wall = demo_run
    assert json.loads((out / "demo.json").read_text()) == result
    for f in (
        "parent/model.safetensors",
        "parent/history.json",
        "pruned/model.safetensors",
        "pruned/trajectory.json",
        "pruned/model.onnx",
        "eval/parent/metrics.json",
        "eval/pruned/test_per_image.csv",
        "benchmark.json",
        "report/report.md",
        "report/report.html",
    ):
        assert (out / f).is_file(), f  # fmt: skip
    for png in ("dice_vs_macs", "dice_vs_latency", "trajectories", "widths_pruned", "overlays_pruned"):
        assert (out / "report" / f"{png}.png").stat().st_size > 1000, png
    assert len(list((out / "eval" / "pruned" / "preds" / "test").glob("*.png"))) == result["data"]["n_test"]
    assert result["pruned"]["macs_fraction"] <= result["target_macs"] + 1e-9
    assert result["pruned"]["params"] < result["parent"]["params"]
    assert result["export"]["max_abs_diff"] <= 1e-4
    assert set(result["seconds"]) >= {"data", "train", "prune", "evaluate", "export", "benchmark", "report"}
    assert result["summary"][-1].startswith("demo done in ")
    print(f"quick demo: {wall:.0f} s wall, {result['cpu_seconds']['total']:.0f} s CPU")


@pytest.mark.slow
def test_demo_json_is_the_stage_files(demo_run):
    out, result, _ = demo_run
    history = json.loads((out / "parent" / "history.json").read_text())["summary"]
    final = json.loads((out / "pruned" / "trajectory.json").read_text())["final"]
    rows = json.loads((out / "benchmark.json").read_text())["rows"]
    assert (result["parent"]["params"], result["parent"]["macs"]) == (history["params"], history["macs"])
    assert result["parent"]["val_dice"] == history["best_val_dice"]
    assert (result["pruned"]["params"], result["pruned"]["macs"]) == (final["params"], final["macs"])
    assert result["pruned"]["val_dice"] == final["val_dice"]
    for name in ("parent", "pruned"):
        metrics = json.loads((out / "eval" / name / "metrics.json").read_text())
        assert result[name]["test"] == metrics["test"]
        for r in rows:
            if r["model"] == result[name]["model"]:
                assert result[name]["latency"][r["backend"]]["median_ms"] == r["median_ms"]


@pytest.mark.slow
def test_report_numbers_match_the_json(demo_run):
    out, result, _ = demo_run
    md = (out / "report" / "report.md").read_text()
    models = parse_table(md, "Models")
    assert list(models) == ["parent", "pruned"]
    for name in ("parent", "pruned"):
        row, ref = models[name], result[name]
        assert int(row["params"].replace(",", "")) == ref["params"]
        assert float(row["GMACs"]) == pytest.approx(ref["macs"] / 1e9, abs=5e-5)
        assert float(row["val Dice"]) == pytest.approx(ref["val_dice"], abs=5e-5)
        for backend, label in (("torch", "torch"), ("onnxruntime", "ORT")):
            assert float(row[f"{label} ms"]) == pytest.approx(ref["latency"][backend]["median_ms"], abs=5e-3)
            assert float(row[f"{label} FPS"]) == pytest.approx(ref["latency"][backend]["fps"], abs=0.05)
    assert models["pruned"]["MACs %"] == f"{result['pruned']['macs_fraction']:.1%}"
    scores = parse_table(md, "Test scores")
    for name in ("parent", "pruned"):
        row, ref = scores[name], result[name]["test"]
        assert row["dataset"] == "test" and int(row["n"]) == ref["n_images"]
        for header, key in SCORE_COLUMNS:
            assert float(row[header]) == pytest.approx(ref[key], abs=5e-5), header  # fmt: skip
    assert "### pruned: taylor-gradnorm, target macs 0.25" in md and "worst by pruned's Dice@0.5" in md
    html = (out / "report" / "report.html").read_text()
    assert f"{result['parent']['test']['dice']:.4f}" in html and 'src="overlays_pruned.png"' in html


def test_demo_refuses_a_foreign_folder_and_clears_its_own(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    with pytest.raises(ConfigError, match="foreign"):
        _prepare(foreign)
    mine = tmp_path / "mine"
    (mine / "parent").mkdir(parents=True)
    (mine / MARKER).write_text("")
    (mine / "demo.json").write_text("{}")
    (mine / "notes.txt").write_text("kept")
    _prepare(mine)
    assert sorted(p.name for p in mine.iterdir()) == sorted([MARKER, "notes.txt"])
