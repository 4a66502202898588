"""trajectory.json: a prune run's record (parent, config, one row per step, the final model, the fine-tuning
budget spent) and the decisions read from it: when a target is reached, what the next step aims for,
when no further step is possible."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from polyprune.errors import ConfigError, TargetError
from polyprune.pruning.config import PruneConfig
from polyprune.pruning.session import PruneSession
from polyprune.structure import layer_widths


def new_trajectory(run: PruneSession) -> dict[str, Any]:
    cfg = run.cfg
    parent_row = {"step": 0, "filters_removed": 0, **run.measure(run.parent)}
    d0 = run.dice(run.parent)
    parent_row.update(
        val_dice_before_finetune=d0, val_dice_after_finetune=d0, val_dice=d0, widths=layer_widths(run.parent)
    )
    return {
        "parent": {
            "path": run.parent_path,
            "arch": run.meta.arch,
            "params": parent_row["params"],
            "macs": parent_row["macs"],
            "latency_ms": parent_row["latency_ms"],
            "val_dice": d0,
            "size": run.size,
        },
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("resume", "overwrite", "progress")},
        "options": {
            k: getattr(cfg, k)
            for k in (
                "reduce",
                "signal",
                "n_images",
                "scope",
                "round_to",
                "min_channels",
                "group_reduce",
                "steps",
                "seed",
            )
        },
        "split_seed": run.split_seed,
        "finetune": {
            "epochs": cfg.finetune_epochs,
            "iters": cfg.finetune_iters,
            "final_epochs": cfg.final_epochs,
            "budget": cfg.finetune_budget,
            "parent_steps": run.parent_steps(),
            "lr": cfg.lr,
            "batch": cfg.batch,
            "loss": cfg.loss,
        },
        "steps": [parent_row],
        "state": "pruning",  # pruning -> final -> done
        "final_step": None,
        "final": None,
    }


def target_reached(cfg: PruneConfig, traj: dict[str, Any], row: dict[str, Any]) -> bool:
    p = traj["parent"]
    if cfg.target_params is not None:
        return row["params"] <= cfg.target_params * p["params"]
    if cfg.target_macs is not None:
        return row["macs"] <= cfg.target_macs * p["macs"]
    if cfg.target_fps is not None:
        return 1000.0 / row["latency_ms"] >= cfg.target_fps
    return False  # max_dice_drop: prune until the budget is spent


def step_target(cfg: PruneConfig, traj: dict[str, Any], current: dict[str, Any]) -> dict[str, float]:
    """This step's target for prune_model: step_ratio of the remaining filters, never past the final target;
    with `steps` K, step i keeps target**(i/K) of the parent's params / MACs (the last step: the target)."""
    p = traj["parent"]
    if cfg.steps is not None:
        key = "params" if cfg.target_params is not None else "macs"
        goal = (cfg.target_params if key == "params" else cfg.target_macs) or 1.0
        share = goal ** (min(current["step"] + 1, cfg.steps) / cfg.steps)
        return {key: min(1.0, share * p[key] / current[key])}
    target: dict[str, float] = {}
    if not cfg.one_shot:
        target["ratio"] = cfg.step_ratio
    if cfg.target_params is not None:
        target["params"] = min(1.0, cfg.target_params * p["params"] / current["params"])
    elif cfg.target_macs is not None:
        target["macs"] = min(1.0, cfg.target_macs * p["macs"] / current["macs"])
    elif cfg.one_shot:
        target["ratio"] = cfg.step_ratio  # fps / Dice targets step without fine-tuning
    return target


def final_iters(cfg: PruneConfig, traj: dict[str, Any]) -> int | None:
    """--finetune-budget F: the final fine-tune's optimizer steps, F x the parent's training steps."""
    if cfg.finetune_budget is None:
        return None
    parent_steps = traj["finetune"].get("parent_steps")
    if not parent_steps:
        raise ConfigError(
            f"--finetune-budget needs the parent's training length, which {cfg.model} does not record "
            "(epochs, n_train, batch): use --final-epochs"
        )
    return max(1, round(cfg.finetune_budget * parent_steps))


def budget_spent(traj: dict[str, Any], final_steps: int) -> dict[str, Any]:
    """Optimizer steps of all fine-tuning (every step's and the final one), also as a share of the parent's."""
    total = sum(int(r.get("finetune_steps", 0)) for r in traj["steps"]) + final_steps
    parent = traj["finetune"].get("parent_steps")
    return {
        "parent_steps": parent,
        "finetune_steps": total,
        "final_steps": final_steps,
        "fraction_of_parent": total / parent if parent else None,
    }


def stop_or_fail(cfg: PruneConfig, traj: dict[str, Any], prev: dict[str, Any], why: str) -> None:
    """No further step is possible: a Dice budget ends at the last step; any other target was missed."""
    if cfg.max_dice_drop is not None:
        traj.update(state="final", final_step=prev["step"])
        return
    if cfg.target_fps is not None:
        fps = 1000.0 / prev["latency_ms"]
        raise TargetError(
            f"--target-fps {cfg.target_fps:g} cannot be met: best {fps:.1f} fps at step {prev['step']} ({why})"
        )
    raise TargetError(f"pruning target not met after step {prev['step']}: {why}")
