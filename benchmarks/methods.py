"""How the harness makes a method's model, beside `polyprune prune` (which makes every pruned cell):
one-shot pruning for the curves, and the uniform-width model of the same family.

Every pruning method, torch-pruning's MetaPruner included (criteria tp-taylor / tp-magnitude, see
polyprune/pruning/metapruner.py), runs through polyprune's own code: cells through
`polyprune.pruning.prune_run` (run.prune_config), one-shot curves through `prune_model` with
{"ratio": r}. Library defaults: global ranking over coupled groups, group score = sum, widths
multiples of 8 (round_to=8; MetaPruner: 1, its own default), min_channels=4; the head is never pruned.

MACs ratios are computed on a small example input (4 x the stride): every conv's MACs scale with its
output H x W, so the ratios are exact at any input size, and the search is ~9x cheaper than at 352 px.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from grid import Method
from polyprune.counting import count_macs
from polyprune.models import build_model
from polyprune.pruning import layer_widths, prune_model
from polyprune.pruning.importance import DATA_CRITERIA

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MIN_CHANNELS = 4


def example_input(model: nn.Module) -> torch.Tensor:
    s = 4 * int(getattr(model, "stride", 16))
    return torch.zeros(1, 3, s, s)


def small_macs(model: nn.Module) -> int:
    """MACs at the small example size (for ratios only)."""
    return count_macs(model, example_input(model).shape[-1])


def prunable_filters(model: nn.Module) -> int:
    """Out-channels of every conv except the head: the filters a criterion can remove."""
    return sum(w for name, w in layer_widths(model).items() if name != "head")


# --------------------------------------------------------------------------------------- one-shot


def prune_oneshot(
    model: nn.Module,
    method: Method,
    ratio: float,
    calibration: Iterable[Any],
    loss_fn: LossFn,
    n_images: int,
) -> None:
    """One prune_model call in place removing `ratio` of the prunable filters, no fine-tuning."""
    prune_model(
        model,
        example_input(model),
        calibration if method.criterion in DATA_CRITERIA else None,
        method.criterion,
        {"ratio": ratio},
        reduce=method.reduce,
        signal=method.signal,
        loss_fn=loss_fn,
        n_images=n_images,
        min_channels=MIN_CHANNELS,
        round_to=method.round_to,  # None: the library's default for the criterion
        cost=method.cost,
        seed=0,
    )


# ------------------------------------------------------------------------------------ uniform width


def uniform_config(parent: nn.Module, target: float) -> tuple[dict[str, Any], float]:
    """UNet config with every parent width times one factor s (rounded, >= 1), MACs nearest `target`.

    Widths are any integer (not multiples of 8): that is what matches the MACs within ~1 %. Returns the
    build_model kwargs (name included) and the MACs as a fraction of the parent's. Build the model
    after seeding: the search builds (and initializes) many throw-away models.
    """
    cfg = dict(parent.config())
    base = dict(cfg["widths"])
    ref = small_macs(parent)

    def config(s: float) -> dict[str, Any]:
        return {**cfg, "widths": {k: max(1, round(v * s)) for k, v in base.items()}}

    def frac(s: float) -> float:
        c = config(s)
        return small_macs(build_model(c.pop("name"), **c)) / ref

    lo, hi = 0.01, 1.0  # frac(lo) < target <= frac(hi); frac is non-decreasing in s
    for _ in range(20):
        mid = (lo + hi) / 2
        if frac(mid) >= target:
            hi = mid
        else:
            lo = mid
    best = min((lo, hi), key=lambda s: abs(frac(s) - target))
    return config(best), frac(best)


def fresh_copy(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model)
    m.zero_grad(set_to_none=True)
    return m
