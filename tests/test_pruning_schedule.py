"""The prune schedule on tiny synthetic data: one-shot, iterative, trajectory, resume, targets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from polyprune.errors import ConfigError, TargetError
from polyprune.files import read_json
from polyprune.io import InputSpec, load_model, read_metadata, save_model
from polyprune.models import build_model
from polyprune.pruning import session
from polyprune.pruning.config import PruneConfig
from polyprune.pruning.schedule import prune_run

SIZE = 32


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    m = build_model("unet", base_width=16, depth=2)
    return save_model(
        tmp_path_factory.mktemp("parent") / "parent.safetensors", m, input_spec=InputSpec(size=SIZE)
    )


def _cfg(parent: Path, data: Path, out: Path, **kw) -> PruneConfig:
    base = {
        "n_images": 8,
        "batch": 4,
        "latency_runs": 2,
        "val_fraction": 0.25,
        "threads": 1,
        "device": "cpu",
        "precision": "fp32",
        "progress": False,
    }
    return PruneConfig(model=str(parent), data=[str(data)], out=str(out), **{**base, **kw})


def test_one_shot_to_a_macs_target(parent, synth_dir, tmp_path):
    s = prune_run(_cfg(parent, synth_dir, tmp_path / "run", target_macs=0.5, one_shot=True))
    assert s["steps"] == 1 and s["final_step"] == 1
    assert s["child"]["macs"] <= 0.5 * s["parent"]["macs"] and s["macs_fraction"] <= 0.5
    traj = read_json(tmp_path / "run" / "trajectory.json")
    assert [r["step"] for r in traj["steps"]] == [0, 1] and traj["state"] == "done"
    row = traj["steps"][1]
    assert row["val_dice_after_finetune"] is None and row["kept"] == "pruned"  # no fine-tuning
    for key in ("params", "macs", "latency_ms", "size", "backend", "val_dice_before_finetune", "widths"):
        assert key in row
    assert row["size"] == SIZE and row["backend"] == "torch" and row["widths"]["head"] == 1
    child = load_model(s["model"])
    assert child(torch.zeros(1, 3, SIZE, SIZE)).shape == (1, 1, SIZE, SIZE)
    meta = read_metadata(s["model"])
    assert meta.parent["params"] == s["parent"]["params"] and meta.parent["arch"]["name"] == "unet"
    assert meta.parent["path"] == str(parent)
    assert meta.pruning["criterion"] == "taylor-gradnorm" and len(meta.pruning["steps"]) == 1
    assert meta.arch["widths"] == child.widths()


def _iterative(parent: Path, data: Path, out: Path, **kw) -> PruneConfig:
    return _cfg(parent, data, out, target_params=0.5, step_ratio=0.2, finetune_iters=2, **kw)


def test_iterative_steps_fine_tune_and_stop_at_the_target(parent, synth_dir, tmp_path):
    s = prune_run(_iterative(parent, synth_dir, tmp_path / "run", final_epochs=1))
    traj = read_json(tmp_path / "run" / "trajectory.json")
    steps = traj["steps"][1:]
    assert len(steps) >= 2 and s["steps"] == len(steps) == s["final_step"]
    p0 = traj["parent"]["params"]
    assert all(r["params"] > 0.5 * p0 for r in steps[:-1]) and steps[-1]["params"] <= 0.5 * p0
    assert [r["params"] for r in steps] == sorted((r["params"] for r in steps), reverse=True)
    for r in steps:
        assert r["val_dice_after_finetune"] is not None and 0 <= r["val_dice"] <= 1
        assert (tmp_path / "run" / r["checkpoint"]).is_file()
    total = sum(v for k, v in traj["steps"][0]["widths"].items() if k != "head")
    assert steps[0]["filters_removed"] >= 0.2 * total  # a step takes step_ratio of the remaining filters
    assert traj["final"]["step"] == len(steps) and s["child"]["params"] == traj["final"]["params"]
    assert (tmp_path / "run" / "checkpoint" / "last.safetensors").is_file()  # the final fine-tune's state


def test_resume_after_a_stop_gives_the_uninterrupted_result(parent, synth_dir, tmp_path, monkeypatch):
    full = prune_run(_iterative(parent, synth_dir, tmp_path / "full"))
    real_finetune = session.PruneSession.finetune

    def killed_at_step_2(self, model, **kw):
        if kw["desc"].startswith("step 2"):
            raise KeyboardInterrupt
        return real_finetune(self, model, **kw)

    monkeypatch.setattr(session.PruneSession, "finetune", killed_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        prune_run(_iterative(parent, synth_dir, tmp_path / "run"))
    assert [r["step"] for r in read_json(tmp_path / "run" / "trajectory.json")["steps"]] == [0, 1]
    monkeypatch.setattr(session.PruneSession, "finetune", real_finetune)
    resumed = prune_run(_iterative(parent, synth_dir, tmp_path / "run", resume=True))
    a = read_json(tmp_path / "full" / "trajectory.json")["steps"]
    b = read_json(tmp_path / "run" / "trajectory.json")["steps"]
    assert [r["widths"] for r in a] == [r["widths"] for r in b]
    assert [r["val_dice"] for r in a] == pytest.approx([r["val_dice"] for r in b], abs=1e-6)
    assert resumed["child"]["params"] == full["child"]["params"]
    x = torch.randn(1, 3, SIZE, SIZE)
    assert torch.allclose(load_model(full["model"])(x), load_model(resumed["model"])(x), atol=1e-5)
    again = prune_run(_iterative(parent, synth_dir, tmp_path / "run", resume=True))  # done: nothing to redo
    assert again["child"] == resumed["child"]


def test_max_dice_drop_keeps_the_last_step_within_budget(parent, synth_dir, tmp_path):
    s = prune_run(
        _cfg(
            parent, synth_dir, tmp_path / "run", max_dice_drop=0.0, step_ratio=0.3, one_shot=True, max_steps=3
        )
    )
    traj = read_json(tmp_path / "run" / "trajectory.json")
    d0, final = traj["parent"]["val_dice"], traj["final_step"]
    assert all(r["val_dice"] >= d0 for r in traj["steps"][1 : final + 1])
    if final < len(traj["steps"]) - 1:  # stopped by the budget: the next step broke it
        assert traj["steps"][final + 1]["val_dice"] < d0
    assert s["child"]["params"] == traj["steps"][final]["params"]


def test_fps_target_is_measured(parent, synth_dir, tmp_path):
    s = prune_run(_cfg(parent, synth_dir, tmp_path / "run", target_fps=1e-3, one_shot=True))
    assert s["steps"] == 1 and s["backend"] == "torch"


def test_unreachable_target_fails_before_any_work(parent, synth_dir, tmp_path):
    with pytest.raises(TargetError, match=r"target macs 0\.0001"):
        prune_run(_cfg(parent, synth_dir, tmp_path / "run", target_macs=0.0001))
    assert not (tmp_path / "run" / "steps").exists()


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({}, r"exactly one target.*\(got none\)"),
        ({"target_macs": 0.5, "target_params": 0.5}, r"exactly one target.*--target-params, --target-macs\)"),
        ({"target_macs": 1.5}, r"--target-macs must be a fraction of the parent in \(0, 1\), got 1.5"),
        ({"target_fps": 30, "backend": "tensorrt"}, "--backend must be one of"),
        ({"target_macs": 0.5, "step_ratio": 1.0}, r"--step-ratio must be in \(0, 1\), got 1.0"),
        ({"target_macs": 0.5, "finetune_epochs": 1, "finetune_iters": 5}, "not both"),
        ({"target_macs": 0.5, "criterion": "taylorfo"}, "unknown criterion 'taylorfo'"),
    ],
)
def test_bad_options_are_config_errors(parent, tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        prune_run(_cfg(parent, tmp_path, tmp_path / "run", **kw))


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from polyprune import cli

    monkeypatch.setattr("sys.argv", ["polyprune", "prune", *args])
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prune(parent, synth_dir, tmp_path, monkeypatch, capsys):
    import json

    common = ["--model", str(parent), "--data", str(synth_dir), "--out", str(tmp_path / "run")]
    common += ["--n-images", "8", "--batch", "4", "--latency-runs", "2", "--threads", "1", "--device", "cpu"]
    code, out, _ = _cli(monkeypatch, capsys, *common, "--target-params", "0.6", "--one-shot", "--json", "-")
    assert code == 0
    s = json.loads(out)
    assert s["child"]["params"] <= 0.6 * s["parent"]["params"] and Path(s["model"]).is_file()
    code, _, err = _cli(monkeypatch, capsys, *common, "--target-params", "0.6", "--target-macs", "0.5", "-q")
    assert code == 2 and err.count("\n") == 1 and "exactly one target" in err
    code, _, err = _cli(monkeypatch, capsys, *common, "--target-macs", "0.0001", "-q", "--overwrite")
    assert code == 2 and err.startswith("error: target macs 0.0001") and err.count("\n") == 1


def test_finetune_budget_counts_every_step_spent(synth_dir, tmp_path):
    """--finetune-budget F: the final fine-tune runs F x the parent's training steps; the trajectory
    counts each step's fine-tuning and the final one, and their share of the parent's training."""
    torch.manual_seed(0)
    parent = save_model(
        tmp_path / "parent.safetensors",
        build_model("unet", base_width=16, depth=2),
        input_spec=InputSpec(size=SIZE),
        train={"epochs": 10, "n_train": 12, "batch": 4},  # 10 x 3 = 30 optimizer steps
    )
    s = prune_run(
        _cfg(
            parent,
            synth_dir,
            tmp_path / "run",
            target_macs=0.7,
            step_ratio=0.2,
            finetune_iters=3,
            finetune_budget=0.2,
        )
    )
    traj = read_json(tmp_path / "run" / "trajectory.json")
    b, steps = traj["budget"], traj["steps"][1:]
    assert traj["finetune"]["parent_steps"] == 30 and b["parent_steps"] == 30
    assert [r["finetune_steps"] for r in steps] == [3] * len(steps) and s["steps"] == len(steps)
    assert b["final_steps"] == 6  # round(0.2 x 30)
    assert b["finetune_steps"] == 3 * len(steps) + 6
    assert b["fraction_of_parent"] == pytest.approx(b["finetune_steps"] / 30)
    ckpt_history = read_metadata(tmp_path / "run" / "model.safetensors").train["finetune"]
    assert ckpt_history["budget"] == 0.2


def test_finetune_budget_needs_the_parents_training_record(parent, synth_dir, tmp_path):
    with pytest.raises(ConfigError, match="finetune-budget"):
        prune_run(
            _cfg(parent, synth_dir, tmp_path / "run", target_macs=0.7, one_shot=True, finetune_budget=0.1)
        )
    with pytest.raises(ConfigError, match="not both"):
        prune_run(
            _cfg(parent, synth_dir, tmp_path / "r2", target_macs=0.7, final_epochs=1, finetune_budget=0.1)
        )


def test_cost_latency_times_convs_once_and_keeps_the_table(parent, synth_dir, tmp_path):
    s = prune_run(_cfg(parent, synth_dir, tmp_path / "run", target_macs=0.6, one_shot=True, cost="latency"))
    assert s["macs_fraction"] <= 0.6
    table = read_json(tmp_path / "run" / "layer_latency.json")
    assert table and all(v > 0 for v in table.values())
    with pytest.raises(ConfigError, match="torch or onnxruntime"):
        prune_run(
            _cfg(parent, synth_dir, tmp_path / "r2", target_macs=0.6, cost="latency", backend="openvino")
        )


def test_validation_is_the_parents_own_split_whatever_the_run_seed(synth_dir, tmp_path):
    """A prune seed other than the parent's training seed must not move training images into validation."""
    from polyprune.train import make_datasets

    torch.manual_seed(0)
    path = save_model(
        tmp_path / "parent.safetensors", build_model("unet", base_width=8, depth=2), input_spec=InputSpec(size=SIZE),
        train={"seed": 3, "val_fraction": 0.25},
    )  # fmt: skip
    run = session.PruneSession(_cfg(path, synth_dir, tmp_path / "run", target_macs=0.5, seed=0))
    _, parent_val = make_datasets([str(synth_dir)], InputSpec(size=SIZE), val_fraction=0.25, seed=3)
    _, seed0_val = make_datasets([str(synth_dir)], InputSpec(size=SIZE), val_fraction=0.25, seed=0)
    assert session._image_paths(run.val_ds) == session._image_paths(parent_val)
    assert session._image_paths(seed0_val) != session._image_paths(parent_val)  # the seed does move the split
    assert run.split_seed == 3


def test_steps_aim_each_step_at_a_geometric_share_of_the_parent():
    """--steps 2 --target-macs 0.25: step 1 keeps 0.5 of the parent's MACs, step 2 the target; each as a
    fraction of the CURRENT model, which is what prune_model reads."""
    from polyprune.pruning.trajectory import step_target

    cfg = PruneConfig(model="m", data=["d"], out="o", target_macs=0.25, steps=2)
    traj = {"parent": {"macs": 100.0, "params": 10.0}}
    assert step_target(cfg, traj, {"step": 0, "macs": 100.0}) == {"macs": pytest.approx(0.5)}
    assert step_target(cfg, traj, {"step": 1, "macs": 50.0}) == {"macs": pytest.approx(0.5)}
    assert step_target(cfg, traj, {"step": 1, "macs": 40.0}) == {
        "macs": pytest.approx(0.625)
    }  # overshoot kept
