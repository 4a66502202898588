"""Training losses: BCE + soft Dice (default), PraNet's structure loss, and distillation to a teacher."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

from polyprune.errors import ConfigError


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = (2 * (prob * t).sum(1) + 1) / (prob.sum(1) + t.sum(1) + 1)
    return bce + (1 - dice).mean()


def structure_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PraNet's loss: boundary-weighted BCE + weighted IoU (weights 1 + 5 |avgpool31(mask) - mask|)."""
    weit = 1 + 5 * torch.abs(F.avg_pool2d(target, 31, stride=1, padding=15) - target)
    wbce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    wbce = (weit * wbce).sum((2, 3)) / weit.sum((2, 3))
    prob = torch.sigmoid(logits)
    inter = (prob * target * weit).sum((2, 3))
    union = ((prob + target) * weit).sum((2, 3))
    wiou = 1 - (inter + 1) / (union - inter + 1)
    return (wbce + wiou).mean()


def distillation_loss(
    logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Pixel-wise BCE of the student to the teacher's probabilities at temperature T, times T^2 (so the
    gradient scale does not shrink with T, as in Hinton et al. 2015). Zero gradient where they agree;
    equal logits give the teacher's own entropy, the minimum over student logits."""
    t = temperature
    target = torch.sigmoid(teacher_logits / t)
    return F.binary_cross_entropy_with_logits(logits / t, target) * t * t


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "bce-dice": bce_dice_loss,
    "structure": structure_loss,
}


def make_loss(name: str = "bce-dice") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
    return LOSSES[name]
