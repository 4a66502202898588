"""`PruneResult`: what one prune_model call removed, and the model's size before and after."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class PruneResult:
    model: nn.Module
    history: list[list[Any]]  # [[layer name, [removed out-channel idxs]], ...] in the order applied
    removed: dict[str, int]  # root layer -> filters removed
    widths_before: dict[str, int]
    widths_after: dict[str, int]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    criterion: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def filters_removed(self) -> int:
        return sum(self.removed.values())

    def summary(self) -> dict[str, Any]:
        """JSON-able record of this call (no model)."""
        return {
            "criterion": self.criterion,
            "options": self.options,
            "filters_removed": self.filters_removed,
            "params": [self.params_before, self.params_after],
            "macs": [self.macs_before, self.macs_after],
            "widths": self.widths_after,
        }
