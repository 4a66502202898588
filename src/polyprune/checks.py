"""Option checks shared by every entry point: one rule, one place, one ConfigError naming the value.

The library checks its own arguments (the Python API gets the same answers as the CLI); messages name
the option as the config field (`lr`, `threads`), which is also the CLI flag with dashes.
"""

from __future__ import annotations

import math
from typing import Any

from polyprune.errors import ConfigError

MAX_SEED = 2**31 - 1  # numpy, torch and Python's random all take it; seed * 100_003 + epoch stays in int64


MAX_SIZE = 4096  # px, for options and model files alike (io.MAX_INPUT_SIZE)


def check_size(size: Any, stride: int = 16) -> int:
    """A model input size must be a positive multiple of `stride` (the model's downsampling); return it."""
    if (
        isinstance(size, bool)
        or not isinstance(size, int | float)
        or int(size) != size
        or size <= 0
        or size % stride
    ):
        raise ConfigError(f"size must be a positive multiple of {stride}, got {size}")
    if size > MAX_SIZE:
        raise ConfigError(f"size must be at most {MAX_SIZE} px, got {size}")
    return int(size)


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real number within [low, high] (`*_open`: that end excluded); return it."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        where = f" in {lo or '(-inf'}, {hi or 'inf)'}" if lo or hi else ""
        raise ConfigError(f"{name} must be a finite number{where}, got {value!r}")
    return float(value)


def check_int(name: str, value: Any, *, low: int = 0, high: int | None = None) -> int:
    """An int within [low, high]; return it."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        span = f"{low}..{high}" if high is not None else f">= {low}"
        raise ConfigError(f"{name} must be an int {span}, got {value!r}")
    return value


def check_seed(seed: Any) -> int:
    return check_int("seed", seed, low=0, high=MAX_SEED)


def check_threads(threads: Any) -> int | None:
    """None (the default: all cores) or an int >= 1."""
    return None if threads is None else check_int("threads", threads, low=1, high=1024)


def check_choice(name: str, value: Any, choices: tuple[str, ...] | list[str]) -> str:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value
