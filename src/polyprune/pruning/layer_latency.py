"""`cost="latency"`: what removing one channel of a conv saves in measured milliseconds (HALP's per-layer
latency lookup, Shen et al., NeurIPS 2022), on the backend and at the input size the pruned model runs.

Each conv is timed alone, at batch 1 with its own input size in the network, at its current width and
with a quarter of its channels (on the side a group removes: out-channels of the group's convs,
in-channels of their consumers) removed; the saving per channel is the difference over the channels
removed. A depthwise conv loses in- and out-channels together (counted on its out side). Timings are
medians of `runs` runs, the two widths timed in turn within each run (so load from elsewhere on the
machine shifts both, not their difference); a saving that noise makes negative counts as a tiny positive one.

Measured widths are cached by the conv's shape (kinds, channels, kernel, stride, groups, input size,
backend) in memory and, for a prune run, in RUN/layer_latency.json, so a resumed or iterative run does
not time the same conv twice.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from polyprune.errors import ConfigError
from polyprune.files import write_json
from polyprune.latency import time_interleaved

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
        if depthwise:
            small = (c - k, c - k)
        elif side == "out":
            small = (m.in_channels, c - k)
        else:
            small = (c - k, m.out_channels)
        full_ms, small_ms = self._ms(m, in_hw, [(m.in_channels, m.out_channels), small])
        return max((full_ms - small_ms) / k, 1e-6)

    def save(self) -> None:
        if self.cache is not None:
            write_json(self.cache, self.table)

    # ------------------------------------------------------------------------------------ timing

    def _ms(self, m: _ConvNd, in_hw: tuple[int, ...], widths: list[tuple[int, int]]) -> list[float]:
        """Median ms of `m`'s shape at each (in, out) width; the uncached ones are timed interleaved, run by
        run, so a load that comes and goes on the machine shifts all of them alike, not their difference."""
        keys = [self._key(m, in_hw, cin, cout) for cin, cout in widths]
        todo = [(key, w) for key, w in zip(keys, widths, strict=True) if key not in self.table]
        if todo:
            calls = [self._callable(m, in_hw, cin, cout) for _, (cin, cout) in todo]
            times = time_interleaved(calls, runs=self.runs, warmup=2)
            self.table.update({key: t for (key, _), t in zip(todo, times, strict=True)})
        return [self.table[key] for key in keys]

    def _key(self, m: _ConvNd, in_hw: tuple[int, ...], cin: int, cout: int) -> str:
        return json.dumps(
            [type(m).__name__, cin, cout, m.kernel_size, m.stride, m.padding, m.dilation, _groups(m, cin, cout),
             list(in_hw), self.backend, self.threads],
        )  # fmt: skip

    def _callable(self, m: _ConvNd, in_hw: tuple[int, ...], cin: int, cout: int) -> Callable[[], object]:
        probe = _conv_like(m, cin, cout, _groups(m, cin, cout)).eval()
        x = torch.randn(1, cin, *in_hw)
        if self.backend == "torch":

            def run_torch() -> object:
                with torch.no_grad():
                    return probe(x)

            return run_torch
        from polyprune.export import ort_session

        buf = io.BytesIO()
        torch.onnx.export(probe, (x,), buf, dynamo=False, opset_version=17)
        sess = ort_session(buf.getvalue(), self.threads)
        feed = {sess.get_inputs()[0].name: x.numpy()}
        return lambda: sess.run(None, feed)


def _groups(m: _ConvNd, cin: int, cout: int) -> int:
    depthwise = m.groups > 1 and m.groups == m.in_channels
    groups = cin if depthwise else m.groups
    return 1 if cin % groups or cout % groups else groups


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
