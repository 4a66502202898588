"""What every cell records about its model file: size, compute, accuracy (val and test), ONNX Runtime latency.

params, macs     polyprune.counting (torch FlopCounterMode, conv MACs) at the model's input size,
                 and macs_352 at 352 x 352
val_dice         Dice@0.5 per image on the validation split carved from the parent's training
                 pool (polyprune.fit.validation_dice, fp32)
test             polyprune.evaluate.evaluate_model on Kvasir-SEG (PraNet test ids, 100) and
                 CVC-ClinicDB (PraNet test ids, 62) and CVC-ColonDB (all 380, unseen): every metric of both protocols (Jha "dice" at
                 0.5; PraNet toolbox "mean_dice" over 256 thresholds), at GT resolution
latency          measure_latencies_in_turns (polyprune.latency): static ONNX export at each size, batch 1,
                 `latency_threads` intra-op threads, `warmup` untimed runs, then median / p90 /
                 min of `runs` timed runs of the session call on a preprocessed input. Measured
                 once with the cell, then again for every model in one pass, timed in turns, when the
                 grid is complete (run.final_latency_pass), so all rows share the same conditions;
                 at the largest size also the static INT8 model (ONNX Runtime's quantizer, MinMax
                 on 16 training images) on ONNX Runtime and the fp32 model on OpenVINO
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from grid import Grid
from polyprune.counting import count_macs, count_params
from polyprune.evaluate import evaluate_model
from polyprune.io import load_model
from polyprune.pruning import layer_widths
from polyprune.validation import validation_dice


def measure_model(
    path: Path,
    *,
    grid: Grid,
    val_ds: Any,
    tests: dict[str, tuple[Path, Path | None]],
    calib: list[Path] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The record of one model file; `tests` maps a short name to (dataset folder, ids file or None: all)."""
    t0 = time.perf_counter()
    model = load_model(path)
    size = model.polyprune_meta.input.size
    rec: dict[str, Any] = {
        "params": count_params(model),
        "macs": count_macs(model, size),
        "macs_352": count_macs(model, 352),
        "size": size,
        "widths": {k: v for k, v in layer_widths(model).items()},
        "val_dice": validation_dice(model, val_ds, batch=grid.batch, device="cpu", precision="fp32"),
        "test": {},
        "latency": {},
    }
    for name, (folder, ids) in tests.items():
        res = evaluate_model(path, [folder], ids_file=ids, backend="torch", progress=progress)
        (summary,) = (v for k, v in res.items() if not k.startswith("_"))
        rec["test"][name] = summary
    rec["latency"] = measure_latency(path, grid, calib)
    rec["measure_seconds"] = round(time.perf_counter() - t0, 1)
    return rec


def measure_latency(path: Path, grid: Grid, calib: list[Path] | None = None) -> dict[str, Any]:
    """Latency of one model file, {key: stats}: ONNX Runtime fp32 at every size of the grid ("256", "352"),
    and at the largest size its static INT8 deployment ("int8_352", calibrated on `calib` images) and
    OpenVINO's CPU default ("openvino_352")."""
    return measure_latencies_in_turns([path], grid, calib)[0]


def measure_latencies_in_turns(
    paths: list[Path], grid: Grid, calib: list[Path] | None = None
) -> list[dict[str, Any]]:
    """`measure_latency`'s record for every file, with each key's models timed in turns
    (polyprune.latency.time_round_robin: 5 rounds, a `latency_pause_s` rest and 2 untimed runs before each turn), so
    rows measured in one pass share the machine's load instead of whatever each minute brought."""
    import contextlib
    import tempfile

    from polyprune.export import export_onnx
    from polyprune.latency import open_runtime, runtime_forward, time_round_robin
    from polyprune.quantize import quantize_onnx

    extra = {"threads": grid.latency_threads, "warmup": grid.latency_warmup, "timing": "round-robin"}
    s_max = grid.latency_sizes[-1]
    keys = [(str(s), "onnxruntime", s) for s in grid.latency_sizes]
    keys += [(f"int8_{s_max}", "onnxruntime", s_max)] if calib else []
    keys += [(f"openvino_{s_max}", "openvino", s_max)]
    out: list[dict[str, Any]] = [{} for _ in paths]
    with tempfile.TemporaryDirectory(prefix="bench-lat-") as tmp:
        for key, backend, size in keys:
            with contextlib.ExitStack() as sessions:
                calls = []
                for i, path in enumerate(paths):
                    model_file = path
                    if key.startswith("int8_"):
                        fp32 = export_onnx(path, Path(tmp) / f"{i}.onnx", size=size, check=False).path
                        model_file = quantize_onnx(
                            fp32, Path(tmp) / f"{i}_int8.onnx", calib, min_agreement=0.0
                        ).path
                    p = sessions.enter_context(
                        open_runtime(backend, model_file, size, threads=grid.latency_threads)
                    )
                    calls.append(runtime_forward(p, size))
                lats = time_round_robin(
                    calls, runs=grid.latency_runs, warmup=grid.latency_warmup, pause_s=grid.latency_pause_s
                )
            for rec, lat in zip(out, lats, strict=True):
                rec[key] = {
                    **lat.to_dict(),
                    **extra,
                    **({"calib_images": len(calib)} if calib and "int8" in key else {}),
                }
    return out
