"""polyprune.report on hand-made run folders: discovery, linking, tables, plots, overlays, errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import parse_table
from polyprune.errors import ConfigError
from polyprune.evaluate import CSV_KEYS
from polyprune.report import write_report
from polyprune.report_plots import pick_cases

SCORES = ("dice", "iou", "precision", "recall", "f2", "mean_dice", "mean_iou", "max_dice")
SCORES += ("s_measure", "wf_measure", "mean_em", "max_em", "mae")
WIDTHS = {"enc0.conv1": 16, "enc0.conv2": 16, "bottleneck.conv1": 32, "dec0.conv1": 16, "head": 1}


def _write(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _metrics(base: float) -> dict:
    return {k: round(base + 0.001 * i, 6) for i, k in enumerate(SCORES)} | {"n_images": 6}


def _trajectory(parent_path: str, criterion: str, dices: list[float]) -> dict:
    p = {"path": parent_path, "params": 100_000, "macs": 40_000_000, "latency_ms": 5.0, "val_dice": dices[0]}
    steps = []
    for i, d in enumerate(dices):
        f = 0.6**i
        steps.append(
            {
                "step": i,
                "filters_removed": 10 * i,
                "params": int(100_000 * f),
                "macs": int(40_000_000 * f),
                "latency_ms": 5.0 * f,
                "val_dice_before_finetune": d - 0.05,
                "val_dice_after_finetune": d,
                "val_dice": d,
                "kept": "finetuned" if i else None,
                "widths": {k: max(1, int(v * f)) if k != "head" else 1 for k, v in WIDTHS.items()},
            }
        )
    final = {**{k: steps[-1][k] for k in ("params", "macs", "latency_ms", "widths")}, "step": len(dices) - 1}
    final.update(val_dice=dices[-1] + 0.01, size=64)
    return {
        "parent": {**p, "size": 64},
        "config": {"criterion": criterion, "target_macs": 0.25},
        "steps": steps,
        "state": "done",
        "final_step": len(dices) - 1,
        "final": final,
    }


def _evaluation(folder: Path, data: Path, model: str, dice: dict[str, float], base: float) -> None:
    """metrics.json, test_per_image.csv and 8-bit prediction PNGs (the GT, eroded) like evaluate writes."""
    _write(
        folder / "metrics.json",
        {"test": _metrics(base), "_meta": {"mode": "model", "model": model, "backend": "torch",
         "data": {"test": str(data)}, "save_preds": str(folder / "preds")}},
    )  # fmt: skip
    lines = [",".join(CSV_KEYS)] + [",".join([i] + [f"{dice[i]:.6f}"] * (len(CSV_KEYS) - 1)) for i in dice]
    (folder / "test_per_image.csv").write_text("\n".join(lines) + "\n")
    for i in dice:
        gt = cv2.imread(str(data / "masks" / f"{i}.png"), cv2.IMREAD_GRAYSCALE)
        (folder / "preds" / "test").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / "preds" / "test" / f"{i}.png"), cv2.erode(gt, np.ones((3, 3), np.uint8)))


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """root/{parent, pruned_a (taylor-gradnorm), pruned_b (l1), eval/{parent,pruned_a}, data/test, benchmark.json}."""
    from polyprune.synth import make_synthetic_dataset

    root = tmp_path / "exp"
    data = make_synthetic_dataset(root / "data" / "test", n=6, size=32, seed=3)
    history = [{"epoch": e, "loss": 1 / e, "val_dice": 0.6 + 0.05 * e} for e in (1, 2, 3)]
    summary = {"params": 100_000, "macs": 40_000_000, "size": 64, "best_val_dice": 0.75, "best_epoch": 3}
    _write(root / "parent" / "history.json", {"config": {"size": 64}, "history": history, "summary": summary})
    # recorded as if the experiment had lived elsewhere: linking must go by the path's tail
    moved = "/elsewhere/exp/parent/model.safetensors"
    _write(root / "pruned_a" / "trajectory.json", _trajectory(moved, "taylor-gradnorm", [0.75, 0.74, 0.72]))
    _write(root / "pruned_b" / "trajectory.json", _trajectory(moved, "l1", [0.75, 0.7, 0.6]))
    ids = [f"synth_{k:05d}" for k in range(6)]
    _evaluation(
        root / "eval" / "parent",
        data,
        moved,
        dict(zip(ids, [0.9, 0.8, 0.85, 0.7, 0.95, 0.88], strict=True)),
        0.8,
    )
    child_dice = dict(zip(ids, [0.5, 0.9, 0.3, 0.8, 0.95, 0.7], strict=True))
    _evaluation(
        root / "eval" / "pruned_a", data, str(root / "pruned_a" / "model.safetensors"), child_dice, 0.7
    )
    rows = []
    for name, ms in (("parent", 8.0), ("pruned_a", 2.5)):
        for backend, f in (("torch", 1.0), ("onnxruntime", 0.6)):
            rows.append({"model": f"{root}/{name}/model.safetensors", "name": "model", "backend": backend,
                         "size": 64, "threads": 2, "params": None, "macs": None, "median_ms": ms * f,
                         "p90_ms": ms, "min_ms": ms, "fps": 1000 / (ms * f)})  # fmt: skip
    _write(root / "benchmark.json", {"rows": rows, "system": {"cpu": "test cpu", "cores": 2, "torch": "x"}})
    return root


def test_report_tables_plots_and_overlays(runs, tmp_path):
    out = tmp_path / "report"
    md_path = write_report([runs], out, title="t")
    md = md_path.read_text()
    for f in ("report.md", "report.html", "dice_vs_macs.png", "dice_vs_latency.png", "trajectories.png"):
        assert (out / f).is_file(), f
    for f in ("widths_pruned_a.png", "widths_pruned_b.png", "overlays_pruned_a.png"):
        assert (out / f).is_file() and cv2.imread(str(out / f)) is not None, f
    for png in out.glob("*.png"):  # every plot is referenced by both pages
        assert f"({png.name})" in md and f'src="{png.name}"' in (out / "report.html").read_text()

    models = parse_table(md, "Models")
    assert list(models) == ["parent", "pruned_a", "pruned_b"]
    traj_a = json.loads((runs / "pruned_a" / "trajectory.json").read_text())
    bench = json.loads((runs / "benchmark.json").read_text())["rows"]
    p, a = models["parent"], models["pruned_a"]
    assert p["params"] == "100,000" and float(p["GMACs"]) == pytest.approx(0.04, abs=1e-4)
    assert float(p["val Dice"]) == pytest.approx(0.75, abs=5e-5)
    assert int(a["params"].replace(",", "")) == traj_a["final"]["params"]
    assert float(a["GMACs"]) == pytest.approx(traj_a["final"]["macs"] / 1e9, abs=5e-5)
    assert float(a["val Dice"]) == pytest.approx(traj_a["final"]["val_dice"], abs=5e-5)
    assert a["MACs %"] == f"{traj_a['final']['macs'] / 40_000_000:.1%}"
    for row, name in ((p, "parent"), (a, "pruned_a")):
        for b, label in (("torch", "torch"), ("onnxruntime", "ORT")):
            r = next(r for r in bench if r["backend"] == b and f"/{name}/" in r["model"])
            assert float(row[f"{label} ms"]) == pytest.approx(r["median_ms"], abs=5e-3)
            assert float(row[f"{label} FPS"]) == pytest.approx(r["fps"], abs=0.05)
    assert models["pruned_b"]["torch ms"] == "–"  # not benchmarked

    scores = parse_table(md, "Test scores")
    for name in ("parent", "pruned_a"):
        ref = json.loads((runs / "eval" / name / "metrics.json").read_text())["test"]
        row = scores[name]
        assert row["dataset"] == "test" and int(row["n"]) == ref["n_images"]
        for header, key in (
            ("Dice@0.5", "dice"),
            ("mDice", "mean_dice"),
            ("Sα", "s_measure"),
            ("MAE", "mae"),
        ):
            assert float(row[header]) == pytest.approx(ref[key], abs=5e-5)
    assert "pruned_a (taylor-gradnorm)" not in md  # legend text lives in the PNG, not the page
    assert "### pruned_a: taylor-gradnorm, target macs 0.25" in md and "### pruned_b: l1" in md
    # worst cases of pruned_a by its per-image Dice: 00002 (0.3), 00000 (0.5), 00005 (0.7)
    assert (
        "worst by pruned_a's Dice@0.5 (`test_per_image.csv`): synth_00002 (0.300), synth_00000 (0.500), "
        in md
    )
    assert "no overlays for pruned_b" in md  # never evaluated


def test_pick_cases_worst_then_typical():
    dice = {f"i{k}": v for k, v in enumerate([0.9, 0.1, 0.5, 0.3, 0.95, 0.7, 0.8, 0.6])}
    cases = pick_cases(dice, n_worst=2, n_typical=2)
    assert cases[:2] == [("i1", "worst 1"), ("i3", "worst 2")]
    assert len(cases) == 4 and all(why == "typical" for _, why in cases[2:])
    assert len(pick_cases({"a": 1.0}, n_worst=3, n_typical=3)) == 1


def test_report_on_several_runs_and_a_benchmark_file(runs, tmp_path):
    other = tmp_path / "other"
    _write(other / "history.json", {"history": [{"epoch": 1, "val_dice": 0.5}]})  # killed: no summary
    md = write_report([runs, other, runs / "benchmark.json"], tmp_path / "r").read_text()
    models = parse_table(md, "Models")
    assert {"exp/parent", "exp/pruned_a", "other"} <= set(models)
    assert float(models["other"]["val Dice"]) == 0.5 and models["other"]["params"] == "–"


@pytest.mark.parametrize("case", ["missing", "empty", "corrupt", "not-a-run"])
def test_bad_run_folder_is_one_line_error(tmp_path, case):
    run = tmp_path / "run"
    if case != "missing":
        run.mkdir()
    if case == "corrupt":
        (run / "metrics.json").write_text("{not json")
    if case == "not-a-run":
        _write(run / "trajectory.json", {"steps": []})
    with pytest.raises(ConfigError) as exc:
        write_report([run], tmp_path / "out")
    msg = str(exc.value)
    assert len(msg.splitlines()) == 1 and str(run) in msg
    assert not (tmp_path / "out" / "report.md").exists()


def test_cli_report(runs, tmp_path, monkeypatch, capsys):
    from polyprune.cli import main

    out = tmp_path / "cli"
    monkeypatch.setattr(sys, "argv", ["polyprune", "report", str(runs), "--out", str(out)])
    main()
    assert (out / "report.md").is_file()
    assert str(out / "report.md") in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["polyprune", "report", str(tmp_path / "nope"), "--out", str(out)])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "nope" in err and len(err.strip().splitlines()) == 1
