import pytest
import torch

from polyprune.counting import count_macs, count_params, training_memory_bytes
from polyprune.models import build_model


def _hand_macs(cin: int, b: int, depth: int, s: int) -> int:
    """Sum over convs of Cout*Cin*k*k*Hout*Wout; ConvTranspose(k=2, s=2): Cout*Cin*k*k*Hin*Win."""
    macs, prev = 0, cin
    for i in range(depth):  # encoder: two 3x3 convs at s / 2**i
        c, hw = b * 2**i, (s // 2**i) ** 2
        macs += c * prev * 9 * hw + c * c * 9 * hw
        prev = c
    c, hw = b * 2**depth, (s // 2**depth) ** 2  # bottleneck
    macs += c * prev * 9 * hw + c * c * 9 * hw
    prev = c
    for i in reversed(range(depth)):
        c, hw_in, hw = b * 2**i, (s // 2 ** (i + 1)) ** 2, (s // 2**i) ** 2
        macs += c * prev * 4 * hw_in  # up: ConvTranspose2d(prev, c, 2, stride=2) on the low-res input
        macs += c * (c + c) * 9 * hw + c * c * 9 * hw  # dec: concat(skip c, up c) -> c -> c
        prev = c
    return macs + 1 * prev * 1 * s * s  # 1x1 head


@pytest.mark.parametrize(("b", "depth", "s"), [(4, 4, 32), (8, 2, 64), (6, 3, 48)])
def test_count_macs_matches_hand_count(b, depth, s):
    model = build_model("unet", base_width=b, depth=depth)
    assert count_macs(model, s) == _hand_macs(3, b, depth, s)


def test_count_params_plain():
    model = build_model("unet", base_width=4)
    assert count_params(model) == sum(p.numel() for p in model.parameters()) > 0


def test_training_memory_estimate_grows_with_batch_and_size_on_a_meta_model():
    with torch.device("meta"):
        model = build_model("unet", base_width=8)
    small, big_batch = training_memory_bytes(model, 64, 2), training_memory_bytes(model, 64, 4)
    assert big_batch > small > count_params(model) * 16  # activations on top of weights + AdamW state
    assert training_memory_bytes(model, 128, 2) > 3 * (small - count_params(model) * 16)
