"""Model registry: `build_model(name, **cfg)` builds any registered family from plain JSON-able config.

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


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def build_model(name: str, **cfg: Any) -> nn.Module:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    try:
        return _REGISTRY[name](**cfg)
    except TypeError as exc:  # unexpected or missing config keys
        raise ConfigError(f"bad config for model {name!r}: {exc}") from exc


from polyprune.models import unet as _unet  # noqa: E402,F401  (registers "unet")
