"""torch.distributed glue for torchrun: gloo on CPU, nccl on GPU, chosen automatically.

`torchrun --nproc_per_node=K -m polyprune train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; `setup()` then
joins the process group once. Everything else asks `world_size()` / `rank()` and stays single-process
when they are 1 / 0.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def setup(device: str = "auto") -> None:
    """Join the process group if launched by torchrun (WORLD_SIZE > 1); a no-op otherwise."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)


def teardown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (identity when not distributed)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if is_distributed():
        dist.barrier()
