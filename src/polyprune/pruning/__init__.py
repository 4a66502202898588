"""Filter pruning: importance criteria, physical removal through coupled groups, iterative schedule.

from polyprune.pruning import prune_model
result = prune_model(model, torch.randn(1, 3, 256, 256), loader, "taylor-gradnorm", {"macs": 0.25})
"""

from __future__ import annotations

from polyprune.pruning.engine import prune_model
from polyprune.pruning.importance import CRITERIA, compute_importance
from polyprune.pruning.layers import find_layers
from polyprune.pruning.result import PruneResult
from polyprune.structure import layer_widths, replay_pruning_history

__all__ = [
    "CRITERIA",
    "PruneResult",
    "compute_importance",
    "find_layers",
    "layer_widths",
    "prune_model",
    "replay_pruning_history",
]
