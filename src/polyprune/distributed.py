"""torch.distributed glue for torchrun: gloo on CPU, nccl on GPU, chosen automatically.

`torchrun --nproc_per_node=K -m polyprune train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; `setup()` then
joins the process group once. Everything else asks `world_size()` / `rank()` and stays single-process
when they are 1 / 0. Every helper here is a no-op (or the identity) without a process group.

What crosses ranks:
  all_reduce_sum            validation Dice sums, the "loss is finite" vote, importance scores
  broadcast_object          rank 0's latency measurements and resume state (one decision for all)
  broadcast_buffers         BatchNorm running statistics after training (rank 0's are kept)
  assert_same_across_ranks  layer widths after every pruning step: a loud error on any mismatch

Debugging: with POLYPRUNE_RECORD_CHECKS=DIR every rank appends what it passed to
`assert_same_across_ranks` to DIR/checks_rank<R>.jsonl (the tests compare those files).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from polyprune.errors import PolypruneError


class DistributedMismatchError(PolypruneError):
    """Ranks disagree on something that must be identical (e.g. the layer widths after pruning)."""


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def local_world_size() -> int:
    """Processes on this machine (torchrun's LOCAL_WORLD_SIZE; 1 outside torchrun)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def setup(device: str = "auto") -> bool:
    """Join the process group if launched by torchrun (WORLD_SIZE > 1); a no-op otherwise.

    nccl when this process will use CUDA (device auto or cuda*, and CUDA available), gloo otherwise.
    Returns True if this call created the group (then the caller owns `teardown`).
    """
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    use_cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def teardown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """Under torchrun a bare `cuda` becomes this process's GPU, cuda:LOCAL_RANK."""
    if device.type == "cuda" and device.index is None and is_distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _uses_nccl() -> bool:
    return is_distributed() and dist.get_backend() == "nccl"


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (identity when not distributed). CPU tensors work on nccl too."""
    if not is_distributed():
        return t
    if _uses_nccl() and t.device.type != "cuda":
        tmp = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(tmp, op=dist.ReduceOp.SUM)
        t.copy_(tmp.cpu())
    else:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_sum_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum every tensor of a dict over ranks in one collective (keys must match on all ranks)."""
    if not is_distributed() or not tensors:
        return tensors
    keys = sorted(tensors)
    flat = torch.cat([tensors[k].reshape(-1) for k in keys])
    all_reduce_sum(flat)
    out, i = {}, 0
    for k in keys:
        n = tensors[k].numel()
        out[k] = flat[i : i + n].view_as(tensors[k]).to(tensors[k].dtype)
        i += n
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (picklable objects; identity when not distributed)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts buffers at the start of each forward, so after the last training step every rank
    holds statistics updated by its own last batch; this makes the models identical again.
    """
    if not is_distributed():
        return
    for buf in model.buffers():
        if _uses_nccl() and buf.device.type != "cuda":
            tmp = buf.to(torch.device("cuda", torch.cuda.current_device()))
            dist.broadcast(tmp, src=src)
            buf.copy_(tmp.cpu())
        else:
            dist.broadcast(buf, src=src)


def _differences(ref: Any, other: Any) -> str:
    """Short text naming what differs: dict keys (layers) with both values, or both values."""
    if isinstance(ref, dict) and isinstance(other, dict):
        diffs = [
            f"{k}: {ref.get(k, '<missing>')} vs {other.get(k, '<missing>')}"
            for k in sorted(set(ref) | set(other), key=str)
            if ref.get(k, _MISSING) != other.get(k, _MISSING)
        ]
        more = f" (+{len(diffs) - 8} more)" if len(diffs) > 8 else ""
        return ", ".join(diffs[:8]) + more
    return f"{ref!r} vs {other!r}"


_MISSING = object()


def _record(obj: Any, what: str) -> None:
    folder = os.environ.get("POLYPRUNE_RECORD_CHECKS")
    if not folder:
        return
    path = Path(folder) / f"checks_rank{rank()}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps({"what": what, "rank": rank(), "value": obj}, default=str) + "\n")


def assert_same_across_ranks(obj: Any, what: str) -> None:
    """Raise DistributedMismatchError on EVERY rank unless `obj` is equal on all ranks.

    `obj` must be picklable and comparable with ==; for a dict (e.g. layer -> width) the message names
    the ranks and the keys that differ from rank 0, e.g.
    "layer widths after step 2 differ across ranks: rank 1 vs rank 0: enc1.conv2: 16 vs 24".
    """
    _record(obj, what)
    if not is_distributed():
        return
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    ref = gathered[0]
    bad = [(r, o) for r, o in enumerate(gathered) if r and o != ref]
    if bad:
        detail = "; ".join(f"rank {r} vs rank 0: {_differences(ref, o)}" for r, o in bad)
        raise DistributedMismatchError(
            f"{what} differ across ranks ({len(bad)} of {world_size()} ranks disagree with rank 0): {detail}"
        )


def barrier() -> None:
    if is_distributed():
        if _uses_nccl():
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()
