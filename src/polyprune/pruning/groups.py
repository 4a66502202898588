"""Pruning groups: everything that must lose the same channels together (a conv, its BatchNorm, its
consumers, anything added to it), from torch-pruning's dependency graph; their scores (importance
reduced over the group) and costs (MACs / params one channel saves). See engine.py for the rules."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.modules.conv import _ConvNd


@dataclass
class PruneGroup:
    """One coupled group, named by its root conv; `members` are the convs whose out-channels it removes."""

    root: str
    size: int
    members: list[tuple[str, list[int], list[int]]]  # (conv name, its channel idxs, matching root idxs)
    round_to: int = 1  # widths must also be multiples of this (the num_groups of a GroupNorm in the group)


def _touches_output(dg: tp.DependencyGraph, group: Any) -> bool:
    """True if pruning the group would change the network's output channels (the head's group)."""
    return any(dg.is_out_channel_pruning_fn(dep.handler) and not dep.target.outputs for dep, _ in group)


def prunable_groups(
    model: nn.Module, dg: tp.DependencyGraph, ignored_layers: Iterable[nn.Module | str] | None = None
) -> list[PruneGroup]:
    """Every conv-rooted group except the head's and those holding an ignored layer, in graph order."""
    names = {m: n for n, m in model.named_modules()}
    ignored = [model.get_submodule(x) if isinstance(x, str) else x for x in (ignored_layers or [])]
    ignored = [sub for m in ignored for sub in m.modules()]  # a block means all its layers
    groups = []
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=(_ConvNd,)):
        if _touches_output(dg, group):
            continue
        members, group_round = [], 1
        root = group[0].dep.target.module
        size = dg.get_out_channels(root)
        broadcast = []
        for item in group:
            mod = item.dep.target.module
            if isinstance(mod, nn.GroupNorm):  # its channel count must stay a multiple of num_groups
                group_round = math.lcm(group_round, mod.num_groups)
            if isinstance(mod, _ConvNd) and dg.is_out_channel_pruning_fn(item.dep.handler):
                if mod.out_channels != size:
                    broadcast.append(names[mod])
                members.append((names[mod], list(item.idxs), list(item.root_idxs)))
        if broadcast:
            # e.g. a 1-channel attention map multiplied into a C-channel tensor: torch-pruning couples
            # them element-wise, which no channel choice can honour. Those convs stay as they are.
            warnings.warn(
                f"not pruning {', '.join(sorted({names[root], *broadcast}))}: their outputs meet in a "
                "broadcast (a channel count differs), so they cannot lose channels together",
                UserWarning,
                stacklevel=2,
            )
            continue
        groups.append(PruneGroup(names[root], size, members, group_round))
    return groups


def group_scores(
    groups: list[PruneGroup], scores: dict[str, torch.Tensor], reduce: str
) -> list[torch.Tensor | None]:
    """S_g per root channel; None for a group none of whose convs has a score (it is not pruned)."""
    out: list[torch.Tensor | None] = []
    for g in groups:
        rows = []
        for name, idxs, root_idxs in g.members:
            if name not in scores:
                continue
            row = torch.zeros(g.size, dtype=torch.float64)
            row[torch.tensor(root_idxs)] = scores[name].double()[torch.tensor(idxs)]
            rows.append(row)
        if not rows:
            out.append(None)
            continue
        stack = torch.stack(rows)
        out.append(
            stack.sum(0) if reduce == "sum" else stack.mean(0) if reduce == "mean" else stack.max(0).values
        )
    return out


def group_costs(
    model: nn.Module,
    dg: tp.DependencyGraph,
    groups: list[PruneGroup],
    example_input: torch.Tensor,
    cost: str,
    latency: Any = None,
) -> list[float]:
    """What removing ONE channel of each group saves: MACs (at the example input's size), params, or
    measured ms (`latency`: a `layer_latency.LayerLatency`), summed over every conv whose out- or
    in-channels the group touches. MACs and params are exact for convs and transposed convs (a depthwise
    conv counted once); BatchNorm / bias terms are left out (<1 %)."""
    shapes: dict[nn.Module, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def hook(m: nn.Module, inp: Any, out: Any) -> None:
        shapes[m] = (tuple(inp[0].shape), tuple(out.shape))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _ConvNd)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()

    def per_channel(m: _ConvNd, side: str) -> float:
        k = math.prod(m.kernel_size)
        depthwise = m.groups > 1 and m.groups == m.in_channels
        if side == "in" and depthwise:
            return 0.0  # the same channel as its out side, counted there
        other = m.in_channels if side == "out" else m.out_channels
        weights = k * other / m.groups
        if cost == "params":
            return float(weights)
        (_, _, *hw_in), (_, _, *hw_out) = shapes.get(m, ((0, 0, 0, 0), (0, 0, 0, 0)))
        if cost == "latency":
            return latency.saving_per_channel(m, tuple(hw_in), side) if hw_in else 0.0
        transposed = isinstance(m, nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d)
        return float(weights * math.prod(hw_in if transposed else hw_out))

    out: list[float] = []
    for g in groups:
        root = model.get_submodule(g.root)
        items = dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, [0])
        total = 0.0
        for item in items:
            mod = item.dep.target.module
            if isinstance(mod, _ConvNd):
                side = "out" if dg.is_out_channel_pruning_fn(item.dep.handler) else "in"
                total += per_channel(mod, side)
        out.append(max(total, 1e-12))
    return out
