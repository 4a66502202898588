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
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from polyprune.errors import ConfigError
from polyprune.files import atomic_write_text, read_json, write_json
from polyprune.progress import log

MARKER = ".polyprune-demo"
OWNED = ("data", "parent", "pruned", "eval", "report", "benchmark.json", "demo.json")
TARGET_MACS = 0.25
CRITERION = "taylor-gradnorm"
BENCH_THREADS = 2
# Training threads when none are asked for. One, not all cores: on an idle 2-core CPU two threads
# train these small UNets only ~1.25x faster, but when another process holds a core, OpenMP's
# spinning barriers made two threads 1.5-40x slower here (a 10.5 min demo vs 7.0 with one thread).
TRAIN_THREADS = 1


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and budgets of one demo; FULL and QUICK below are the two presets."""

    n_train: int  # training pool; val_fraction of it is the validation split
    n_test: int
    size: int
    width: int
    epochs: int
    batch: int
    lr: float
    augment: bool  # flips / rotation / colour jitter while training the parent
    precision: str  # training / fine-tuning precision on the CPU (fp32 | bf16)
    step_ratio: float  # share of the remaining filters removed per pruning step
    finetune_iters: int  # fine-tuning steps after every pruning step
    final_epochs: int  # fine-tuning epochs after the last step
    prune_lr: float
    round_to: int  # pruned widths stay multiples of this (8 would leave a width-8 UNet unprunable)
    n_images: int  # calibration images for the Taylor scores
    latency_runs: int  # timed runs per latency measurement inside the prune loop
    bench_runs: int  # timed runs per benchmark row
    val_fraction: float = 0.1


# Tuned on this 2-core CPU: synthetic data is unlimited, so fresh images replace augmentation (faster
# to learn: width 8 at 128 px reached val Dice 0.80 after 9 epochs of 900 images without augmentation,
# while width 16 with augmentation on 255 images stalled at 0.58 after 20 epochs, with more CPU time).
FULL = DemoConfig(
    n_train=1000,
    n_test=100,
    size=128,
    width=8,
    epochs=15,
    batch=8,
    lr=3e-3,
    augment=False,
    precision="fp32",  # bf16 autocast was ~1.5x slower than fp32 at this size here
    step_ratio=0.2,
    finetune_iters=100,
    final_epochs=2,
    prune_lr=1e-3,
    round_to=4,
    n_images=64,
    latency_runs=5,
    bench_runs=50,
)
QUICK = DemoConfig(
    n_train=192,
    n_test=16,
    size=64,
    width=8,
    epochs=4,
    batch=8,
    lr=3e-3,
    augment=False,
    precision="fp32",
    step_ratio=0.3,
    finetune_iters=8,
    final_epochs=0,
    prune_lr=1e-3,
    round_to=4,
    n_images=16,
    latency_runs=3,
    bench_runs=10,
)


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


def _latency(rows: list[dict[str, Any]], model: str) -> dict[str, dict[str, float]]:
    return {
        r["backend"]: {k: r[k] for k in ("median_ms", "p90_ms", "min_ms", "fps", "size", "threads")}
        for r in rows
        if r["model"] == model
    }


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
    from polyprune.benchmark import benchmark_models, system_info
    from polyprune.evaluate import evaluate_model
    from polyprune.export import export_onnx
    from polyprune.pruning.config import PruneConfig
    from polyprune.pruning.schedule import prune_run
    from polyprune.report import write_report
    from polyprune.synth import make_synthetic_dataset
    from polyprune.train import TrainConfig, train

    cfg = QUICK if quick else FULL
    out = Path(out)
    bench_threads, threads = threads or BENCH_THREADS, threads or TRAIN_THREADS
    _prepare(out)
    seconds: dict[str, float] = {}
    cpu_seconds: dict[str, float] = {}  # process CPU time: wall time on a shared machine misleads
    lines: list[str] = []
    t_all = t = time.perf_counter()
    c_all = c = time.process_time()

    def done(stage: str, line: str) -> None:
        nonlocal t, c
        now, cnow = time.perf_counter(), time.process_time()
        seconds[stage], cpu_seconds[stage] = round(now - t, 2), round(cnow - c, 2)
        t, c = now, cnow
        lines.append(f"{stage}: {line} ({seconds[stage]:.0f} s)")
        log(lines[-1], enabled=echo)

    # -------------------------------------------------------------------------------------- data
    train_dir, test_dir = out / "data" / "train", out / "data" / "test"
    make_synthetic_dataset(train_dir, n=cfg.n_train, size=cfg.size, seed=seed, progress=progress)
    make_synthetic_dataset(test_dir, n=cfg.n_test, size=cfg.size, seed=seed + 10_000, progress=progress)
    n_val = round(cfg.n_train * cfg.val_fraction)
    done(
        "data",
        f"{cfg.n_train} synthetic training images ({n_val} for validation) + {cfg.n_test} held-out test "
        f"images at {cfg.size} px in {out / 'data'}",
    )

    # ------------------------------------------------------------------------------------- train
    parent_dir = out / "parent"
    ts = train(
        TrainConfig(
            data=[str(train_dir)],
            out=str(parent_dir),
            size=cfg.size,
            width=cfg.width,
            epochs=cfg.epochs,
            batch=cfg.batch,
            lr=cfg.lr,
            seed=seed,
            val_fraction=cfg.val_fraction,
            augment=cfg.augment,
            threads=threads,
            precision=cfg.precision,
            overwrite=True,  # the demo owns its folders: a second `make demo` starts over
            progress=progress,
        )
    )
    parent_model = str(parent_dir / "model.safetensors")
    done(
        "train",
        f"UNet width {cfg.width}, {ts['params'] / 1e6:.3f} M params, {ts['macs'] / 1e9:.3f} GMACs: "
        f"best val Dice {ts['best_val_dice']:.4f} (epoch {ts['best_epoch']}/{ts['epochs']})",
    )

    # ------------------------------------------------------------------------------------- prune
    pruned_dir = out / "pruned"
    ps = prune_run(
        PruneConfig(
            model=parent_model,
            data=[str(train_dir)],
            out=str(pruned_dir),
            criterion=CRITERION,
            n_images=cfg.n_images,
            target_macs=TARGET_MACS,
            latency_runs=cfg.latency_runs,
            step_ratio=cfg.step_ratio,
            round_to=cfg.round_to,
            finetune_iters=cfg.finetune_iters,
            final_epochs=cfg.final_epochs,
            batch=cfg.batch,
            lr=cfg.prune_lr,
            seed=seed,
            threads=threads,
            precision=cfg.precision,
            val_fraction=cfg.val_fraction,
            overwrite=True,
            progress=progress,
        )
    )
    pruned_model = ps["model"]
    done(
        "prune",
        f"{CRITERION} to {TARGET_MACS:.0%} MACs in {ps['steps']} steps: params {ps['params_fraction']:.1%}, "
        f"MACs {ps['macs_fraction']:.1%}, val Dice {ps['parent']['val_dice']:.4f} -> {ps['child']['val_dice']:.4f}",
    )

    # ---------------------------------------------------------------------------------- evaluate
    test: dict[str, dict[str, Any]] = {}
    for name, model in (("parent", parent_model), ("pruned", pruned_model)):
        evaluate_model(
            model,
            [test_dir],
            backend="torch",
            threads=threads,
            save_preds=out / "eval" / name / "preds",
            out_dir=out / "eval" / name,
            progress=progress,
        )
        test[name] = read_json(out / "eval" / name / "metrics.json")[test_dir.name]  # what the report reads
    done(
        "evaluate",
        f"test ({cfg.n_test} images) Dice@0.5 / mDice: parent {test['parent']['dice']:.4f} / "
        f"{test['parent']['mean_dice']:.4f}, pruned {test['pruned']['dice']:.4f} / {test['pruned']['mean_dice']:.4f}",
    )

    # ------------------------------------------------------------------------------------ export
    onnx_path = pruned_dir / "model.onnx"
    ex = export_onnx(pruned_model, onnx_path)
    done(
        "export",
        f"{onnx_path} ({ex.exporter}, {ex.file_bytes / 2**20:.2f} MB), max |ORT - torch| {ex.max_abs_diff:.1e}",
    )

    # --------------------------------------------------------------------------------- benchmark
    rows = benchmark_models(
        [parent_model, pruned_model],
        sizes=[cfg.size],
        backends=["torch", "onnxruntime"],
        threads=bench_threads,
        runs=cfg.bench_runs,
        progress=progress,
    )
    write_json(out / "benchmark.json", {"rows": rows, "system": system_info()})
    lat = {"parent": _latency(rows, parent_model), "pruned": _latency(rows, pruned_model)}
    speedup = {
        b: lat["parent"][b]["median_ms"] / lat["pruned"][b]["median_ms"]
        for b in lat["pruned"]
        if b in lat["parent"]
    }
    done(
        "benchmark",
        f"batch 1, {cfg.size} px, {bench_threads} threads: "
        + "; ".join(
            f"{b} {lat['parent'][b]['median_ms']:.2f} -> {lat['pruned'][b]['median_ms']:.2f} ms ({speedup[b]:.2f}x)"
            for b in speedup
        ),
    )

    # ------------------------------------------------------------------------------------ report
    report = write_report([out], out / "report", title="polyprune demo: UNet pruned with taylor-gradnorm")
    done("report", f"{report} and report.html")

    total = time.perf_counter() - t_all
    seconds["total"] = round(total, 2)
    cpu_seconds["total"] = round(time.process_time() - c_all, 2)
    best = "onnxruntime" if "onnxruntime" in speedup else next(iter(speedup))
    final = (
        f"demo done in {total / 60:.1f} min: params {ts['params'] / 1e6:.3f} M -> {ps['child']['params'] / 1e6:.3f} M "
        f"({ps['params_fraction']:.1%}), MACs {ps['macs_fraction']:.1%}, {best} "
        f"{lat['parent'][best]['median_ms']:.2f} -> {lat['pruned'][best]['median_ms']:.2f} ms "
        f"({speedup[best]:.2f}x, {lat['pruned'][best]['fps']:.0f} FPS), test Dice@0.5 "
        f"{test['parent']['dice']:.4f} -> {test['pruned']['dice']:.4f}; report {report}"
    )
    lines.append(final)
    log(final, enabled=echo)

    result = {
        "config": {
            **asdict(cfg),
            "quick": quick,
            "seed": seed,
            "threads": threads,
            "bench_threads": bench_threads,
        },
        "criterion": CRITERION,
        "target_macs": TARGET_MACS,
        "data": {
            "train": str(train_dir),
            "test": str(test_dir),
            "n_train": cfg.n_train,
            "n_test": cfg.n_test,
        },
        "parent": {
            "model": parent_model,
            "params": ts["params"],
            "macs": ts["macs"],
            "size": cfg.size,
            "val_dice": ts["best_val_dice"],
            "best_epoch": ts["best_epoch"],
            "epochs": ts["epochs"],
            "test": test["parent"],
            "latency": lat["parent"],
        },
        "pruned": {
            "model": pruned_model,
            "onnx": str(onnx_path),
            "params": ps["child"]["params"],
            "macs": ps["child"]["macs"],
            "size": cfg.size,
            "params_fraction": ps["params_fraction"],
            "macs_fraction": ps["macs_fraction"],
            "val_dice": ps["child"]["val_dice"],
            "steps": ps["steps"],
            "final_step": ps["final_step"],
            "test": test["pruned"],
            "latency": lat["pruned"],
        },
        "speedup": speedup,
        "export": ex.to_dict(),
        "benchmark": str(out / "benchmark.json"),
        "report": str(report),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "summary": lines,
    }
    write_json(out / "demo.json", result)
    return result
