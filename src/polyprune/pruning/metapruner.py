"""criterion="tp-taylor" | "tp-magnitude": torch-pruning's own MetaPruner, the field's reference pruner, as a
baseline that runs through the same schedule, fine-tuning and model files as polyprune's criteria.

torch-pruning 1.6 is driven as its README and its `reproduce/main.py` do:

    imp    = GroupTaylorImportance()          # tp-taylor (reads .grad: the loss is backpropagated first)
           | MagnitudeImportance(p=2)         # tp-magnitude
    pruner = MetaPruner(model, example, importance=imp, global_pruning=True, pruning_ratio=1.0,
                        iterative_steps=N, round_to=round_to, ignored_layers=[the head, ...])
    while not target met: pruner.step()       # reproduce/main.py::progressive_pruning

tp-taylor's gradient is the training loss summed over the first `n_images` calibration images, with the
model in eval mode (BatchNorm statistics untouched), backpropagated once per call; torch-pruning prunes
.grad with the weights, so the progressive steps of one call rank on that gradient. The targets are
polyprune's ({"macs": f}, {"params": f}, {"ratio": r}; the first met wins), MACs counted by
polyprune.counting, so a MetaPruner row and a polyprune row are cut to the same measure. Only the
registry's models: their files record widths, which is all a reload needs (MetaPruner keeps no
channel-index history in polyprune's format).

`round_to` defaults to 1 here (torch-pruning's own default, None), not polyprune's 8: MetaPruner rounds a
layer's kept width DOWN to the multiple (`_round_to`: 16 - 1 -> 8), so one channel under its global threshold
takes a 16-wide layer to 8 in one step. Measured on the zoo MobileNetV2-UNet at 50 % MACs in two steps: with
round_to=8 the second step halved the 16-wide stem and last decoder level, validation Dice fell to 0.000 and
500 fine-tuning steps did not bring it back. polyprune's planner rounds to the nearest allowed width instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from polyprune.counting import count_macs, count_params
from polyprune.errors import ConfigError, TargetError
from polyprune.pruning.importance import LossFn
from polyprune.pruning.result import PruneResult
from polyprune.structure import layer_widths

METAPRUNER_ROUND_TO = 1  # torch-pruning's default (None): see the module docstring


def check_metapruner_options(criterion: str, scope: str, group_reduce: str, cost: str) -> None:
    """MetaPruner ranks globally by its own group scores: polyprune's ranking options do not apply."""
    if (scope, group_reduce, cost) != ("global", "sum", "none"):
        raise ConfigError(
            f"--criterion {criterion} is torch-pruning's MetaPruner, which ranks globally by its own group "
            "scores: --scope, --group-reduce and --cost apply to polyprune's criteria only"
        )


def prune_with_metapruner(
    model: nn.Module,
    example_input: torch.Tensor,
    calibration_loader: Iterable[Any] | None,
    criterion: str,
    targets: dict[str, float],
    *,
    loss_fn: LossFn | None,
    n_images: int,
    ignored_layers: Iterable[nn.Module | str] | None,
    round_to: int,
    iterative_steps: int = 200,
) -> PruneResult:
    """prune_model for criteria tp-taylor / tp-magnitude (in place): MetaPruner steps until one of polyprune's
    targets is met. TargetError when all `iterative_steps` leave them unmet (the model is then partly
    pruned: callers prune a copy or stop)."""
    example_input = example_input.to(next(model.parameters()).device)
    ignored = output_layers(model, criterion) + [
        model.get_submodule(m) if isinstance(m, str) else m for m in (ignored_layers or [])
    ]
    if criterion == "tp-taylor":
        if calibration_loader is None or loss_fn is None:
            raise ConfigError("criterion tp-taylor needs calibration images and a loss")
        _loss_gradients(model, calibration_loader, loss_fn, n_images)
    c, h, w = example_input.shape[1:]
    widths_before, params0 = layer_widths(model), count_params(model)
    macs0, filters0 = count_macs(model, (h, w), in_channels=c), _filters(model, ignored)

    def met() -> bool:
        if "ratio" in targets and filters0 - _filters(model, ignored) >= math.ceil(
            targets["ratio"] * filters0 - 1e-9
        ):
            return True
        if "params" in targets and count_params(model) <= targets["params"] * params0:
            return True
        return "macs" in targets and count_macs(model, (h, w), in_channels=c) <= targets["macs"] * macs0

    was_training, steps = model.training, 0
    try:
        pruner = _metapruner(model, example_input, criterion, round_to, ignored, iterative_steps)
        while not met() and pruner.current_step < pruner.iterative_steps:
            pruner.step()
            steps += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)  # torch-pruning traces in eval mode
    if not met():
        raise TargetError(f"torch-pruning's MetaPruner left target {targets} unmet after {steps} steps")
    widths_after = layer_widths(model)
    return PruneResult(
        model=model,
        history=[],  # the registry's model files record widths; MetaPruner keeps no index history
        removed={k: widths_before[k] - v for k, v in widths_after.items() if widths_before[k] > v},
        widths_before=widths_before,
        widths_after=widths_after,
        params_before=params0,
        params_after=count_params(model),
        macs_before=macs0,
        macs_after=count_macs(model, (h, w), in_channels=c),
        criterion=criterion,
        options={"round_to": round_to, "n_images": n_images, "target": targets, "metapruner_steps": steps},
    )


def _metapruner(
    model: nn.Module,
    example_input: torch.Tensor,
    criterion: str,
    round_to: int,
    ignored: list[nn.Module],
    iterative_steps: int,
) -> Any:
    importance = (
        tp.importance.GroupTaylorImportance()
        if criterion == "tp-taylor"
        else tp.importance.MagnitudeImportance(p=2)
    )
    return tp.pruner.MetaPruner(
        model,
        example_input,
        importance=importance,
        global_pruning=True,
        pruning_ratio=1.0,
        iterative_steps=iterative_steps,
        round_to=round_to,
        ignored_layers=ignored,
    )


def output_layers(model: nn.Module, criterion: str) -> list[nn.Module]:
    """The head (the registry's output conv), which torch-pruning must never prune."""
    head = getattr(model, "head", None)
    if not hasattr(model, "config") or not isinstance(head, nn.Module):
        raise ConfigError(
            f"criterion {criterion} prunes the registry's models only (their files record widths; the head stays)"
        )
    return [head]


def _filters(model: nn.Module, ignored: list[nn.Module]) -> int:
    """Out-channels of every conv outside `ignored`: what MetaPruner can remove."""
    skip = {name for name, m in model.named_modules() for i in ignored if m is i}
    return sum(w for name, w in layer_widths(model).items() if name not in skip)


def _loss_gradients(model: nn.Module, calibration: Iterable[Any], loss_fn: LossFn, n_images: int) -> None:
    """.grad = d(sum of the per-batch mean losses)/dW over the first n_images, in eval mode."""
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    seen = 0
    with torch.enable_grad():
        for x, y in calibration:
            take = min(len(x), n_images - seen)
            loss_fn(model(x[:take].to(device)), y[:take].to(device)).backward()
            seen += take
            if seen >= n_images:
                break
    model.train(was_training)
