import pytest
import torch
from torch import nn

from polyprune.ema import WeightEMA, ema_decay_at
from polyprune.errors import ConfigError


def test_decay_ramps_up_to_its_value():
    assert ema_decay_at(0.999, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.999, 90) == pytest.approx(0.91)
    assert ema_decay_at(0.999, 10**6) == 0.999


def test_the_average_moves_towards_the_weights_by_one_minus_the_decay():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    ema = WeightEMA(model, decay=0.5)
    ema.update(model)  # the first update copies
    w0 = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(4.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update(model)  # n=1: d = min(0.5, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.module[0].weight, w0 + (1 - d))
    assert torch.allclose(ema.module[1].running_mean, torch.full((2,), 4.0 * (1 - d)))  # buffers too
    assert int(ema.module[1].num_batches_tracked) == 7  # integer buffers follow the model
    assert ema.updates == 2


def test_state_round_trips():
    model = nn.Linear(3, 2)
    a = WeightEMA(model, 0.9)
    for _ in range(3):
        with torch.no_grad():
            model.weight.mul_(1.5)
        a.update(model)
    b = WeightEMA(nn.Linear(3, 2), 0.9)
    b.load_state(a.state())
    assert b.updates == 3 and torch.equal(b.module.weight, a.module.weight)


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.1])
def test_a_decay_outside_0_1_is_refused(decay):
    with pytest.raises(ConfigError, match="ema"):
        WeightEMA(nn.Linear(1, 1), decay)
