import math

import pytest
import torch

from polyprune.errors import ConfigError
from polyprune.losses import LOSSES, bce_dice_loss, distillation_loss, make_loss, structure_loss


def test_losses_are_finite_and_lowest_for_the_truth():
    y = (torch.rand(2, 1, 32, 32) > 0.7).float()
    good, bad = (y * 20 - 10), -(y * 20 - 10)
    for fn in (bce_dice_loss, structure_loss):
        assert fn(good, y) < fn(bad, y)
        assert math.isfinite(float(fn(torch.zeros_like(y), y)))


def test_distillation_loss_is_minimal_where_student_equals_teacher():
    t = torch.randn(2, 1, 16, 16) * 3
    s = t.clone().requires_grad_(True)
    loss = distillation_loss(s, t, temperature=2.0)
    loss.backward()
    assert s.grad.abs().max() < 1e-6  # zero gradient at the teacher's logits
    assert float(distillation_loss(t + 1.0, t, 2.0)) > loss.item()


def test_unknown_loss_is_a_config_error():
    assert make_loss("structure") is LOSSES["structure"]
    with pytest.raises(ConfigError, match="bce-dice"):
        make_loss("focal")
