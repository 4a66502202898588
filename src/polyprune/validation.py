"""Validation during training: mean per-image Dice at threshold 0.5 at the model's input size (an image
with empty ground truth and empty prediction scores 1), sharded over ranks under torchrun."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from polyprune import distributed as dist_utils
from polyprune.device import autocast, resolve_device, resolve_precision


def dice_per_image(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice at threshold 0.5 for each image of a batch; empty GT and empty prediction -> 1."""
    pred = (logits.float() > 0).flatten(1).float()
    t = (target > 0.5).flatten(1).float()
    inter = (pred * t).sum(1)
    denom = pred.sum(1) + t.sum(1)
    return torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.ones_like(denom))


@torch.no_grad()
def batch_logits(
    model: nn.Module, ds: Dataset, *, batch: int, device: torch.device, precision: str
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, masks) per batch of `ds` on `device`, the model in eval mode (restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        for x, y in DataLoader(ds, batch_size=batch, shuffle=False):
            x, y = x.to(device), y.to(device)
            if device.type == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                logits = model(x)
            yield logits, y
    finally:
        model.train(was_training)


@torch.no_grad()
def validation_dice(
    model: nn.Module,
    val_ds: Dataset,
    *,
    batch: int = 8,
    device: str | torch.device = "auto",
    precision: str = "auto",
) -> float:
    """Mean per-image Dice@0.5 over `val_ds` (sharded over ranks under torchrun)."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    prec = resolve_precision(precision, dev)
    n = len(val_ds)
    if n == 0:
        return float("nan")
    shard = Subset(val_ds, list(range(dist_utils.rank(), n, dist_utils.world_size())))
    total = torch.zeros(2, dtype=torch.float64, device=dev)
    for logits, y in batch_logits(model, shard, batch=batch, device=dev, precision=prec):
        d = dice_per_image(logits, y)
        total[0] += d.sum().double()
        total[1] += d.numel()
    dist_utils.all_reduce_sum(total)
    return float(total[0] / total[1])
