"""Test-time augmentation: run a model on flipped / turned copies of one input and average the logits.

    views = make_views(x, "hflip")          # (3, S, S) -> (V, 3, S, S): the input and its mirror
    logits = merge_views(model(views), "hflip")   # (V, S, S) -> (S, S): each view undone, then the mean

Modes (the views are the dihedral symmetries the training augmentation already covers: flips and
90-degree turns, `polyprune.data.build_augment`):
* `none`: the input alone (1 view).
* `hflip`: + its left-right mirror (2 views: twice the inference time).
* `flips`: + the up-down mirror and both (4 views).
* `d4`: all 8 flips and 90-degree turns (8 views).

Logits, not probabilities, are averaged (as ttach's "mean" on a segmentation model's raw output). A
view costs one full forward pass, so a mode with V views divides the frame rate by V: for the
offline evaluation of a model, not for a video-rate deployment.
"""

from __future__ import annotations

import numpy as np

from polyprune.errors import ConfigError

# (quarter turns k of np.rot90 over (H, W), then mirror left-right) for each view; view 0 is the input
TTA_VIEWS: dict[str, tuple[tuple[int, bool], ...]] = {
    "none": ((0, False),),
    "hflip": ((0, False), (0, True)),
    "flips": ((0, False), (0, True), (2, False), (2, True)),  # a half turn + mirror = the up-down mirror
    "d4": tuple((k, mirror) for k in range(4) for mirror in (False, True)),
}


def check_tta(mode: str) -> str:
    """`mode` if it names a TTA mode, else a one-line ConfigError naming the choices."""
    if mode not in TTA_VIEWS:
        raise ConfigError(f"unknown TTA mode {mode!r}; choose from {', '.join(TTA_VIEWS)}")
    return mode


def make_views(x: np.ndarray, mode: str) -> np.ndarray:
    """(C, S, S) preprocessed input -> (V, C, S, S) float32: the views of `mode`, view 0 the input."""
    views = []
    for k, mirror in TTA_VIEWS[check_tta(mode)]:
        v = np.rot90(x, k, axes=(1, 2))
        views.append(v[:, :, ::-1] if mirror else v)
    return np.ascontiguousarray(np.stack(views), dtype=np.float32)


def merge_views(logits: np.ndarray, mode: str) -> np.ndarray:
    """(V, S, S) logits of `make_views(x, mode)` -> (S, S) float32: each view turned back, then the mean."""
    spec = TTA_VIEWS[check_tta(mode)]
    if len(logits) != len(spec):
        raise ValueError(f"{mode} has {len(spec)} views, got {len(logits)} logit maps")
    back = []
    for (k, mirror), lg in zip(spec, logits, strict=True):
        lg = lg[:, ::-1] if mirror else lg  # undo in reverse order: mirror first, then the turn
        back.append(np.rot90(lg, -k))
    return np.mean(back, axis=0, dtype=np.float32)
