"""How each method makes its model: one prune round (polyprune or torch-pruning), or a uniform-width UNet.

polyprune (our engine): `prune_model(model, example, calibration, criterion, {"macs": f})` with the
library defaults: global ranking over coupled groups, group score = sum, widths multiples of 8
(round_to=8), min_channels=4; the head's group is never pruned. It stops at the smallest number of
removed filters whose model is at or below the MACs target.

torch-pruning 1.6.1, driven as its README and its `reproduce/main.py` do:
    imp    = GroupTaylorImportance()              # tp-taylor (needs .grad: loss.backward() first)
           | MagnitudeImportance(p=2)             # tp-magnitude
    pruner = MetaPruner(model, example, importance=imp, global_pruning=True, pruning_ratio=1.0,
                        iterative_steps=N, round_to=8, ignored_layers=[model.head])
    while MACs(model) > target: pruner.step()     # reproduce/main.py::progressive_pruning
The gradient for GroupTaylorImportance is the training loss (bce-dice) summed over the same
calibration images our data-driven criteria see, backpropagated once per prune round with the model
in eval mode (BatchNorm statistics untouched); torch-pruning prunes .grad with the weights, so the
progressive steps of one round rank on that gradient. Global ranking and round_to=8 make its widths
as latency-friendly as ours (same rounding), so the latency comparison is fair. MACs are counted with
polyprune.counting (torch's FlopCounterMode), not tp.utils.count_ops_and_params, for every method.

MACs targets are checked on a small example input (4 x the stride): every conv's MACs scale with its
output H x W, so MACs ratios are exact at any input size, and the search is ~9x cheaper than at 192 px.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from grid import Method
from polyprune.counting import count_macs
from polyprune.errors import TargetError
from polyprune.models import build_model
from polyprune.pruning import layer_widths, prune_model
from polyprune.pruning.importance import DATA_CRITERIA

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ROUND_TO = 8
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


# -------------------------------------------------------------------------------------- polyprune


def prune_polyprune(
    model: nn.Module,
    method: Method,
    target: dict[str, float],
    calibration: Iterable[Any],
    loss_fn: LossFn,
    n_images: int,
    seed: int,
) -> dict[str, Any]:
    """One prune_model call in place; `target` is {"macs": fraction of the CURRENT model} or {"ratio": r}."""
    result = prune_model(
        model,
        example_input(model),
        calibration if method.criterion in DATA_CRITERIA else None,
        method.criterion,
        target,
        reduce=method.reduce,
        signal=method.signal,
        loss_fn=loss_fn,
        n_images=n_images,
        min_channels=MIN_CHANNELS,
        round_to=ROUND_TO,
        scope="global",
        group_reduce="sum",
        seed=seed,
    )
    return {"filters_removed": result.filters_removed}


def check_reachable(parent: nn.Module, method: Method, target: float) -> None:
    """TargetError if no ranking reaches `target` of the parent's MACs within the width limits.

    Reach depends on the widths only, not on the scores (bn-scale: on which groups have a BatchNorm).
    """
    crit = "bn-scale" if method.criterion == "bn-scale" else "l1"
    prune_model(
        fresh_copy(parent),
        example_input(parent),
        None,
        crit,
        {"macs": target},
        min_channels=MIN_CHANNELS,
        round_to=ROUND_TO,
        scope="global",
    )


# ---------------------------------------------------------------------------------- torch-pruning


def taylor_gradients(model: nn.Module, calibration: Iterable[Any], loss_fn: LossFn, n_images: int) -> None:
    """Fill .grad with d(sum of the per-batch mean losses)/dW over the first n_images (eval mode)."""
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    seen = 0
    with torch.enable_grad():
        for x, y in calibration:
            take = min(len(x), n_images - seen)
            loss_fn(model(x[:take]), y[:take]).backward()
            seen += take
            if seen >= n_images:
                break
    model.train(was_training)


def _tp_pruner(model: nn.Module, method: Method, pruning_ratio: float, iterative_steps: int) -> Any:
    imp = (
        tp.importance.GroupTaylorImportance()
        if method.criterion == "taylor"
        else tp.importance.MagnitudeImportance(p=2)
    )
    return tp.pruner.MetaPruner(
        model,
        example_input(model),
        importance=imp,
        global_pruning=True,
        pruning_ratio=pruning_ratio,
        iterative_steps=iterative_steps,
        round_to=ROUND_TO,
        ignored_layers=[model.head],
    )


def prune_torch_pruning(
    model: nn.Module,
    method: Method,
    macs_fraction: float,
    calibration: Iterable[Any],
    loss_fn: LossFn,
    n_images: int,
    iterative_steps: int,
) -> dict[str, Any]:
    """Progressive MetaPruner steps until MACs <= macs_fraction x the current model's (in place)."""
    filters0, macs0 = prunable_filters(model), small_macs(model)
    if method.criterion == "taylor":
        taylor_gradients(model, calibration, loss_fn, n_images)
    was_training = model.training
    pruner = _tp_pruner(model, method, 1.0, iterative_steps)
    steps = 0
    try:
        while small_macs(model) > macs_fraction * macs0 and pruner.current_step < pruner.iterative_steps:
            pruner.step()
            steps += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)  # tp traces in eval mode
    reached = small_macs(model) / macs0
    if reached > macs_fraction + 1e-9:
        raise TargetError(
            f"torch-pruning reached {reached:.3f} of the MACs after {steps} steps, not {macs_fraction:.3f}"
        )
    return {"filters_removed": filters0 - prunable_filters(model), "tp_steps": steps}


def oneshot_torch_pruning(
    model: nn.Module, method: Method, ratio: float, calibration: Iterable[Any], loss_fn: LossFn, n_images: int
) -> None:
    """MetaPruner(pruning_ratio=ratio) and one step(), as in torch-pruning's README (in place)."""
    if method.criterion == "taylor":
        taylor_gradients(model, calibration, loss_fn, n_images)
    was_training = model.training
    try:
        _tp_pruner(model, method, ratio, 1).step()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


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
