"""criterion tp-taylor / tp-magnitude: torch-pruning's MetaPruner behind prune_model and the prune schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from polyprune.counting import count_macs
from polyprune.errors import ConfigError
from polyprune.files import read_json
from polyprune.io import InputSpec, load_model, save_model
from polyprune.models import build_model
from polyprune.pruning import prune_model
from polyprune.pruning.config import PruneConfig
from polyprune.pruning.schedule import prune_run

SIZE = 32


def _batches(n: int = 8):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, SIZE, SIZE, generator=g)
    y = (x.mean(1, keepdim=True) > 0.5).float()
    return [(x[:4], y[:4]), (x[4:], y[4:])]


def _unet() -> nn.Module:
    torch.manual_seed(0)
    return build_model("unet", base_width=16, depth=2)


@pytest.mark.parametrize("criterion", ["tp-taylor", "tp-magnitude"])
def test_metapruner_reaches_a_macs_target_with_rounded_widths_and_reloads(criterion, tmp_path):
    m = _unet()
    x = torch.zeros(1, 3, SIZE, SIZE)
    macs0 = count_macs(m, SIZE)
    loss = nn.BCEWithLogitsLoss()
    r = prune_model(m, x, _batches(), criterion, {"macs": 0.5}, loss_fn=loss, n_images=8, round_to=8)
    assert count_macs(m, SIZE) <= 0.5 * macs0 and r.macs_after == count_macs(m, SIZE)
    assert r.filters_removed > 0 and r.options["metapruner_steps"] > 0
    assert r.widths_after["head"] == 1  # the output layer is never pruned
    assert all(w % 8 == 0 for k, w in r.widths_after.items() if k != "head")
    assert all(p.grad is None for p in m.parameters())  # tp-taylor's gradients are cleared
    path = save_model(tmp_path / "m.safetensors", m, input_spec=InputSpec(size=SIZE))
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(load_model(path)(x + 0.5), m(x + 0.5))


def test_the_two_tp_criteria_rank_differently():
    """Taylor reads the loss gradient, magnitude only the weights: on the same parent they keep other channels."""
    x = torch.zeros(1, 3, SIZE, SIZE)
    kept = []
    for criterion in ("tp-taylor", "tp-magnitude"):
        m = _unet()
        prune_model(m, x, _batches(), criterion, {"macs": 0.6}, loss_fn=nn.BCEWithLogitsLoss(), n_images=8)
        kept.append([p.detach().clone() for p in m.parameters()])
    differs = any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(*kept, strict=True))
    assert differs


def test_metapruner_refuses_what_it_cannot_do():
    x = torch.zeros(1, 3, SIZE, SIZE)
    with pytest.raises(ConfigError, match="calibration"):
        prune_model(_unet(), x, None, "tp-taylor", {"macs": 0.5})
    with pytest.raises(ConfigError, match="cost"):
        prune_model(_unet(), x, None, "tp-magnitude", {"macs": 0.5}, cost="macs")
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 1, 1))
    with pytest.raises(ConfigError, match="registry"):
        prune_model(plain, x, None, "tp-magnitude", {"macs": 0.5})


def _cfg(parent, data, out, **kw) -> PruneConfig:
    base = {"n_images": 8, "batch": 4, "latency_runs": 2, "val_fraction": 0.25, "threads": 1, "device": "cpu",
            "precision": "fp32", "progress": False, "finetune_iters": 1}  # fmt: skip
    return PruneConfig(model=str(parent), data=[str(data)], out=str(out), **{**base, **kw})


def test_steps_reach_a_macs_target_geometrically_through_the_schedule(synth_dir, tmp_path):
    parent = save_model(tmp_path / "parent.safetensors", _unet(), input_spec=InputSpec(size=SIZE))
    s = prune_run(
        _cfg(parent, synth_dir, tmp_path / "run", criterion="tp-magnitude", target_macs=0.25, steps=2)
    )
    traj = read_json(tmp_path / "run" / "trajectory.json")
    macs = [r["macs"] / traj["parent"]["macs"] for r in traj["steps"]]
    assert len(macs) == 3 and s["final_step"] == 2  # the parent, then the two steps
    assert 0.25 < macs[1] <= 0.5  # step 1 aims at 0.25 ** (1/2)
    assert macs[2] <= 0.25 and s["macs_fraction"] <= 0.25
    assert all(r["finetune_steps"] == 1 for r in traj["steps"][1:])
    assert load_model(s["model"])(torch.zeros(1, 3, SIZE, SIZE)).shape == (1, 1, SIZE, SIZE)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"target_fps": 10.0, "steps": 2}, "--steps splits"),
        ({"target_macs": 0.5, "steps": 2, "one_shot": True}, "--one-shot"),
        ({"target_macs": 0.5, "steps": 0}, "--steps must be"),
        ({"target_macs": 0.5, "criterion": "tp-taylor", "cost": "macs"}, "--cost apply"),
    ],
)
def test_steps_options_are_checked_before_anything_runs(kw, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        prune_run(_cfg(tmp_path / "missing.safetensors", tmp_path, tmp_path / "run", **kw))


def test_tp_criteria_default_to_torch_prunings_round_to_not_polyprunes_8():
    """MetaPruner rounds kept widths down: with round_to=8 one channel under the threshold halves a
    16-wide layer, so a 2 % target removes far more than 2 %; its own default (1) stays near the target."""
    x = torch.zeros(1, 3, SIZE, SIZE)
    lost = {}  # the largest fraction of one layer's filters removed, for a 2 % target
    for round_to in (None, 8):
        r = prune_model(_unet(), x, None, "tp-magnitude", {"ratio": 0.02}, round_to=round_to)
        lost[round_to] = max(1 - r.widths_after[k] / w for k, w in r.widths_before.items())
    assert lost[8] >= 0.5 > 0.25 >= lost[None]
