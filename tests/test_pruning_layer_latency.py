"""cost="latency": per-conv savings from timed probes, the cache, and ranking by importance per ms."""

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from polyprune.errors import ConfigError
from polyprune.pruning import prune_model
from polyprune.pruning.layer_latency import LayerLatency


class TwoBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Conv2d(3, 8, 3, padding=1)
        self.small = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.head = nn.Conv2d(16, 1, 1)

    def forward(self, x):
        small = F.interpolate(self.small(x), size=x.shape[2:])
        return self.head(torch.cat([self.big(x), small], 1))


class FixedLatency:
    """A stand-in table: `ms[name]` per channel removed, by the conv's identity."""

    def __init__(self, model: nn.Module, ms: dict[str, float]) -> None:
        self.ms = {id(model.get_submodule(k)): v for k, v in ms.items()}

    def saving_per_channel(self, m, in_hw, side):
        return self.ms.get(id(m), 0.0) if side == "out" else 0.0


def test_ranking_per_ms_takes_the_group_that_saves_most():
    """Equal importance (random scores are i.i.d.), but `small` saves 50x more per channel in this table:
    cost="latency" must take small's channels first, against what MACs alone would choose."""
    m = TwoBranch()
    x = torch.randn(1, 3, 32, 32)
    table = FixedLatency(m, {"big": 0.01, "small": 0.5})
    r = prune_model(m, x, None, "random", {"ratio": 0.25}, round_to=1, min_channels=1, cost="latency",
                    latency=table, seed=0)  # fmt: skip
    assert r.removed.get("small", 0) > r.removed.get("big", 0)


def test_measured_savings_grow_with_the_work_a_channel_does_and_are_cached(tmp_path):
    # a 1x1 conv is one GEMM, whose time falls with its out-channels on any backend (a 3x3 conv's oneDNN
    # kernel may not: 128 -> 96 channels saved nothing in some processes here); its 64 channels take ~2.5
    # of ~13 ms on this 2-core machine, well above what a busy second core puts on the medians
    heavy = nn.Conv2d(256, 256, 1)  # at 96 x 96: ~600 MMACs
    light = nn.Conv2d(8, 8, 3, padding=1)  # at 8 x 8: ~37 kMACs, ~16,000x less
    depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
    cache = tmp_path / "layer_latency.json"
    table = LayerLatency("torch", runs=15, cache=cache)
    s_heavy = table.saving_per_channel(heavy, (96, 96), "out")
    s_light = table.saving_per_channel(light, (8, 8), "out")
    assert s_heavy > 10 * s_light > 0
    assert table.saving_per_channel(depthwise, (32, 32), "in") == 0.0  # counted on its out side
    assert table.saving_per_channel(depthwise, (32, 32), "out") > 0
    table.save()
    saved = json.loads(cache.read_text())
    assert len(saved) == len(table.table) >= 5

    again = LayerLatency("torch", runs=5, cache=cache)

    def no_timing(*args):
        raise AssertionError("a cached width was timed again")

    again._callable = no_timing
    assert again.saving_per_channel(heavy, (96, 96), "out") == pytest.approx(s_heavy)


def test_onnxruntime_probes_and_bad_backends():
    conv = nn.Conv2d(16, 16, 3, padding=1)
    assert LayerLatency("onnxruntime", runs=3, threads=1).saving_per_channel(conv, (32, 32), "out") > 0
    with pytest.raises(ConfigError, match="torch or onnxruntime"):
        LayerLatency("openvino")
