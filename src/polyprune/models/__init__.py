"""Model families and their registry: `build_model(name, **cfg)` builds any registered family from
plain JSON-able config (see `registry`). Importing this package registers every family."""

from __future__ import annotations

from polyprune.models import efficientnet_lite, mobilenetv2, unet
from polyprune.models.registry import (
    MAX_IO_CHANNELS,
    MAX_WIDTH,
    build_model,
    check_channels,
    list_models,
    merge_widths,
    register_model,
)

__all__ = [
    "MAX_IO_CHANNELS",
    "MAX_WIDTH",
    "build_model",
    "check_channels",
    "efficientnet_lite",
    "list_models",
    "merge_widths",
    "mobilenetv2",
    "register_model",
    "unet",
]
