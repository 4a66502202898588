"""The prunable layers of a model: every conv / ConvTranspose, paired with the BatchNorm that directly
consumes its output (whose output is then the feature map A_c that the Taylor criteria read)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd


@dataclass
class Layer:
    """A prunable conv and the module whose output is its feature map (its BatchNorm, or itself)."""

    name: str
    conv: _ConvNd
    norm: _BatchNorm | None = None

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    @property
    def feature_module(self) -> nn.Module:
        return self.norm if self.norm is not None else self.conv


def find_layers(model: nn.Module, example_input: torch.Tensor) -> dict[str, Layer]:
    """Every conv / ConvTranspose of `model`, paired with the BatchNorm that directly consumes its output.

    Found by one forward pass: a BatchNorm follows a conv when its input IS the conv's output tensor.
    """
    names = {m: n for n, m in model.named_modules()}
    convs = {n: m for n, m in model.named_modules() if isinstance(m, _ConvNd)}
    outputs: list[tuple[torch.Tensor, str]] = []
    norms: dict[str, _BatchNorm] = {}

    def conv_hook(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        outputs.append((out, names[mod]))

    def bn_pre_hook(mod: nn.Module, inp: tuple) -> None:
        for tensor, conv_name in outputs:
            if inp[0] is tensor and conv_name not in norms:
                norms[conv_name] = mod  # type: ignore[assignment]

    handles = [m.register_forward_hook(conv_hook) for m in convs.values()]
    handles += [
        m.register_forward_pre_hook(bn_pre_hook) for m in model.modules() if isinstance(m, _BatchNorm)
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input.to(model_device(model)))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {n: Layer(n, c, norms.get(n)) for n, c in convs.items()}


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
