"""Counting: params, MACs, and the memory a training step needs.

MACs are counted by `torch.utils.flop_counter.FlopCounterMode` (maintained in torch) as FLOPs / 2 of
conv, transposed conv and matmul ops, at batch 1. That is the number a hand count gives (for a conv:
C_out * C_in/groups * k_h * k_w * H_out * W_out); BN, ReLU, pooling and interpolation are not counted
(torch-pruning's `count_ops_and_params` counts them and reports about 14 % more on a UNet).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from polyprune.errors import ConfigError


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


@torch.no_grad()
def training_memory_bytes(model: nn.Module, size: int, batch: int) -> int:
    """A rough peak of one training step: every leaf module's output kept for backward (fp32) x batch,
    plus weights, gradients and AdamW's two moments. Works on a meta-device model (nothing allocated)."""
    total = 0

    def hook(_m: nn.Module, _i: Any, out: Any) -> None:
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel()

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    device = next(model.parameters()).device
    was_training = model.training
    try:
        model.eval()
        model(torch.zeros(1, 3, size, size, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total * 4 * batch + count_params(model) * 4 * 4


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux); None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_training_memory(model: nn.Module, size: int, batch: int) -> int:
    """ConfigError if a training step at `size` x `batch` would not fit in the memory left (estimate)."""
    need, avail = training_memory_bytes(model, size, batch), available_memory_bytes()
    if avail is not None and need > 0.9 * avail:
        raise ConfigError(
            f"training at size {size} with batch {batch} needs about {need / 2**30:.1f} GiB, more than the "
            f"{avail / 2**30:.1f} GiB of memory available: lower --size, --batch or the model's width"
        )
    return need
