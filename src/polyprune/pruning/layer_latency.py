"""`cost="latency"`: what removing one channel of a conv saves in measured milliseconds (HALP's per-layer
latency lookup, Shen et al., NeurIPS 2022), on the backend and at the input size the pruned model runs.

Each conv is timed alone, at batch 1 with its own input size in the network, at its current width and
with a quarter of its channels (on the side a group removes: out-channels of the group's convs,
in-channels of their consumers) removed; the saving per channel is the difference over the channels
removed. A depthwise conv loses in- and out-channels together (counted on its out side). Timings are
medians of `runs` runs; a saving that timing noise makes negative counts as a tiny positive one.

Measured widths are cached by the conv's shape (kinds, channels, kernel, stride, groups, input size,
backend) in memory and, for a prune run, in RUN/layer_latency.json, so a resumed or iterative run does
not time the same conv twice.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from polyprune.errors import ConfigError
from polyprune.files import write_json
from polyprune.latency import time_callable

BACKENDS = ("torch", "onnxruntime")
SHRINK = 0.25  # share of the channels removed for the probe


class LayerLatency:
    def __init__(
        self, backend: str = "torch", *, runs: int = 15, threads: int | None = None, cache: Path | None = None
    ) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"latency cost is measured with {' or '.join(BACKENDS)}, not {backend!r}")
        self.backend, self.runs, self.threads, self.cache = backend, runs, threads, cache
        self.table: dict[str, float] = {}
        if cache is not None and cache.is_file():
            try:
                self.table = {str(k): float(v) for k, v in json.loads(cache.read_text()).items()}
            except (OSError, ValueError, AttributeError):
                self.table = {}  # a damaged cache is only a cache: measure again

    def saving_per_channel(self, m: _ConvNd, in_hw: tuple[int, ...], side: str) -> float:
        """ms saved by removing one channel on `side` ("out" or "in") of `m` at input size `in_hw`."""
        depthwise = m.groups > 1 and m.groups == m.in_channels
        if side == "in" and depthwise:
            return 0.0  # the same channel as its out side
        c = m.out_channels if side == "out" else m.in_channels
        k = max(1, math.floor(c * SHRINK))
        if c - k < 1:
            return 1e-6
        full = self._ms(m, in_hw, m.in_channels, m.out_channels)
        if depthwise:
            small = self._ms(m, in_hw, c - k, c - k)
        elif side == "out":
            small = self._ms(m, in_hw, m.in_channels, c - k)
        else:
            small = self._ms(m, in_hw, c - k, m.out_channels)
        return max((full - small) / k, 1e-6)

    def save(self) -> None:
        if self.cache is not None:
            write_json(self.cache, self.table)

    # ------------------------------------------------------------------------------------ timing

    def _ms(self, m: _ConvNd, in_hw: tuple[int, ...], cin: int, cout: int) -> float:
        depthwise = m.groups > 1 and m.groups == m.in_channels
        groups = cin if depthwise else m.groups
        if cin % groups or cout % groups:
            groups = 1
        key = json.dumps(
            [type(m).__name__, cin, cout, m.kernel_size, m.stride, m.padding, m.dilation, groups, list(in_hw),
             self.backend, self.threads],
        )  # fmt: skip
        if key not in self.table:
            probe = _conv_like(m, cin, cout, groups).eval()
            x = torch.randn(1, cin, *in_hw)
            self.table[key] = self._time(probe, x)
        return self.table[key]

    def _time(self, probe: nn.Module, x: torch.Tensor) -> float:
        if self.backend == "torch":
            with torch.no_grad():
                return time_callable(lambda: probe(x), runs=self.runs, warmup=2).median_ms
        from polyprune.export import ort_session

        buf = io.BytesIO()
        torch.onnx.export(probe, (x,), buf, dynamo=False, opset_version=17)
        sess = ort_session(buf.getvalue(), self.threads)
        feed = {sess.get_inputs()[0].name: x.numpy()}
        return time_callable(lambda: sess.run(None, feed), runs=self.runs, warmup=2).median_ms


def _conv_like(m: _ConvNd, cin: int, cout: int, groups: int) -> nn.Module:
    kw: dict[str, Any] = {
        "kernel_size": m.kernel_size,
        "stride": m.stride,
        "padding": m.padding,
        "dilation": m.dilation,
        "groups": groups,
        "bias": m.bias is not None,
    }
    if isinstance(m, nn.ConvTranspose2d):
        return nn.ConvTranspose2d(cin, cout, output_padding=m.output_padding, **kw)
    if isinstance(m, nn.Conv2d):
        return nn.Conv2d(cin, cout, padding_mode=m.padding_mode, **kw)
    raise ConfigError(f"latency cost handles 2-D convs; {type(m).__name__} is not one")
