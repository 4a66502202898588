"""`polyprune demo`: the whole method in one command, on synthetic polyps generated on the fly.

    data       OUT/data/train (training pool; validation carved from it) and OUT/data/test (held out,
               another seed): `polyprune.synth.make_synthetic_dataset`
    train      a UNet -> OUT/parent/ (model.safetensors, history.json)
    prune      taylor-gradnorm to 25 % of the parent's MACs, fine-tuning after every step
               -> OUT/pruned/ (model.safetensors, trajectory.json)
    evaluate   parent and pruned on the test set, both protocols, prediction PNGs kept for the overlays
               -> OUT/eval/{parent,pruned}/ (metrics.json, test_per_image.csv, preds/test/*.png)
    export     the pruned model to ONNX, checked against torch -> OUT/pruned/model.onnx
    benchmark  both models, torch and ONNX Runtime, batch 1, `threads` or 2 -> OUT/benchmark.json
    report     `polyprune.report.write_report([OUT], OUT/report)` -> report.md, report.html, PNGs
    OUT/demo.json  every number above (as the stage outputs hold them), wall and CPU seconds per stage

Each stage ends with one summary line on stderr (printed even with progress=False; echo=False mutes
them). Budgets on a 2-core CPU: the full demo under 10 minutes, `quick` under 2 (used by the tests);
measured on this shared machine with one training thread: full 7.0-7.5 min (parent val Dice
0.87-0.89, pruned 0.81-0.83), quick ~25 s.
OUT is wiped of the demo's own outputs first if it holds an earlier demo (marker file OUT/.polyprune-demo);
a non-empty OUT that is not a demo folder is a ConfigError, so the demo never deletes anything else.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from polyprune.demo_stages import (
    BENCH_THREADS,
    FULL,
    QUICK,
    TRAIN_THREADS,
    benchmark_both,
    demo_result,
    evaluate_both,
    prune_parent,
    train_parent,
)
from polyprune.errors import ConfigError
from polyprune.files import atomic_write_text, write_json
from polyprune.progress import StageTimer

MARKER = ".polyprune-demo"
OWNED = ("data", "parent", "pruned", "eval", "report", "benchmark.json", "demo.json")


def _prepare(out: Path) -> None:
    """Clear an earlier demo's outputs; refuse a non-empty folder that is not a demo folder."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise ConfigError(f"--out {out} is not empty and holds no earlier demo; choose another folder")
        for name in OWNED:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    atomic_write_text(
        out / MARKER, "written by polyprune demo; its outputs here are replaced by the next run\n"
    )


def run_demo(
    out: str | Path,
    *,
    quick: bool = False,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
    echo: bool = True,
) -> dict[str, Any]:
    """Run every stage (module docstring) into `out`; return what OUT/demo.json holds.

    `threads`: torch threads for training, pruning and evaluation (None: TRAIN_THREADS = 1) and for
    the benchmark (None: BENCH_THREADS = 2). `progress`: bars and the stages' own log lines. `echo`:
    the one-line stage summaries (stderr).
    """
    from polyprune.export import export_onnx
    from polyprune.report import write_report
    from polyprune.synth import make_synthetic_dataset

    cfg = QUICK if quick else FULL
    out = Path(out)
    bench_threads, threads = threads or BENCH_THREADS, threads or TRAIN_THREADS
    _prepare(out)
    st = StageTimer(echo)

    train_dir, test_dir = out / "data" / "train", out / "data" / "test"
    make_synthetic_dataset(train_dir, n=cfg.n_train, size=cfg.size, seed=seed, progress=progress)
    make_synthetic_dataset(test_dir, n=cfg.n_test, size=cfg.size, seed=seed + 10_000, progress=progress)
    n_val = round(cfg.n_train * cfg.val_fraction)
    st.done(
        "data",
        f"{cfg.n_train} synthetic training images ({n_val} for validation) + {cfg.n_test} held-out test "
        f"images at {cfg.size} px in {out / 'data'}",
    )
    ts = train_parent(cfg, train_dir, out / "parent", seed, threads, progress, st)
    parent_model = str(out / "parent" / "model.safetensors")
    ps = prune_parent(cfg, parent_model, train_dir, out / "pruned", seed, threads, progress, st)
    pruned_model = ps["model"]
    test = evaluate_both(
        cfg, {"parent": parent_model, "pruned": pruned_model}, test_dir, out, threads, progress, st
    )

    onnx_path = out / "pruned" / "model.onnx"
    ex = export_onnx(pruned_model, onnx_path)
    st.done(
        "export",
        f"{onnx_path} ({ex.exporter}, {ex.file_bytes / 2**20:.2f} MB), max |ORT - torch| {ex.max_abs_diff:.1e}",
    )
    lat, speedup = benchmark_both(cfg, parent_model, pruned_model, out, bench_threads, progress, st)
    report = write_report([out], out / "report", title="polyprune demo: UNet pruned with taylor-gradnorm")
    st.done("report", f"{report} and report.html")

    best = "onnxruntime" if "onnxruntime" in speedup else next(iter(speedup))
    minutes = st.finish()
    st.final(
        f"demo done in {minutes:.1f} min: params {ts['params'] / 1e6:.3f} M -> {ps['child']['params'] / 1e6:.3f} M "
        f"({ps['params_fraction']:.1%}), MACs {ps['macs_fraction']:.1%}, {best} "
        f"{lat['parent'][best]['median_ms']:.2f} -> {lat['pruned'][best]['median_ms']:.2f} ms "
        f"({speedup[best]:.2f}x, {lat['pruned'][best]['fps']:.0f} FPS), test Dice@0.5 "
        f"{test['parent']['dice']:.4f} -> {test['pruned']['dice']:.4f}; report {report}"
    )
    result = demo_result(
        cfg,
        quick,
        seed,
        threads,
        bench_threads,
        train_dir,
        test_dir,
        ts,
        ps,
        test,
        lat,
        speedup,
        ex,
        out,
        report,
        st,
    )
    write_json(out / "demo.json", result)
    return result
