"""What both encoder UNets share: config round trip after width changes, residual width rules."""

import pytest
import torch

from polyprune.errors import ConfigError
from polyprune.models import build_model
from polyprune.models import efficientnet_lite as lite
from polyprune.models import mobilenetv2 as mnv2

# (family, its module, one residual stage's blocks and a smaller width for it, a hidden width,
#  a block whose output is added to its input's, and that input's width)
FAMILIES = [
    ("unet-mobilenetv2", mnv2, (4, 5, 6), 16, "block9.hidden", "block5", 32),
    ("unet-efficientnet-lite0", lite, (5, 6, 7), 48, "block9.hidden", "block6", 80),
]


@pytest.mark.parametrize("upsample", ["bilinear", "transpose"])
@pytest.mark.parametrize(("arch", "module", "stage", "stage_width", "hidden", "_b", "_w"), FAMILIES)
def test_config_roundtrip_after_width_changes(upsample, arch, module, stage, stage_width, hidden, _b, _w):
    w = module.default_widths()
    # one residual stage shrinks together; a hidden width and a decoder width alone
    w.update({f"block{i}.out": stage_width for i in stage} | {hidden: 40, "dec2.conv1": 7})
    m = build_model(arch, upsample=upsample, widths=w).eval()
    x = torch.randn(1, 3, 64, 64)
    m2 = build_model(**m.config())
    m2.load_state_dict(m.state_dict())
    assert (
        m2.widths() == m.widths() == {k: v for k, v in w.items() if upsample == "transpose" or "up" not in k}
    )
    assert torch.equal(m2.eval()(x), m(x))


@pytest.mark.parametrize(("arch", "module", "_s", "_sw", "_h", "block", "input_width"), FAMILIES)
def test_residual_width_mismatch_is_a_config_error(arch, module, _s, _sw, _h, block, input_width):
    w = module.default_widths()
    w[f"{block}.out"] = 8  # the block adds its input to its own output
    with pytest.raises(ConfigError, match=rf"{block}.*\({input_width}\)"):
        build_model(arch, widths=w)
    with pytest.raises(ConfigError, match="decoder_widths"):
        build_model(arch, decoder_widths=[8, 8])
    with pytest.raises(ConfigError, match="unknown"):
        build_model(arch, widths={"block99.out": 3})
