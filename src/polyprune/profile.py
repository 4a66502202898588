"""Counting and timing: params, MACs, latency.

MACs are counted by `torch.utils.flop_counter.FlopCounterMode` (maintained in torch) as FLOPs / 2 of
conv, transposed conv and matmul ops, at batch 1. That is the number a hand count gives (for a conv:
C_out * C_in/groups * k_h * k_w * H_out * W_out); BN, ReLU, pooling and interpolation are not counted
(torch-pruning's `count_ops_and_params` counts them and reports about 14 % more on a UNet).

Latency: batch 1, warm-up runs first, then `runs` timed runs; median, p90 and min in milliseconds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, size: int | tuple[int, int], in_channels: int = 3) -> int:
    """Multiply-accumulates of one forward pass at batch 1 and the given input size."""
    h, w = (size, size) if isinstance(size, int) else size
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, in_channels, h, w, device=device))
    model.train(was_training)
    return int(counter.get_total_flops() // 2)


@dataclass
class Latency:
    median_ms: float
    p90_ms: float
    min_ms: float
    runs: int

    @property
    def fps(self) -> float:
        return 1000.0 / self.median_ms if self.median_ms > 0 else float("inf")

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "fps": self.fps}


def time_callable(fn: Callable[[], object], *, runs: int = 20, warmup: int = 3) -> Latency:
    """Median / p90 / min wall time of `fn()` over `runs` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    times.sort()
    p90 = times[min(len(times) - 1, round(0.9 * (len(times) - 1)))]
    return Latency(median_ms=statistics.median(times), p90_ms=p90, min_ms=times[0], runs=runs)


def torch_latency(
    model: nn.Module, size: int, *, runs: int = 20, warmup: int = 3, threads: int | None = None
) -> Latency:
    """Eager torch latency at batch 1 (eval, inference mode) on the model's device."""
    if threads:
        torch.set_num_threads(threads)
    device = next(model.parameters()).device
    model.eval()
    x = torch.randn(1, 3, size, size, device=device)

    def run() -> None:
        with torch.inference_mode():
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return time_callable(run, runs=runs, warmup=warmup)
