"""Logit-scale calibration: it recovers a known scale, keeps every mask at 0.5, and prune applies it."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cli_helpers import assert_ok, cli
from polyprune.calibration import calibrate_output_scale, fit_logit_scale
from polyprune.io import InputSpec, load_model
from polyprune.models import build_model
from polyprune.train import make_datasets


@pytest.mark.parametrize("true_scale", [0.5, 2.0, 4.0])
def test_the_fit_recovers_the_scale_that_generated_the_labels(true_scale):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200_000, generator=g) * 2
    y = (torch.rand(200_000, generator=g) < torch.sigmoid(true_scale * z)).float()
    s, before, after = fit_logit_scale(z, y)
    assert s == pytest.approx(true_scale, rel=0.05)
    assert after < before


def test_calibration_keeps_every_mask_and_scales_the_head(synth_dir):
    _, val = make_datasets([synth_dir], InputSpec(size=32), seed=0, augment=False)
    torch.manual_seed(0)
    model = build_model("unet", base_width=4).eval()
    x = torch.stack([val[i][0] for i in range(len(val))])
    with torch.no_grad():
        z0 = model(x)
    w0 = model.head.weight.detach().clone()
    result = calibrate_output_scale(model, val, device="cpu", precision="fp32")
    assert result is not None and result["val_bce_after"] <= result["val_bce_before"]
    s = result["logit_scale"]
    with torch.no_grad():
        z1 = model(x)
    torch.testing.assert_close(model.head.weight, w0 * s)
    torch.testing.assert_close(z1, z0 * s, rtol=1e-4, atol=1e-5)
    assert torch.equal(z1 > 0, z0 > 0)  # the masks at 0.5


def test_an_over_confident_network_is_left_as_it_is(synth_dir):
    _, val = make_datasets([synth_dir], InputSpec(size=32), seed=0, augment=False)
    torch.manual_seed(0)
    model = build_model("unet", base_width=4).eval()
    with torch.no_grad():
        model.head.weight.mul_(1000.0)  # logits far too large for an untrained network
        model.head.bias.mul_(1000.0)
    w0 = model.head.weight.detach().clone()
    result = calibrate_output_scale(model, val, device="cpu", precision="fp32")
    assert result["logit_scale"] == 1.0 and result["fitted_scale"] < 1.0
    assert torch.equal(model.head.weight, w0)


def test_a_network_without_an_output_conv_or_a_validation_set_is_left_alone(synth_dir):
    _, val = make_datasets([synth_dir], InputSpec(size=32), seed=0, augment=False)
    assert calibrate_output_scale(nn.Sequential(nn.Conv2d(3, 1, 1)), val, device="cpu") is None
    assert calibrate_output_scale(build_model("unet", base_width=4), [], device="cpu") is None


@pytest.mark.parametrize("flag", ["--calibrate", "--no-calibrate"])
def test_prune_calibrates_the_final_model_unless_told_not_to(capsys, flag, model_file, data, tmp_path):
    out = tmp_path / "run"
    args = ["prune", "--model", model_file, "--data", data, "--out", out, "--target-macs", "0.6"]
    assert_ok(cli(capsys, *args, "--finetune-iters", "1", "--threads", "1", "-q", flag))
    traj = json.loads((out / "trajectory.json").read_text())
    final = traj["final"]
    model = load_model(out / "model.safetensors")
    if flag == "--calibrate":
        assert final["calibration"]["logit_scale"] > 0
        step = load_model(out / "steps" / f"step_{traj['final_step']:03d}.safetensors")  # before the scale
        s = final["calibration"]["logit_scale"]
        torch.testing.assert_close(model.head.weight, step.head.weight * s)
        assert model.polyprune_meta.pruning["calibration"]["logit_scale"] == s  # in the file too
    else:
        assert "calibration" not in final
