"""polyprune: real-time polyp segmentation through Taylor filter pruning.

The public API is small on purpose:

    from polyprune import build_model, load_model, save_model, prune_model, Predictor
"""

from __future__ import annotations

import os
from typing import Any

__version__ = "0.1.0"
MAX_IMAGE_PIXELS = 2**26  # 64 Mpx (8192 x 8192): 7x a 4K frame; a 30000 x 30000 PNG is refused, not decoded
# OpenCV reads this when cv2 is first imported (every polyprune module imports cv2 after this one)
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_IMAGE_PIXELS))

_LAZY = {
    "build_model": "polyprune.models",
    "list_models": "polyprune.models",
    "load_model": "polyprune.io",
    "save_model": "polyprune.io",
    "read_metadata": "polyprune.io",
    "InputSpec": "polyprune.io",
    "PolypruneError": "polyprune.errors",
    "prune_model": "polyprune.pruning",
    "Predictor": "polyprune.predictor",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:  # lazy: `import polyprune` stays fast for the CLI
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'polyprune' has no attribute {name!r}")
