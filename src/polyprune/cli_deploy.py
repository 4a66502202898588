"""`polyprune export | benchmark | predict | demo | report`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from polyprune.cli_app import JsonOut, Quiet, Seed, Threads, Tta, app, echo_json, emit_json, log_summary

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
    reduce_range: Annotated[
        bool | None,
        typer.Option(
            "--reduce-range/--no-reduce-range",
            help="INT8: 7-bit weights (default: on where this CPU lacks VNNI and 8-bit products saturate).",
        ),
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
            exclude_ids=exclude_ids or [], seed=seed, size=size, reduce_range=reduce_range,
        )  # fmt: skip
        emit_json(q.to_dict(), json_out)
        if json_out != "-":
            log(
                f"exported {q.path} (INT8 {calib_method}, {7 if q.reduce_range else 8}-bit weights, "
                f"{q.n_calib} calibration images, "
                f"{q.file_bytes / 2**20:.1f} MB vs {q.source_bytes / 2**20:.1f} MB fp32) in {q.seconds:.1f} s; "
                f"vs fp32 on the calibration images: mask Dice agreement {q.dice_agreement:.4f}, "
                f"mean |prob diff| {q.mean_abs_diff:.4f}"
            )
        return
    report = export_onnx(
        model, out, size=size, dynamic=dynamic, opset=opset, tolerance=tolerance, image=image
    )
    emit_json(report.to_dict(), json_out)
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
    rounds: Annotated[
        int, typer.Option(help="Rows are timed in turns: this many rounds, each with its share of --runs.")
    ] = 5,
    pause: Annotated[
        float,
        typer.Option(help="Seconds of rest before each row's turn (idle runtime threads stop spinning)."),
    ] = 0.5,
    json_path: Annotated[
        str | None,
        typer.Option("--json", metavar="OUT", help="Write rows + system info as JSON to OUT ('-': stdout)."),
    ] = None,
    tta: Tta = "none",
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
        rounds=rounds,
        pause_s=pause,
        progress=not quiet,
        tta=tta,
    )
    doc = {"rows": rows, "system": system_info()}
    if json_path == "-":
        echo_json(doc)
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
        str,
        typer.Option(
            "--source",
            help="An image, an image folder, a video (mp4/avi), or live: a camera (0, /dev/video0) or a "
            "stream URL (rtsp://, http(s)://).",
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Output folder: masks/, overlays/ or <stem>_overlay.mp4; predict.json."),
    ] = None,
    backend: Annotated[
        str, typer.Option(help="auto (.onnx: onnxruntime, else torch) | torch | onnxruntime | openvino")
    ] = "auto",
    threads: Threads = None,
    tta: Tta = "none",
    stream: Annotated[
        bool,
        typer.Option(
            "--stream", help="Pipeline decode / inference / write in threads; report real-time drops."
        ),
    ] = False,
    show: Annotated[bool, typer.Option("--show", help="Live: show the overlay in a window.")] = False,
    serve: Annotated[
        str | None,
        typer.Option(
            "--serve",
            metavar="[HOST:]PORT",
            help="Live: serve the overlay as MJPEG + a viewer page (127.0.0.1).",
        ),
    ] = None,
    record: Annotated[Path | None, typer.Option("--record", help="Live: record the overlay video.")] = None,
    max_frames: Annotated[int | None, typer.Option(help="Live: stop after this many frames.")] = None,
    duration: Annotated[float | None, typer.Option(help="Live: stop after this many seconds.")] = None,
    quiet: Quiet = False,
    json_out: JsonOut = None,
) -> None:
    """Predict masks and overlays for an image, a folder, a video or a live source; latency and FPS."""
    from polyprune.errors import ConfigError
    from polyprune.infer import predict_path, predict_summary
    from polyprune.live import is_live_source, live_summary, run_live
    from polyprune.predictor import Predictor
    from polyprune.progress import log

    live = is_live_source(source)
    if not live and (show or serve or record or max_frames or duration):
        raise ConfigError("--show, --serve, --record, --max-frames and --duration are for live sources")
    if not live and out is None:
        raise ConfigError("--out is needed for an image, a folder or a video")
    with Predictor(model, backend=backend, threads=threads, tta=tta) as predictor:
        if live:
            result = run_live(
                predictor,
                source,
                out_dir=out,
                show=show,
                serve=serve,
                record=record,
                max_frames=max_frames,
                duration_s=duration,
                on_serve=None if json_out == "-" else (lambda url: log(f"serving the live view on {url}")),
            )
        else:
            result = predict_path(
                predictor, Path(source), out, stream=stream, progress=not (quiet or json_out == "-")
            )
    emit_json(result, json_out)
    if json_out != "-":
        for line in (live_summary(result) if live else predict_summary(result)).splitlines():
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
    emit_json(result, json_out)


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
    log_summary(f"wrote {path} and {path.with_suffix('.html')} ({n_png} PNG plots)")
