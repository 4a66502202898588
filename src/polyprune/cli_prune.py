"""`polyprune prune`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from polyprune.cli_app import (
    JsonOut,
    Overwrite,
    Quiet,
    Seed,
    TeacherTta,
    Threads,
    app,
    emit_json,
    log_summary,
)

# ------------------------------------------------------------------------------------------- prune
# (pruning helper)


@app.command()
def prune(
    model: Annotated[Path, typer.Option("--model", help="Trained parent model (.safetensors).")],
    data: Annotated[list[Path], typer.Option("--data", help="Dataset folder (repeatable).")],
    out: Annotated[Path, typer.Option(help="Run folder: model.safetensors, trajectory.json, steps/.")],
    criterion: Annotated[
        str,
        typer.Option(
            help="taylor-gradnorm | taylor | l1 | l2 | bn-scale | random | tp-taylor | tp-magnitude "
            "(the last two: torch-pruning's MetaPruner, a baseline)"
        ),
    ] = "taylor-gradnorm",
    reduce: Annotated[str, typer.Option(help="taylor-gradnorm per-image term: abs | sq")] = "abs",
    signal: Annotated[
        str, typer.Option(help="Output gradient: loss (labels) | random (label-free)")
    ] = "loss",
    n_images: Annotated[int, typer.Option(help="Calibration images (training split) per scoring.")] = 64,
    target_params: Annotated[
        float | None, typer.Option(help="Keep at most this fraction of the parent's params.")
    ] = None,
    target_macs: Annotated[
        float | None, typer.Option(help="Keep at most this fraction of the parent's MACs.")
    ] = None,
    target_fps: Annotated[
        float | None, typer.Option(help="Prune until batch-1 fps at --size reaches this.")
    ] = None,
    max_dice_drop: Annotated[
        float | None, typer.Option(help="Prune while val Dice >= parent's - D; keep the last such step.")
    ] = None,
    size: Annotated[
        int | None, typer.Option(help="MACs / latency input size (default: the model's).")
    ] = None,
    backend: Annotated[str, typer.Option(help="Latency backend: torch | onnxruntime | openvino")] = "torch",
    int8: Annotated[
        bool, typer.Option("--int8", help="Time candidates as the INT8 deployment (onnxruntime / openvino).")
    ] = False,
    distill: Annotated[
        float, typer.Option(help="Fine-tuning: weight of the loss to the unpruned parent's probabilities.")
    ] = 0.0,
    distill_temperature: Annotated[float, typer.Option(help="Distillation temperature.")] = 1.0,
    teacher: Annotated[
        list[Path] | None,
        typer.Option(help="Distill from this model file instead of the parent (repeat: mean logits)."),
    ] = None,
    teacher_tta: TeacherTta = "none",
    cost: Annotated[
        str | None,
        typer.Option(
            help="none | macs | params | latency: divide importance by what a channel's removal saves "
            "(latency: ms per conv, measured on --backend torch or onnxruntime at --size). Default: macs "
            "for taylor-gradnorm (measured better), none for the other criteria."
        ),
    ] = None,
    ignore: Annotated[
        list[str] | None,
        typer.Option("--ignore", help="Layer never pruned, e.g. encoder.features.0 (repeatable)."),
    ] = None,
    freeze: Annotated[
        list[str] | None,
        typer.Option(
            "--freeze",
            help="Layer that fine-tuning leaves as it is: weights and BatchNorm statistics, e.g. encoder "
            "with --ignore encoder (repeatable).",
        ),
    ] = None,
    calibrate: Annotated[
        bool,
        typer.Option(
            help="At the end, fit one logit scale on validation (temperature scaling) and, where it is above "
            "1 (an under-confident network), fold it into the output conv: masks at 0.5 stay, probabilities "
            "get sharper and calibrated (MAE, heat maps, mDice)."
        ),
    ] = True,
    latency_runs: Annotated[int, typer.Option(help="Timed runs per latency measurement.")] = 20,
    step_ratio: Annotated[float, typer.Option(help="Share of the remaining filters removed per step.")] = 0.1,
    steps: Annotated[
        int | None,
        typer.Option(
            help="Reach --target-params / --target-macs in this many steps, geometric (instead of --step-ratio)."
        ),
    ] = None,
    finetune_epochs: Annotated[
        int | None, typer.Option(help="Fine-tuning epochs after each step (default 1).")
    ] = None,
    finetune_iters: Annotated[
        int | None, typer.Option(help="Fine-tuning steps after each step (instead).")
    ] = None,
    final_epochs: Annotated[int, typer.Option(help="Fine-tuning epochs after the last step.")] = 0,
    finetune_budget: Annotated[
        float | None,
        typer.Option(
            help="Final fine-tune as a fraction of the parent's training steps (0.2 = 20 %), instead of "
            "--final-epochs; the trajectory records every step spent."
        ),
    ] = None,
    one_shot: Annotated[
        bool, typer.Option("--one-shot", help="Prune straight to the target, no fine-tuning.")
    ] = False,
    scope: Annotated[
        str, typer.Option(help="global (one ranking) | uniform (same share per layer)")
    ] = "global",
    round_to: Annotated[
        int | None,
        typer.Option(
            help="Widths stay multiples of this (1: off). Default 8; 1 with tp-* (MetaPruner rounds widths "
            "down, so 8 takes a 16-wide layer to 8 in one step)."
        ),
    ] = None,
    min_channels: Annotated[int, typer.Option(help="Fewest channels any layer keeps.")] = 4,
    group_reduce: Annotated[str, typer.Option(help="Score of coupled layers: sum | mean | max")] = "sum",
    max_steps: Annotated[int, typer.Option(help="Stop after this many steps.")] = 100,
    batch: int = 8,
    lr: Annotated[float, typer.Option(help="Fine-tuning learning rate (AdamW, cosine).")] = 1e-4,
    weight_decay: float = 1e-4,
    loss: Annotated[str, typer.Option(help="bce-dice | structure (scoring and fine-tuning)")] = "bce-dice",
    val_fraction: Annotated[float, typer.Option(help="Validation share carved from training data.")] = 0.1,
    ids: Annotated[
        list[Path] | None, typer.Option("--ids", help="Use only these ids (split file, repeatable).")
    ] = None,
    exclude_ids: Annotated[
        list[Path] | None,
        typer.Option("--exclude-ids", help="Test ids never used, e.g. splits/kvasir_pranet_test.txt."),
    ] = None,
    seed: Seed = 0,
    threads: Threads = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    precision: Annotated[
        str, typer.Option(help="auto | fp32 | bf16 (auto: bf16 on CUDA, fp32 on CPU)")
    ] = "auto",
    resume: Annotated[bool, typer.Option(help="Continue after the last completed step in RUN.")] = False,
    overwrite: Overwrite = False,
    skip_bad: Annotated[
        bool, typer.Option(help="Skip unreadable pairs with a warning instead of failing.")
    ] = False,
    quiet: Quiet = False,
    json_out: JsonOut = None,
) -> None:
    """Prune a trained model to a target (params, MACs, fps or a Dice budget), fine-tuning between steps."""
    from polyprune.pruning.config import PruneConfig
    from polyprune.pruning.schedule import prune_run

    cfg = PruneConfig(
        model=str(model),
        data=[str(d) for d in data],
        out=str(out),
        criterion=criterion,
        reduce=reduce,
        signal=signal,
        n_images=n_images,
        target_params=target_params,
        target_macs=target_macs,
        target_fps=target_fps,
        max_dice_drop=max_dice_drop,
        size=size,
        backend=backend,
        int8=int8,
        distill=distill,
        distill_temperature=distill_temperature,
        teacher=[str(t) for t in teacher or []],
        teacher_tta=teacher_tta,
        cost=cost,
        ignore=list(ignore or []),
        freeze=list(freeze or []),
        calibrate=calibrate,
        latency_runs=latency_runs,
        step_ratio=step_ratio,
        steps=steps,
        finetune_epochs=finetune_epochs,
        finetune_iters=finetune_iters,
        final_epochs=final_epochs,
        finetune_budget=finetune_budget,
        one_shot=one_shot,
        scope=scope,
        round_to=round_to,
        min_channels=min_channels,
        group_reduce=group_reduce,
        max_steps=max_steps,
        batch=batch,
        lr=lr,
        weight_decay=weight_decay,
        loss=loss,
        seed=seed,
        threads=threads,
        device=device,
        precision=precision,
        ids_file=[str(p) for p in ids or []],
        exclude_ids=[str(p) for p in exclude_ids or []],
        val_fraction=val_fraction,
        skip_bad=skip_bad,
        resume=resume,
        overwrite=overwrite,
        progress=not (quiet or json_out == "-"),
    )
    s = prune_run(cfg)
    emit_json(s, json_out)
    if json_out == "-":
        return
    p, c = s["parent"], s["child"]
    log_summary(
        f"pruned in {s['steps']} step(s), kept step {s['final_step']}: params {p['params'] / 1e6:.3f} M -> "
        f"{c['params'] / 1e6:.3f} M ({s['params_fraction']:.1%}), MACs {p['macs'] / 1e9:.3f} G -> "
        f"{c['macs'] / 1e9:.3f} G ({s['macs_fraction']:.1%}), latency {p['latency_ms']:.1f} -> "
        f"{c['latency_ms']:.1f} ms ({s['backend']}, {s['size']} px), val Dice {p['val_dice']:.4f} -> "
        f"{c['val_dice']:.4f} -> {s['model']}"
    )
