"""Where and how training runs: seeding, device, precision (bf16 autocast where it pays), threads."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from polyprune import distributed as dist_utils
from polyprune.checks import check_threads
from polyprune.errors import ConfigError

# ----------------------------------------------------------------------------------------- set-up


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA device is available")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' means bf16 autocast on CUDA, fp32 on CPU (bf16 on CPU is faster but opt-in)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"--precision must be auto, fp32 or bf16, got {precision!r}")
    return precision


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def set_threads(threads: int | None) -> None:
    """Default: all cores, shared out among the processes torchrun started on this machine."""
    check_threads(threads)
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // dist_utils.local_world_size()))
