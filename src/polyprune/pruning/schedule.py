"""`polyprune prune`: iterative prune -> fine-tune to a target, with a trajectory and resume.

    step i:  score filters on the calibration images (n_images of the training split, no augmentation)
             remove step_ratio of the REMAINING filters (global ranking, widths rounded, see engine.py)
             -- for params / MACs targets a step never goes past the target: it stops exactly there
             fine-tune (finetune_epochs or finetune_iters); keep the better of pruned / fine-tuned by val Dice
             measure params, MACs, latency (batch 1, `size`, backend), val Dice; append to trajectory.json
    until    target_params / target_macs: params / MACs <= fraction * parent's
             target_fps: measured fps >= F
             max_dice_drop D: a step's val Dice < parent - D; the result is then the last step within D
    then     final_epochs of fine-tuning (with resume) and RUN/model.safetensors

`one_shot` prunes straight to a params / MACs target in one step without fine-tuning (for fps and Dice
targets: the same steps, without fine-tuning); final_epochs still applies.

RUN/ holds trajectory.json (atomic, rewritten after every step), steps/step_NNN.safetensors (one model
per completed step), checkpoint/ (the final fine-tune's resume state) and model.safetensors. A killed
run restarted with resume=True continues after its last completed step.

Under torchrun (K processes) every rank runs the same schedule on identical models: importance is
scored on each rank's share of the calibration images and all-reduced (see importance.py), so every
rank removes the same filters; fine-tuning is DDP (train.fit wraps the pruned model anew each time);
validation Dice is all-reduced; latency is measured on rank 0 and broadcast, so every rank takes the
same decisions. After every step `assert_same_across_ranks` compares the layer widths and fails
loudly on any mismatch. Only rank 0 writes RUN/; the other ranks read step files after a barrier
(several nodes: RUN/ must be on a filesystem all nodes share, as must the parent model and data).
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polyprune import distributed as dist_utils
from polyprune.errors import ConfigError, TargetError
from polyprune.files import read_json, run_folder
from polyprune.progress import is_main_process, log, progress_bar
from polyprune.pruning.config import PruneConfig, check_config
from polyprune.pruning.engine import prune_model
from polyprune.pruning.session import PruneSession
from polyprune.pruning.trajectory import (
    budget_spent,
    final_iters,
    new_trajectory,
    step_target,
    stop_or_fail,
    target_reached,
)
from polyprune.structure import layer_widths


def _check_reachable(run: PruneSession) -> None:
    """TargetError now, not after hours of fine-tuning: widths are what limit a params / MACs target."""

    cfg = run.cfg
    if cfg.target_params is None and cfg.target_macs is None:
        return
    target = {"params": cfg.target_params} if cfg.target_params is not None else {"macs": cfg.target_macs}
    # how far pruning can go depends on the widths only, not on the scores (bn-scale: on which groups)
    crit = "bn-scale" if cfg.criterion == "bn-scale" else "l1"
    prune_model(
        copy.deepcopy(run.parent),
        torch.zeros(1, 3, run.size, run.size, device=run.device),
        None,
        crit,
        target,  # type: ignore[arg-type]
        min_channels=cfg.min_channels,
        round_to=cfg.round_to,
        scope=cfg.scope,
        ignored_layers=cfg.ignore or None,
    )


def _check_widths(model: nn.Module, what: str) -> None:
    """Every rank must hold the same architecture (DistributedMismatchError otherwise)."""
    dist_utils.assert_same_across_ranks(layer_widths(model), f"layer widths {what}")


def prune_run(cfg: PruneConfig) -> dict[str, Any]:
    """Run (or resume) `polyprune prune`; returns the summary that the CLI prints.

    Under torchrun: joins the process group (gloo on CPU, nccl on GPU) and leaves it at the end.
    """
    check_config(cfg)
    owned = dist_utils.setup(cfg.device)
    claim = (
        run_folder(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite)
        if is_main_process()  # RANK from torchrun's environment: the process group is not up yet
        else contextlib.nullcontext()
    )
    with claim:
        summary = _prune_run(cfg)
    dist_utils.barrier()
    if owned:
        dist_utils.teardown()
    return summary


# options that change neither the result nor the decisions: a resume may differ in these
RESUME_FREE = ("resume", "overwrite", "progress", "threads", "device")


def _check_same_options(traj_path: Path, was: dict[str, Any], cfg: PruneConfig) -> None:
    """`--resume` continues the same run: refuse options that would give another result."""
    now = {k: v for k, v in asdict(cfg).items() if k not in RESUME_FREE}
    changed = [f"{k} {was[k]!r} -> {v!r}" for k, v in now.items() if k in was and was[k] != v]
    if changed:
        raise ConfigError(
            f"--resume would change the run in {traj_path.parent} ({'; '.join(changed)}): resume with the "
            "first run's options, or prune into a new --out"
        )


def _prune_run(cfg: PruneConfig) -> dict[str, Any]:
    run = PruneSession(cfg)
    traj = _open_trajectory(cfg, run)
    t_start = time.perf_counter()
    if traj["state"] == "pruning":
        _pruning_steps(cfg, run, traj)
    if traj["state"] == "final":
        _final_finetune(cfg, run, traj)
    p, final = traj["parent"], traj["final"]
    return {
        "model": str(run.out / "model.safetensors"),
        "trajectory": str(run.traj_path),
        "criterion": cfg.criterion,
        "steps": len(traj["steps"]) - 1,
        "final_step": traj["final_step"],
        "parent": {k: p[k] for k in ("params", "macs", "latency_ms", "val_dice")},
        "child": {k: final[k] for k in ("params", "macs", "latency_ms", "val_dice")},
        "params_fraction": final["params"] / p["params"],
        "macs_fraction": final["macs"] / p["macs"],
        "size": run.size,
        "backend": cfg.backend,
        "minutes": (time.perf_counter() - t_start) / 60,
    }


def _open_trajectory(cfg: PruneConfig, run: PruneSession) -> dict[str, Any]:
    """The trajectory to continue (--resume, same model and options) or a new one (step 0: the parent)."""
    traj: dict[str, Any] | None = None
    if cfg.resume and dist_utils.rank() == 0 and run.traj_path.is_file():
        traj = read_json(run.traj_path)
    traj = dist_utils.broadcast_object(traj)  # rank 0 decides: resume or start afresh
    if traj is not None and traj.get("config", {}).get("model") != cfg.model:
        raise ConfigError(
            f"--resume: {run.traj_path} belongs to a run on another model ({traj['config']['model']})"
        )
    if traj is not None:
        _check_same_options(run.traj_path, traj.get("config", {}), cfg)
        return traj
    _check_reachable(run)
    traj = new_trajectory(run)
    run.write_trajectory(traj)
    return traj


def _finetune_budget(cfg: PruneConfig) -> tuple[int | None, int | None]:
    """(epochs, iters) of the fine-tuning after each step; (None, None) for one-shot."""
    if cfg.one_shot:
        return None, None
    if cfg.finetune_iters is not None:
        return None, cfg.finetune_iters
    return (cfg.finetune_epochs if cfg.finetune_epochs is not None else 1), None


def _pruning_steps(cfg: PruneConfig, run: PruneSession, traj: dict[str, Any]) -> None:
    """Prune -> fine-tune -> measure steps until the target (or a stop), from the last completed step."""
    last = traj["steps"][-1]["step"]
    model, history = run.load_step(last) if last else (run.parent, [])
    if last:
        log(f"resuming after step {last}", enabled=cfg.progress)
    _check_widths(model, f"at step {last}")
    while traj["state"] == "pruning":
        prev = traj["steps"][-1]
        step = prev["step"] + 1
        if step > cfg.max_steps:
            stop_or_fail(cfg, traj, prev, f"reached max_steps={cfg.max_steps}")
        else:
            _prune_step(cfg, run, traj, model, history, step)
        run.write_trajectory(traj)


def _prune_step(
    cfg: PruneConfig, run: PruneSession, traj: dict[str, Any], model: nn.Module, history: list, step: int
) -> None:
    """One step: score + prune, fine-tune (keep the better of pruned / fine-tuned), measure, save."""
    from polyprune.device import seed_everything

    p, prev = traj["parent"], traj["steps"][-1]
    seed_everything(cfg.seed + step)
    t0 = time.perf_counter()
    with progress_bar(2, f"step {step}: score + prune", enabled=cfg.progress) as bar:
        try:
            result = prune_model(
                model,
                torch.zeros(1, 3, run.size, run.size, device=run.device),
                run.calibration,
                cfg.criterion,
                step_target(cfg, traj, prev),
                reduce=cfg.reduce,
                signal=cfg.signal,
                loss_fn=_loss(cfg.loss),
                n_images=cfg.n_images,
                min_channels=cfg.min_channels,
                round_to=cfg.round_to,
                scope=cfg.scope,
                group_reduce=cfg.group_reduce,
                cost=cfg.cost,
                latency=run.layer_latency,
                ignored_layers=cfg.ignore or None,
                seed=cfg.seed + step,
            )
        except TargetError as exc:  # nothing more can be removed
            stop_or_fail(cfg, traj, prev, str(exc))
            return
        bar.advance(1, removed=result.filters_removed)
        d_before = run.dice(model)
        bar.advance(1, val_dice=f"{d_before:.4f}")
    history += result.history
    if run.layer_latency is not None and is_main_process():
        run.layer_latency.save()  # what was timed for this step, for the next ones and a resume
    d_after, kept, ft_steps = _finetune_step(cfg, run, model, step, d_before)
    row = {"step": step, "filters_removed": result.filters_removed, "finetune_steps": ft_steps}
    row.update(run.measure(model))
    val = d_after if kept == "finetuned" else d_before
    row.update(
        val_dice_before_finetune=d_before,
        val_dice_after_finetune=d_after,
        val_dice=val,
        kept=kept,
        seconds=time.perf_counter() - t0,
        checkpoint=str(run.step_path(step).relative_to(run.out)),
        widths=layer_widths(model),
    )
    _check_widths(model, f"after step {step}")
    traj["steps"].append(row)
    run.save(run.step_path(step), model, traj, history, step)
    log(
        f"step {step}: params {row['params'] / p['params']:.1%}, MACs {row['macs'] / p['macs']:.1%}, "
        f"{row['latency_ms']:.1f} ms, val Dice {d_before:.4f} -> {val:.4f} (parent {p['val_dice']:.4f})",
        enabled=cfg.progress,
    )
    if cfg.max_dice_drop is not None and not val >= p["val_dice"] - cfg.max_dice_drop:
        row["within_dice_drop"] = False
        traj.update(state="final", final_step=step - 1)
    elif target_reached(cfg, traj, row):
        traj.update(state="final", final_step=step)


def _finetune_step(
    cfg: PruneConfig, run: PruneSession, model: nn.Module, step: int, d_before: float
) -> tuple[float | None, str, int]:
    """(val Dice after fine-tuning or None, the weights kept: "pruned" or "finetuned", steps spent)."""
    ft_epochs, ft_iters = _finetune_budget(cfg)
    if not (ft_epochs or ft_iters):
        return None, "pruned", 0
    pruned_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # fit shows its own bar (rich allows one live display at a time)
    spent = run.finetune(
        model, epochs=ft_epochs, iters=ft_iters, seed=cfg.seed + step, desc=f"step {step} fine-tune"
    )
    d_after = run.dice(model)
    if d_before > d_after:  # fit keeps its best epoch; the pruned weights may be better still
        model.load_state_dict(pruned_state)
        return d_after, "pruned", spent
    return d_after, "finetuned", spent


def _final_finetune(cfg: PruneConfig, run: PruneSession, traj: dict[str, Any]) -> None:
    """The chosen step, fine-tuned for final_epochs (resumable), measured and saved as RUN/model.safetensors."""
    from polyprune.device import seed_everything

    final_step = traj["final_step"]
    model, history = run.load_step(final_step)
    iters, spent = final_iters(cfg, traj), 0
    if cfg.final_epochs > 0 or iters:
        seed_everything(cfg.seed + 10_000)
        spent = run.finetune(
            model,
            epochs=cfg.final_epochs or None,
            iters=iters,
            seed=cfg.seed + 10_000,
            desc="final fine-tune",
            checkpoint_dir=run.out / "checkpoint",
            resume=cfg.resume,
        )
    _check_widths(model, "of the final model")
    final = {
        "step": final_step,
        **run.measure(model),
        "val_dice": run.dice(model),
        "widths": layer_widths(model),
    }
    if cfg.calibrate:
        final["calibration"] = run.calibrate(model)
    traj.update(final=final, state="done", budget=budget_spent(traj, spent))
    run.save(run.out / "model.safetensors", model, traj, history, final_step)
    run.write_trajectory(traj)


def _loss(name: str) -> Any:
    from polyprune.losses import make_loss

    return make_loss(name)
