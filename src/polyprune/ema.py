"""Exponential moving average of the weights (YOLO's and timm's ModelEmaV2 habit): validation, model
selection and the saved model use the average, which is smoother than the last step's weights and
usually a little better on held-out images.

torch's `AveragedModel` does the averaging (parameters and BatchNorm buffers, `use_buffers=True`). The
decay ramps up as TF's `ExponentialMovingAverage(num_updates=...)` does, d_n = min(decay, (1 + n) / (10 + n)),
so the first epochs are not dominated by the random decoder of step 0. Integer buffers
(`num_batches_tracked`) follow the model. Resume: `state()` / `load_state()` go into the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from polyprune.checks import check_number


def ema_decay_at(decay: float, n_averaged: int) -> float:
    """The decay used for the update after `n_averaged` earlier updates (warm-up ramp, then `decay`)."""
    return min(decay, (1 + n_averaged) / (10 + n_averaged))


def _ramped_ema(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], None]:
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        d = ema_decay_at(decay, int(n_averaged))
        if ema_params and ema_params[0].is_floating_point():
            torch._foreach_lerp_(ema_params, params, 1.0 - d)
        else:
            for e, p in zip(ema_params, params, strict=True):
                e.copy_(p)

    return update


class WeightEMA:
    """An EMA copy of `model` (`.module`), updated by `update(model)` after every optimizer step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        check_number("ema", decay, low=0, low_open=True, high=1, high_open=True)
        self.decay = decay
        self.averaged = AveragedModel(model, multi_avg_fn=_ramped_ema(decay), use_buffers=True)

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    @property
    def updates(self) -> int:
        return int(self.averaged.n_averaged)

    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)

    def state(self) -> dict[str, torch.Tensor]:
        """The average's weights and buffers plus its update count (for the checkpoint)."""
        return {**self.module.state_dict(), "n_averaged": self.averaged.n_averaged.detach().clone()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        self.averaged.n_averaged.copy_(state.pop("n_averaged"))
        self.module.load_state_dict(state)
