import pytest
import torch

from polyprune.errors import ConfigError
from polyprune.models import build_model, list_models
from polyprune.models.unet import default_widths


def test_registry_lists_unet():
    assert "unet" in list_models()
    with pytest.raises(ConfigError, match="unknown model"):
        build_model("nope")


@pytest.mark.parametrize("upsample", ["transpose", "bilinear"])
def test_unet_shapes_and_config_roundtrip(upsample):
    m = build_model("unet", base_width=4, upsample=upsample).eval()
    x = torch.randn(2, 3, 32, 48)
    y = m(x)
    assert y.shape == (2, 1, 32, 48)
    m2 = build_model(**m.config())
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2.eval()(x), y)


def test_unet_base16_params_match_the_classic_count():
    # 1,942,577 is the base-16 ConvTranspose UNet measured in shared/research/env.md
    m = build_model("unet", base_width=16)
    assert sum(p.numel() for p in m.parameters()) == 1_942_577


def test_uneven_widths_build_and_are_read_back():
    w = default_widths(8, 4)
    w.update({"enc0.conv2": 5, "bottleneck.conv1": 17, "up2": 9, "dec1.conv1": 3})
    m = build_model("unet", base_width=8, widths=w)
    assert m.widths() == w
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 1, 32, 32)


def test_bad_config_is_a_config_error():
    with pytest.raises(ConfigError):
        build_model("unet", upsample="nearest")
    with pytest.raises(ConfigError):
        build_model("unet", widths={"enc9.conv1": 4})
    with pytest.raises(ConfigError):
        build_model("unet", bogus=1)
