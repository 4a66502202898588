"""Pure logic of the benchmark harness (benchmarks/): cell keys, resume bookkeeping, schedules, aggregation."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import grid as G


def test_cells_cover_the_grid_in_order_with_distinct_folders():
    g = G.GRIDS["full"]
    cells = G.make_cells(g, "abc")
    per_seed = sum(len(set(g.targets) & set(g.targets_of(m))) for m in g.methods)
    assert len(cells) == per_seed * len(g.seeds) - len(g.cut_cells)
    assert not {(c.method, c.target, c.seed) for c in cells} & set(g.cut_cells)
    assert {c.target for c in cells if c.method == "scratch"} == {0.25}  # a cell cut to fit the budget
    assert len({c.name for c in cells}) == len(cells)
    assert (cells[0].method, cells[0].target, cells[0].seed) == (g.methods[0], g.targets[0], g.seeds[0])


def test_cell_key_changes_with_budget_and_parent_not_with_unrelated_grid_fields():
    g = G.GRIDS["quick"]
    base = G.make_cells(g, "p1")[0]
    assert G.make_cells(g, "p2")[0].key != base.key
    assert G.make_cells(replace(g, finetune_iters=g.finetune_iters + 1), "p1")[0].key != base.key
    # the list of methods / one-shot ratios does not change what one cell computes
    assert G.make_cells(replace(g, oneshot_ratios=(0.0, 0.5)), "p1")[0].key == base.key


def test_cell_key_keeps_older_cells_unless_a_method_sets_round_to():
    """Method.round_to joins the hash only when set: cells done before the field keep their folders."""
    g = G.GRIDS["full"]
    plain = G.cell_config(g, "tgn-abs-loss", 0.5, 0, "p")
    assert "round_to" not in plain["method"]
    assert G.cell_config(g, "tp-taylor", 0.5, 0, "p")["method"]["round_to"] == 1


def test_a_methods_title_changes_what_reports_show_not_its_cells():
    m = G.METHODS["tgn-abs-loss"]
    retitled = replace(m, title="something else")
    assert retitled.record() == m.record() and "title" not in m.record()
    assert retitled.description == "something else" and replace(m, title="").description == m.label


def test_cut_cells_are_left_out_without_renaming_the_others():
    g = G.GRIDS["quick"]
    cut = replace(g, cut_cells=(("l1", 0.5, 0),))
    kept = {(c.method, c.key) for c in G.make_cells(cut, "p")}
    assert ("l1" not in {m for m, _ in kept}) and kept < {(c.method, c.key) for c in G.make_cells(g, "p")}


def test_pending_skips_cells_with_done_json_only(tmp_path):
    cells = G.make_cells(G.GRIDS["smoke"], "p")
    assert G.pending(tmp_path, cells) == cells
    done = G.cell_dir(tmp_path, cells[0])
    done.mkdir(parents=True)
    (done / "model.safetensors").write_bytes(b"")  # a model without its record is not done
    assert G.pending(tmp_path, cells) == cells
    (done / "done.json").write_text(json.dumps({"method": cells[0].method, "status": "ok"}))
    assert G.pending(tmp_path, cells) == cells[1:]
    assert [r["method"] for r in G.read_done(tmp_path, cells)] == [cells[0].method]


def test_make_grid_overrides_and_rejects_unknown_methods():
    g = G.make_grid("quick", seeds=[0, 1], methods=["l1", "scratch"])
    assert g.seeds == (0, 1) and g.methods == ("l1", "scratch") and g.oneshot_methods == ("l1",)
    with pytest.raises(ValueError):
        G.make_grid("quick", methods=["nope"])
    assert G.make_grid("quick", targets=[0.1, 0.5, 0.25, 0.5]).targets == (0.5, 0.25, 0.1)
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        G.make_grid("quick", targets=[1.5])


def test_aggregate_and_findings_on_synthetic_records():
    import report

    g = replace(G.GRIDS["quick"], methods=("tgn-abs-loss", "l1", "scratch"), seeds=(0, 1), targets=(0.25,))

    def rec(method, seed, dice, ms):
        return {
            "method": method,
            "target": 0.25,
            "seed": seed,
            "status": "ok",
            "params": 1e5,
            "macs": 25.0,
            "val_dice": dice,
            "test": {
                "kvasir": {"dice": dice, "mean_dice": dice},
                "clinicdb": {"dice": dice, "mean_dice": dice},
                "colondb": {"dice": dice, "mean_dice": dice},
            },
            "latency": {"256": {"median_ms": ms}, "352": {"median_ms": 2 * ms}},
        }

    parent = rec("parent", None, 0.80, 40.0)
    parent["macs"] = 100.0
    records = [rec("tgn-abs-loss", 0, 0.78, 20), rec("tgn-abs-loss", 1, 0.80, 20), rec("l1", 0, 0.81, 20)]
    records.append({"method": "scratch", "target": 0.25, "seed": 0, "status": "unreachable", "error": "x"})
    rows = report.aggregate(records, parent, g)
    tgn = next(r for r in rows if r["method"] == "tgn-abs-loss")
    assert tgn["mean"]["kvasir_dice"] == pytest.approx(0.79) and tgn["sd"]["kvasir_dice"] > 0
    assert tgn["mean"]["speedup_352"] == pytest.approx(2.0) and tgn["mean"][
        "macs_reduction"
    ] == pytest.approx(4.0)
    assert next(r for r in rows if r["method"] == "scratch")["status"] == "unreachable"
    prow = {
        "method": "parent",
        "target": 1.0,
        "seeds": [],
        "status": "ok",
        "mean": report.metrics(parent, parent, (256, 352)),
        "sd": {},
    }
    text = "\n".join(report.findings(rows, prow, {}, g))
    assert "taylor-gradnorm loses at 25% MACs on Kvasir" in text and "l1 (0.810" in text
    assert "Headline: the fastest pruned model within 1 Dice point" in text
    md = report.table(rows, prow, g, 192)
    assert md.count("\n") == 2 + len(rows)  # header, rule, parent + one line per row


def test_claim_cell_keeps_parallel_runs_apart(tmp_path):
    from run import CLAIM, claim_cell

    cell = tmp_path / "cells" / "l1_t025_s0_x"
    assert claim_cell(cell)  # first claim: ours
    assert not claim_cell(cell)  # a live process (this one) holds it
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (cell / CLAIM).write_text(f"{dead.stdout.strip()} {socket.gethostname()}")
    assert claim_cell(cell)  # the claimant is gone: taken over
    assert (cell / CLAIM).read_text().split()[0] == str(os.getpid())
    (cell / CLAIM).write_text("")  # being written right now by someone else
    assert not claim_cell(cell)


# its subprocess limit: the suite's 600 s default was hit on an AVX2-only CI machine
@pytest.mark.timeout(900)
def test_smoke_grid_runs_end_to_end_through_the_library_schedule(shared_data, tmp_path):
    """`run.py --smoke` on real data: a tiny parent, our criterion, torch-pruning's MetaPruner and the
    uniform baseline, every pruned cell made by `polyprune prune`'s own schedule, three test sets."""
    run = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
    work = tmp_path / "work"
    cmd = [sys.executable, str(run), "--smoke", "--work", str(work), "--data-root", str(shared_data),
           "--threads", "1", "--quiet"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((work / "smoke_results" / "results.json").read_text())
    recs = {r["method"]: r for r in res["cells"]}
    assert set(recs) == {"tgn-abs-loss", "tp-taylor", "scratch"}
    parent_macs = res["parent"]["macs"]
    for name in ("tgn-abs-loss", "tp-taylor"):
        rec = recs[name]
        assert rec["status"] == "ok" and rec["train"]["loop"] == "polyprune.pruning.prune_run"
        assert rec["macs"] <= 0.5 * parent_macs and len(rec["train"]["rounds"]) == 2
        traj = json.loads((work / "cells" / rec["cell"] / "prune" / "trajectory.json").read_text())
        assert traj["config"]["criterion"] == rec["method"].replace("tgn-abs-loss", "taylor-gradnorm")
        assert traj["budget"]["finetune_steps"] == 4  # 2 steps x finetune_iters 4 // 2
    for name in ("kvasir", "clinicdb", "colondb"):
        assert recs["scratch"]["test"][name]["n_images"] == 20
    lat = recs["scratch"]["latency"]  # fp32 at both sizes, INT8 and OpenVINO at 352, in the final pass
    assert {"256", "352", "int8_352", "openvino_352"} <= set(lat) and lat["int8_352"]["median_ms"] > 0
    assert "ColonDB Dice" in (work / "smoke_results" / "results.md").read_text()


def test_pareto_front_keeps_the_points_nothing_beats_on_both_speed_and_dice():
    import report

    pts = [(10.0, 0.90), (20.0, 0.88), (15.0, 0.85), (30.0, 0.80), (30.0, 0.70), (5.0, 0.89)]
    assert report.pareto_front(pts) == [(10.0, 0.90), (20.0, 0.88), (30.0, 0.80)]
    assert report.pareto_front([(1.0, 0.5)]) == [(1.0, 0.5)]


def test_equal_latency_compares_the_uniform_model_with_the_best_pruned_model_at_least_as_fast():
    import report

    def row(method, target, fps, dice):
        return {
            "method": method,
            "target": target,
            "status": "ok",
            "mean": {"fps_352": fps, "kvasir_dice": dice},
        }

    rows = [row("scratch", 0.25, 100.0, 0.80), row("tgn-abs-loss", 0.5, 90.0, 0.88), row("tgn-abs-loss", 0.25, 120.0, 0.84),
            row("l1", 0.25, 130.0, 0.10)]  # fmt: skip
    (line,) = report.equal_latency_findings(rows, 352)
    assert "tgn-abs-loss at 25%" in line and "(120.0 FPS, 0.840): it beats it" in line  # 0.88 is too slow
    rows[2]["mean"]["kvasir_dice"] = 0.70
    (line,) = report.equal_latency_findings(rows, 352)
    assert "tgn-abs-loss at 25%" in line and "it does not beat it" in line


def test_drops_table_gives_points_lost_per_test_set_and_the_unseen_sets_ratio():
    import report

    def row(method, k, c, d):
        return {"method": method, "target": 0.5, "status": "ok", "seeds": [0, 1],
                "mean": {"kvasir_dice": k, "clinicdb_dice": c, "colondb_dice": d}, "sd": {"kvasir_dice": 0.005}}  # fmt: skip

    parent = row("parent", 0.89, 0.86, 0.75)
    md = report.drops_table([row("tgn-abs-loss", 0.87, 0.85, 0.71)], parent)
    line = md.splitlines()[-1]
    assert line == "| tgn-abs-loss | 50% | 2 | 2.0 ± 0.5 | 1.0 | 4.0 | 2.0x |"


def test_zoo_eval_ensemble_averages_logits_like_the_teacher(model_file, tmp_path):
    """`zoo_eval --ensemble` scores what `train --teacher A --teacher B` distills from: the mean logits."""
    import numpy as np
    import torch

    import zoo_eval
    from polyprune.io import InputSpec, save_model
    from polyprune.models import build_model
    from polyprune.predictor import Predictor
    from polyprune.teacher import load_teacher

    torch.manual_seed(1)
    other = save_model(
        tmp_path / "b.safetensors", build_model("unet", base_width=4), input_spec=InputSpec(size=32)
    )
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    got = zoo_eval.MeanLogits([model_file, other], threads=1, tta="hflip").predict(rgb)
    x = torch.from_numpy(Predictor(model_file, backend="torch").preprocess(rgb))[None]
    with torch.no_grad():
        want = torch.sigmoid(load_teacher([model_file, other], InputSpec(size=32), tta="hflip")(x))[0, 0]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
