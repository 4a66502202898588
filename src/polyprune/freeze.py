"""Frozen layers: weights and BatchNorm statistics that training must leave exactly as they are.

`prune --ignore encoder --freeze encoder` fine-tunes a pruned decoder while the ImageNet encoder stays
the parent's to the bit: its weights get no gradient step (nor weight decay: they are not in the
optimizer) and its BatchNorm layers run in eval mode, so their running statistics do not move and
the forward pass in training is the one used at test time. Gradients still flow through a frozen layer
to trainable layers before it; a frozen prefix of the network (an encoder) needs no backward pass at
all, which makes each fine-tuning step cheaper.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn

from polyprune.errors import ConfigError


def check_layer_names(model: nn.Module, names: Iterable[str], option: str) -> None:
    """A ConfigError naming `option` for the first name that is no layer of `model`."""
    for name in names:
        try:
            model.get_submodule(name)
        except AttributeError:
            top = ", ".join(n for n, _ in model.named_children())
            raise ConfigError(
                f"{option} {name!r}: this model has no such layer (its top-level layers: {top}; "
                "deeper ones as dotted names, e.g. encoder.features.0)"
            ) from None


class FrozenLayers:
    """Named layers of `model` whose parameters get no gradient until `thaw()`; `keep_in_eval()` after
    every `model.train()` (BatchNorm then uses, and keeps, its running statistics)."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        check_layer_names(model, names, "--freeze")
        self.layers = [model.get_submodule(n) for n in names]
        # only what trained before: thaw() must not wake parameters the caller had frozen itself
        self.params = [p for layer in self.layers for p in layer.parameters() if p.requires_grad]
        for p in self.params:
            p.requires_grad_(False)

    def keep_in_eval(self) -> None:
        for layer in self.layers:
            layer.eval()

    def thaw(self) -> None:
        """Undo the freeze (importance scores of a later pruning step need these gradients)."""
        for p in self.params:
            p.requires_grad_(True)
        self.params = []
