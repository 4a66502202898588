"""Resumable training state: weights, optimizer state, best weights and the loop state (JSON in the
metadata) in one safetensors file, written atomically; never a pickle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polyprune.errors import ModelFileError
from polyprune.io import save_tensors

# ------------------------------------------------------------------------------------- checkpoint


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for key, v in meta.get("scalars", {}).items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    path: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    best: dict[str, torch.Tensor] | None,
    loop: dict[str, Any],
    ema: dict[str, torch.Tensor] | None = None,
) -> None:
    """One safetensors file: weights, optimizer tensors, best weights, the weight average (`ema`, if
    training keeps one); loop state as JSON metadata."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _flatten_optimizer(opt)
    tensors.update(opt_tensors)
    if best is not None:
        tensors.update({f"best.{k}": v for k, v in best.items()})
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.items()})
    save_tensors(path, tensors, metadata={"loop": json.dumps(loop), "optimizer": json.dumps(opt_meta)})


def load_checkpoint(
    path: Path, model: nn.Module, opt: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
    """(loop state, best weights, weight average): `model` and `opt` are loaded in place."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:  # a checkpoint of another run (other --width / --size) or a damaged file: one line, no traceback
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(path))
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        _unflatten_optimizer(opt, tensors, json.loads(meta["optimizer"]))
        best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} or None
        ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")} or None
        return json.loads(meta["loop"]), best, ema
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        why = lines[1] if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else repr(exc))
        raise ModelFileError(
            f"cannot resume from {path} ({why[:160]}); it belongs to another run or is damaged: "
            "delete it or drop --resume"
        ) from exc
