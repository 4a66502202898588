"""Model registry (re-exported by `polyprune.models`): `build_model(name, **cfg)` builds any registered family from plain JSON-able config.

A model family registers itself with `@register_model("name")`. Every registered class must offer
`config() -> dict` that returns the JSON-able arguments rebuilding the module *as it is now*
(after physical pruning too), so `build_model(**model.config())` gives the same shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from polyprune.errors import ConfigError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        _REGISTRY[name] = cls
        return cls

    return deco


MAX_WIDTH = 8192  # channels of one conv: far above any segmentation net, far below a memory bomb
MAX_IO_CHANNELS = 64


def check_channels(family: str, in_channels: Any, out_channels: Any) -> None:
    """Input and output channels are small positive ints (model files come from users)."""
    for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_IO_CHANNELS:
            raise ConfigError(f"{family}: {name} must be an int in 1..{MAX_IO_CHANNELS}, got {v!r}")


def merge_widths(family: str, defaults: dict[str, int], widths: dict[str, Any] | None) -> dict[str, int]:
    """The unpruned `defaults` overridden by `widths` (a pruned config): known keys, ints in 1..MAX_WIDTH."""
    w = dict(defaults)
    if not widths:
        return w
    if not isinstance(widths, dict):
        raise ConfigError(f"{family}: widths must be a mapping of layer name to channels")
    unknown = sorted(set(widths) - set(w))
    if unknown:
        raise ConfigError(f"unknown {family} width keys: {unknown[:5]}")
    for k, v in widths.items():
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_WIDTH:
            raise ConfigError(f"{family}: width {k} must be an int in 1..{MAX_WIDTH}, got {v!r}")
        w[k] = v
    return w


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def build_model(name: str, **cfg: Any) -> nn.Module:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    try:
        return _REGISTRY[name](**cfg)
    except TypeError as exc:  # unexpected or missing config keys
        raise ConfigError(f"bad config for model {name!r}: {exc}") from exc
