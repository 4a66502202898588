"""Frozen layers: fit leaves their weights and BatchNorm statistics bit-identical, trains the rest, and
gives the gradients back when it returns; bad names are one clear error."""

from __future__ import annotations

import json

import pytest
import torch

from cli_helpers import assert_error, assert_ok, cli, train_args
from polyprune.errors import ConfigError
from polyprune.fit import fit
from polyprune.freeze import FrozenLayers, check_layer_names
from polyprune.io import InputSpec, load_model
from polyprune.models import build_model
from polyprune.train import make_datasets


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_fit_leaves_frozen_layers_exactly_as_they_were_and_trains_the_rest(synth_dir):
    tr, _ = make_datasets([synth_dir], InputSpec(size=32), val_fraction=0.0, seed=0)
    torch.manual_seed(0)
    model = build_model("unet", base_width=4)
    enc0, dec0 = _state(model.enc0), _state(model.dec0)
    fit(model, tr, None, iters=4, batch=4, lr=1e-2, device="cpu", progress=False, freeze=["enc0"])
    for k, v in model.enc0.state_dict().items():  # weights and BatchNorm running statistics
        assert torch.equal(v, enc0[k]), k
    assert any(not torch.equal(v, dec0[k]) for k, v in model.dec0.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())  # thawed on return


def test_a_parameter_frozen_by_the_caller_stays_frozen():
    model = build_model("unet", base_width=4)
    model.enc1.requires_grad_(False)
    frozen = FrozenLayers(model, ["enc0", "enc1"])
    assert not any(p.requires_grad for p in model.enc0.parameters())
    frozen.thaw()
    assert all(p.requires_grad for p in model.enc0.parameters())
    assert not any(p.requires_grad for p in model.enc1.parameters())


def test_frozen_layers_stay_in_eval_mode_while_the_rest_trains():
    model = build_model("unet", base_width=4).train()
    frozen = FrozenLayers(model, ["enc0"])
    frozen.keep_in_eval()
    assert not any(m.training for m in model.enc0.modules()) and model.dec0.training


def test_an_unknown_layer_names_the_option_and_the_top_level_layers():
    model = build_model("unet", base_width=4)
    with pytest.raises(ConfigError, match=r"--ignore 'encoder'.*enc0, enc1"):
        check_layer_names(model, ["encoder"], "--ignore")
    check_layer_names(model, ["enc0.conv1", "head"], "--freeze")  # dotted names reach inner layers


def test_freezing_everything_is_refused(synth_dir):
    tr, _ = make_datasets([synth_dir], InputSpec(size=32), val_fraction=0.0, seed=0)
    model = build_model("unet", base_width=4)
    names = [n for n, _ in model.named_children()]
    with pytest.raises(ConfigError, match="nothing to train"):
        fit(model, tr, None, iters=1, device="cpu", progress=False, freeze=names)
    assert all(p.requires_grad for p in model.parameters())


def test_prune_freeze_keeps_an_ignored_layer_identical_to_the_parent(capsys, model_file, data, tmp_path):
    out = tmp_path / "run"
    args = ["prune", "--model", model_file, "--data", data, "--out", out, "--target-macs", "0.6"]
    args += ["--ignore", "enc0", "--freeze", "enc0", "--finetune-iters", "2", "--threads", "1", "-q"]
    assert_ok(cli(capsys, *args))
    parent, child = load_model(model_file), load_model(out / "model.safetensors")
    want = parent.enc0.state_dict()
    for k, v in child.enc0.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert json.loads((out / "trajectory.json").read_text())["config"]["freeze"] == ["enc0"]


@pytest.mark.parametrize("option", ["--freeze", "--ignore"])
def test_prune_refuses_an_unknown_layer_in_one_line(capsys, option, model_file, data, tmp_path):
    args = ["prune", "--model", model_file, "--data", data, "--out", tmp_path / "r", "--target-macs", "0.5"]
    assert_error(cli(capsys, *args, option, "encoder"), f"{option} 'encoder'", "enc0")


def test_train_freeze_refuses_an_unknown_layer_in_one_line(capsys, synth_dir, tmp_path):
    assert_error(
        cli(capsys, *train_args(synth_dir, tmp_path / "t", "--freeze", "encoder")), "--freeze 'encoder'"
    )
