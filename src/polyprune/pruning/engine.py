"""Physical filter removal: coupled groups (torch-pruning DependencyGraph), ranking, widths, replay.

A *group* is everything that must lose the same channels together: a conv's out-channels, its
BatchNorm, the in-channels of every consumer (the next conv, and the decoder conv that receives the
skip concat, at the concat's offset) and any conv added element-wise to it. torch-pruning 1.6 traces
those couplings; we choose the channels ourselves, so every rule below is exact:

    group score     S_g[c] = reduce_{conv l in g} I_l[c]           group_reduce: sum (default) | mean | max
    ranking         scope="global": all channels of all groups, ascending S_g[c];
                    scope="uniform": each group loses the same fraction of its channels
    widths          keep_g in {C_g} U {k * round_to : min_channels <= k * round_to < C_g}, the value
                    nearest to the ranking's wish (ties keep more): widths stay multiples of round_to
                    and never drop below min_channels
    search          the smallest k (channels taken off the ranking) whose pruned model meets the
                    target: {"ratio": r} removes r of the prunable filters (as many as the widths allow
                    if fewer); {"params": f} / {"macs": f} keep at most f of the current params / MACs
                    (TargetError if out of reach). Several keys: the first one met wins.

Groups that reach the network output (the head) and groups of `ignored_layers` are never pruned.
The pruned model is the same plain nn.Module, pruned in place; `history` lists (layer, removed
out-channel indices) so `replay_pruning_history` rebuilds the shapes on a fresh unpruned module.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from polyprune import distributed as dist_utils
from polyprune.counting import count_macs, count_params
from polyprune.errors import ConfigError, TargetError
from polyprune.pruning.groups import PruneGroup, group_costs, group_scores, prunable_groups
from polyprune.pruning.importance import (
    DATA_CRITERIA,
    PRUNER_CRITERIA,
    LossFn,
    check_criterion,
    compute_importance,
    find_layers,
)
from polyprune.pruning.metapruner import (
    METAPRUNER_ROUND_TO,
    check_metapruner_options,
    prune_with_metapruner,
)
from polyprune.pruning.result import PruneResult
from polyprune.structure import build_graph, layer_widths

SCOPES = ("global", "uniform")
COSTS = ("none", "macs", "params", "latency")
GROUP_REDUCES = ("sum", "mean", "max")
TARGET_KEYS = ("ratio", "params", "macs")


# ------------------------------------------------------------------------------------------ helpers


def _macs_at(model: nn.Module, example_input: torch.Tensor) -> int:
    """MACs at batch 1 and the example input's (C, H, W)."""
    c, h, w = example_input.shape[1:]
    return count_macs(model, (h, w), in_channels=c)


def default_round_to(criterion: str) -> int:
    """8 (SIMD-friendly widths) for polyprune's criteria; torch-pruning's own default for MetaPruner."""
    return METAPRUNER_ROUND_TO if criterion in PRUNER_CRITERIA else 8


def allowed_width(size: int, wish: float, min_channels: int, round_to: int) -> int:
    """The allowed width nearest to `wish` (ties keep more): the full width or a multiple of round_to."""
    allowed = [size] + [v for v in range(round_to, size, round_to) if v >= min_channels]
    return min(allowed, key=lambda v: (abs(v - wish), -v))


class _Planner:
    """Maps k (channels taken off the ranking) to the channel indices each group removes; monotone in k."""

    def __init__(
        self,
        groups: list[PruneGroup],
        gscores: list[torch.Tensor | None],
        scope: str,
        min_channels: int,
        round_to: int,
    ) -> None:
        self.groups, self.scope = groups, scope
        self.min_channels, self.round_to = min_channels, round_to
        self.active = [i for i, s in enumerate(gscores) if s is not None]
        # within-group order, lowest score first; stable sort: ties fall to the lower index, deterministically
        self.order = {i: torch.sort(gscores[i], stable=True).indices.tolist() for i in self.active}  # type: ignore[arg-type]
        self.total = sum(groups[i].size for i in self.active)
        if scope == "global" and self.active:
            flat = torch.cat([gscores[i] for i in self.active])  # type: ignore[misc]
            owner = torch.cat([torch.full((groups[i].size,), i) for i in self.active])
            self.global_owner = owner[torch.sort(flat, stable=True).indices].tolist()

    def plan(self, k: int) -> dict[int, list[int]]:
        if self.scope == "global" and self.active:
            wish: dict[int, int] = dict.fromkeys(self.active, 0)
            for i in self.global_owner[:k]:
                wish[i] += 1
        else:
            r = k / max(1, self.total)
            wish = {i: round(r * self.groups[i].size) for i in self.active}
        out = {}
        for i, n in wish.items():
            size = self.groups[i].size
            step = math.lcm(self.round_to, self.groups[i].round_to)
            keep = allowed_width(size, size - n, max(self.min_channels, self.groups[i].round_to), step)
            if keep < size:
                out[i] = sorted(self.order[i][: size - keep])
        return out

    def removed(self, k: int) -> int:
        return sum(len(v) for v in self.plan(k).values())


def _apply(
    model: nn.Module, dg: tp.DependencyGraph, groups: list[PruneGroup], plan: dict[int, list[int]]
) -> list[list[Any]]:
    history = []
    for i in sorted(plan):
        root = model.get_submodule(groups[i].root)
        pruner = dg.get_pruner_of_module(root)
        group = dg.get_pruning_group(root, pruner.prune_out_channels, plan[i])
        if not dg.check_pruning_group(group):  # cannot happen with min width >= 1; guards tp changes
            raise TargetError(f"pruning {groups[i].root} would remove every channel of a coupled layer")
        group.prune(record_history=False)
        history.append([groups[i].root, [int(c) for c in plan[i]]])
    return history


def _parse_target(target: dict[str, float] | None) -> dict[str, float]:
    if not target:
        raise ConfigError(
            'prune_model needs a target, e.g. {"macs": 0.25}, {"params": 0.5} or {"ratio": 0.1}'
        )
    unknown = set(target) - set(TARGET_KEYS)
    if unknown:
        raise ConfigError(f"unknown target key(s) {sorted(unknown)}; use {', '.join(TARGET_KEYS)}")
    for key, v in target.items():
        if key == "ratio" and not 0 <= v < 1:
            raise ConfigError(f"target ratio must be in [0, 1), got {v}")
        if key != "ratio" and not 0 < v <= 1:
            raise ConfigError(f"target {key} must be a fraction in (0, 1], got {v}")
    return dict(target)


def _check_options(
    criterion: str, scope: str, group_reduce: str, min_channels: int, round_to: int, cost: str = "none"
) -> None:
    check_criterion(criterion)
    if scope not in SCOPES:
        raise ConfigError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if cost not in COSTS:
        raise ConfigError(f"cost must be one of {', '.join(COSTS)}, got {cost!r}")
    if group_reduce not in GROUP_REDUCES:
        raise ConfigError(f"group_reduce must be one of {', '.join(GROUP_REDUCES)}, got {group_reduce!r}")
    if min_channels < 1:
        raise ConfigError(f"min_channels must be >= 1, got {min_channels}")
    if round_to < 1:
        raise ConfigError(f"round_to must be >= 1 (1 disables rounding), got {round_to}")


# ------------------------------------------------------------------------------------------ public


class _TargetSearch:
    """The smallest k (channels taken off the ranking) whose pruned model meets the targets; met(k) is
    monotone in k, so a binary search over k, with (params, MACs) measured on pruned copies."""

    def __init__(
        self,
        model: nn.Module,
        example_input: torch.Tensor,
        groups: list[PruneGroup],
        planner: _Planner,
        targets: dict[str, float],
        params0: int,
        macs0: int,
    ) -> None:
        self.model, self.example_input, self.groups, self.planner = model, example_input, groups, planner
        self.targets, self.params0, self.macs0 = targets, params0, macs0
        self._cache: dict[int, tuple[int, int]] = {}

    def metrics(self, k: int) -> tuple[int, int]:
        """(params, MACs) of the model pruned with plan(k), measured on a copy."""
        if k not in self._cache:
            trial = copy.deepcopy(self.model)
            _apply(trial, build_graph(trial, self.example_input), self.groups, self.planner.plan(k))
            self._cache[k] = (count_params(trial), _macs_at(trial, self.example_input))
        return self._cache[k]

    def met(self, k: int) -> bool:
        t, planner = self.targets, self.planner
        if "ratio" in t and planner.removed(k) >= math.ceil(t["ratio"] * planner.total - 1e-9):
            return True
        if "params" in t or "macs" in t:
            params, macs = self.metrics(k)
            if "params" in t and params <= t["params"] * self.params0:
                return True
            if "macs" in t and macs <= t["macs"] * self.macs0:
                return True
        return False

    def smallest_k(self, min_channels: int, round_to: int) -> int:
        k_max, planner = self.planner.total, self.planner
        if set(self.targets) == {"ratio"} and not self.met(k_max) and planner.removed(k_max) > 0:
            lo = k_max  # a ratio is a step size: widths may cap it, then as much as they allow
        elif not self.met(k_max):
            params, macs = self.metrics(k_max)
            best = {
                "ratio": f"{planner.removed(k_max) / max(1, planner.total):.3f}",
                "params": f"{params / self.params0:.3f}",
                "macs": f"{macs / self.macs0:.3f}",
            }
            wanted = ", ".join(f"{k} {v:g} (best reachable {best[k]})" for k, v in self.targets.items())
            raise TargetError(
                f"target {wanted} cannot be met with min_channels={min_channels}, round_to={round_to}"
            )
        else:
            lo = 0
        hi = k_max
        while lo < hi:
            mid = (lo + hi) // 2
            if self.met(mid):
                hi = mid
            else:
                lo = mid + 1
        return lo


def prune_model(
    model: nn.Module,
    example_input: torch.Tensor,
    calibration_loader: Iterable[Any] | None = None,
    criterion: str = "taylor-gradnorm",
    target: dict[str, float] | None = None,
    *,
    reduce: str = "abs",
    signal: str = "loss",
    loss_fn: LossFn | None = None,
    n_images: int = 64,
    ignored_layers: Iterable[nn.Module | str] | None = None,
    min_channels: int = 4,
    round_to: int | None = None,
    scope: str = "global",
    group_reduce: str = "sum",
    cost: str = "none",
    latency: Any = None,
    seed: int = 0,
) -> PruneResult:
    """Score, rank and physically remove filters of `model` (in place) until `target` is met.

    `example_input` (any batch size; its shape sets the MACs) traces the graph. The data-driven
    criteria (taylor-gradnorm, taylor) read `n_images` from `calibration_loader`, which yields
    (image, mask) batches (image-only batches work with signal="random"). Raises TargetError when the
    target cannot be met within min_channels / round_to (default 8); the model is then left unchanged.

    `cost` "macs" / "params": a group's scores are divided by what removing one of its channels saves
    (`group_costs`), so the global ranking removes the least output change per MAC (or param) saved
    (the idea of HALP, Shen et al. 2022, with MACs for latency); "latency": per ms saved, measured per
    conv by `latency` (a `layer_latency.LayerLatency`; default: torch on this machine); "none" is the
    paper's plain ranking.

    `criterion` "tp-taylor" / "tp-magnitude": torch-pruning's MetaPruner chooses and removes the channels
    (metapruner.py; global ranking, `round_to`, default 1 there; `min_channels`, `scope`, `group_reduce` and `cost` are
    polyprune's and do not apply). On a TargetError it may leave the model partly pruned.
    """
    targets = _parse_target(target)
    round_to = default_round_to(criterion) if round_to is None else round_to
    _check_options(criterion, scope, group_reduce, min_channels, round_to, cost)
    if criterion in PRUNER_CRITERIA:
        check_metapruner_options(criterion, scope, group_reduce, cost)
        return prune_with_metapruner(
            model, example_input, calibration_loader, criterion, targets, loss_fn=loss_fn, n_images=n_images,
            ignored_layers=ignored_layers, round_to=round_to,
        )  # fmt: skip
    if criterion in DATA_CRITERIA and calibration_loader is None:
        raise ConfigError(f"criterion {criterion!r} needs calibration images (calibration_loader)")
    example_input = example_input.to(next(model.parameters()).device)
    options = {
        "reduce": reduce,
        "signal": signal,
        "n_images": n_images,
        "min_channels": min_channels,
        "round_to": round_to,
        "scope": scope,
        "group_reduce": group_reduce,
        "cost": cost,
        "seed": seed,
        "target": targets,
    }
    widths_before = layer_widths(model)
    params0, macs0 = count_params(model), _macs_at(model, example_input)
    dg = build_graph(model, example_input)
    groups = prunable_groups(model, dg, ignored_layers)
    member_names = {name for g in groups for name, _, _ in g.members}
    all_layers = find_layers(model, example_input)
    scores = compute_importance(
        model,
        criterion,
        calibration_loader,
        layers={n: all_layers[n] for n in sorted(member_names)},
        reduce=reduce,
        signal=signal,
        loss_fn=loss_fn,
        n_images=n_images,
        seed=seed,
    )
    gscores = group_scores(groups, scores, group_reduce)
    if cost != "none":
        if cost == "latency" and latency is None:
            from polyprune.pruning.layer_latency import LayerLatency

            latency = LayerLatency("torch")
        costs = group_costs(model, dg, groups, example_input, cost, latency)
        if cost == "latency":  # timings differ between processes: every rank ranks by rank 0's
            costs = dist_utils.broadcast_object(costs)
        gscores = [None if sc is None else sc / c for sc, c in zip(gscores, costs, strict=True)]
    planner = _Planner(groups, gscores, scope, min_channels, round_to)
    lo = _TargetSearch(model, example_input, groups, planner, targets, params0, macs0).smallest_k(
        min_channels, round_to
    )
    plan = planner.plan(lo)
    history = _apply(model, dg, groups, plan)
    # the module carries its own history, so save_model records it and load_model can replay it
    model.polyprune_pruning_history = [*getattr(model, "polyprune_pruning_history", []), *history]
    removed = {groups[i].root: len(idxs) for i, idxs in plan.items()}
    return PruneResult(
        model=model,
        history=history,
        removed=removed,
        widths_before=widths_before,
        widths_after=layer_widths(model),
        params_before=params0,
        params_after=count_params(model),
        macs_before=macs0,
        macs_after=_macs_at(model, example_input),
        criterion=criterion,
        options=options,
    )
