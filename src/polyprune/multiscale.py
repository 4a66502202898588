"""Multi-scale training (PraNet's recipe: rates 0.75, 1, 1.25): every optimizer step trains its batch at one
of `scales` x the data's size, rounded to the model's stride, the scale drawn from (seed, step) alone, so
the same seed gives the same sizes and a resumed run continues them. Images are resized bilinearly;
masks bilinearly, then thresholded at 0.5 so they stay binary."""

from __future__ import annotations

import torch
from torch.nn import functional as F


class MultiScale:
    """Multi-scale training: step `step`'s batch at scales[k] x its size, k drawn from (seed, step)."""

    def __init__(self, scales: tuple[float, ...], stride: int, seed: int) -> None:
        self.scales, self.stride, self.seed = tuple(scales), stride, seed

    def size_at(self, hw: tuple[int, int], step: int) -> tuple[int, int]:
        k = int(
            torch.randint(
                len(self.scales), (1,), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            )
        )
        s = self.scales[k]
        return tuple(max(self.stride, round(v * s / self.stride) * self.stride) for v in hw)  # type: ignore[return-value]

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.size_at((x.shape[-2], x.shape[-1]), step)
        if size == tuple(x.shape[-2:]):
            return x, y
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        y = (F.interpolate(y, size=size, mode="bilinear", align_corners=False) > 0.5).to(y.dtype)
        return x, y
