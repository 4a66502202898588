"""The physical structure of a (pruned) network: conv widths, torch-pruning's dependency graph, and
the replay of a recorded pruning history on a fresh unpruned module.

A model file of a network outside the registry stores the history (layer, removed out-channel
indices, in the order applied); `io.load_model` replays it on the user's unpruned module before the
weights load. This sits below the model file format and above nothing but torch-pruning, so the
format does not depend on the pruning algorithm (`pruning.engine` records what it removed).

The replay is ours, not torch-pruning's `DependencyGraph.load_pruning_history`: that one prunes
whatever the entries say, while a model file comes from a user, so every entry is checked first (the
layer exists, is prunable, has the channels named) and a bad one is a ModelFileError. It reads
torch-pruning's own history format too ([layer, is_out_channels, idxs]) and prunes through its graph.
"""

from __future__ import annotations

from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.modules.conv import _ConvNd

from polyprune.errors import ModelFileError


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Out-channels of every conv / ConvTranspose, by module name."""
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, _ConvNd)}


def build_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """torch-pruning's DependencyGraph, traced in eval mode (no BatchNorm statistics change)."""
    was_training = model.training
    try:
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)
    finally:
        model.train(was_training)  # tp's tracer leaves the model in eval mode
    return dg


def replay_pruning_history(
    model: nn.Module,
    history: list[list[Any]],
    input_size: int | tuple[int, int],
    in_channels: int | None = None,
) -> nn.Module:
    """Redo recorded pruning on the unpruned `model` (in place): entries [layer, idxs] (or tp's [layer, True, idxs])."""
    if in_channels is None:
        first = next((m for m in model.modules() if isinstance(m, _ConvNd)), None)
        if first is None:
            raise ModelFileError("cannot replay a pruning history on a model without convolutions")
        in_channels = first.in_channels
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    example = torch.randn(1, in_channels, h, w, device=next(model.parameters()).device)
    dg = build_graph(model, example)
    for entry in history:
        name, idxs = entry[0], entry[-1]
        if len(entry) == 3 and not entry[1]:
            raise ModelFileError(
                f"pruning history entry for {name!r} prunes in-channels; only out-channels replay"
            )
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise ModelFileError(
                f"pruning history names layer {name!r}, which base_model does not have"
            ) from exc
        pruner = dg.get_pruner_of_module(module)
        if pruner is None or module not in dg.module2node:
            raise ModelFileError(
                f"pruning history names layer {name!r}, which cannot be pruned in base_model"
            )
        if max(idxs, default=-1) >= pruner.get_out_channels(module):
            raise ModelFileError(f"pruning history does not fit base_model: {name!r} has too few channels")
        dg.get_pruning_group(module, pruner.prune_out_channels, list(idxs)).prune(record_history=False)
    return model
