"""The stages of `polyprune demo` (train, prune, evaluate, benchmark) and their budgets (`FULL`, `QUICK`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from polyprune.files import read_json, write_json
from polyprune.progress import StageTimer

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


def latency(rows: list[dict[str, Any]], model: str) -> dict[str, dict[str, float]]:
    return {
        r["backend"]: {k: r[k] for k in ("median_ms", "p90_ms", "min_ms", "fps", "size", "threads")}
        for r in rows
        if r["model"] == model
    }


def train_parent(
    cfg: DemoConfig,
    train_dir: Path,
    parent_dir: Path,
    seed: int,
    threads: int,
    progress: bool,
    st: StageTimer,
) -> dict[str, Any]:
    from polyprune.train import TrainConfig, train

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
    st.done(
        "train",
        f"UNet width {cfg.width}, {ts['params'] / 1e6:.3f} M params, {ts['macs'] / 1e9:.3f} GMACs: "
        f"best val Dice {ts['best_val_dice']:.4f} (epoch {ts['best_epoch']}/{ts['epochs']})",
    )
    return ts


def prune_parent(
    cfg: DemoConfig,
    parent_model: str,
    train_dir: Path,
    pruned_dir: Path,
    seed: int,
    threads: int,
    progress: bool,
    st: StageTimer,
) -> dict[str, Any]:
    from polyprune.pruning.config import PruneConfig
    from polyprune.pruning.schedule import prune_run

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
    st.done(
        "prune",
        f"{CRITERION} to {TARGET_MACS:.0%} MACs in {ps['steps']} steps: params {ps['params_fraction']:.1%}, "
        f"MACs {ps['macs_fraction']:.1%}, val Dice {ps['parent']['val_dice']:.4f} -> {ps['child']['val_dice']:.4f}",
    )
    return ps


def evaluate_both(
    cfg: DemoConfig,
    models: dict[str, str],
    test_dir: Path,
    out: Path,
    threads: int,
    progress: bool,
    st: StageTimer,
) -> dict[str, dict[str, Any]]:
    from polyprune.evaluate import evaluate_model

    test: dict[str, dict[str, Any]] = {}
    for name, model in models.items():
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
    st.done(
        "evaluate",
        f"test ({cfg.n_test} images) Dice@0.5 / mDice: parent {test['parent']['dice']:.4f} / "
        f"{test['parent']['mean_dice']:.4f}, pruned {test['pruned']['dice']:.4f} / {test['pruned']['mean_dice']:.4f}",
    )
    return test


def benchmark_both(
    cfg: DemoConfig,
    parent_model: str,
    pruned_model: str,
    out: Path,
    threads: int,
    progress: bool,
    st: StageTimer,
) -> tuple[dict[str, Any], dict[str, float]]:
    from polyprune.benchmark import benchmark_models, system_info

    rows = benchmark_models(
        [parent_model, pruned_model],
        sizes=[cfg.size],
        backends=["torch", "onnxruntime"],
        threads=threads,
        runs=cfg.bench_runs,
        pause_s=0.2,  # two tiny models: a short rest is enough for their idle threads
        progress=progress,
    )
    write_json(out / "benchmark.json", {"rows": rows, "system": system_info()})
    lat = {"parent": latency(rows, parent_model), "pruned": latency(rows, pruned_model)}
    speedup = {
        b: lat["parent"][b]["median_ms"] / lat["pruned"][b]["median_ms"]
        for b in lat["pruned"]
        if b in lat["parent"]
    }
    st.done(
        "benchmark",
        f"batch 1, {cfg.size} px, {threads} threads: "
        + "; ".join(
            f"{b} {lat['parent'][b]['median_ms']:.2f} -> {lat['pruned'][b]['median_ms']:.2f} ms ({speedup[b]:.2f}x)"
            for b in speedup
        ),
    )
    return lat, speedup


def demo_result(
    cfg: DemoConfig,
    quick: bool,
    seed: int,
    threads: int,
    bench_threads: int,
    train_dir: Path,
    test_dir: Path,
    ts: dict[str, Any],
    ps: dict[str, Any],
    test: dict[str, dict[str, Any]],
    lat: dict[str, Any],
    speedup: dict[str, float],
    ex: Any,
    out: Path,
    report: Path,
    st: StageTimer,
) -> dict[str, Any]:
    """What OUT/demo.json holds."""
    parent_model, pruned_model, onnx_path = str(out / "parent" / "model.safetensors"), ps["model"], ex.path
    return {
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
            **{k: ps["child"][k] for k in ("params", "macs")},
            "size": cfg.size,
            **{k: ps[k] for k in ("params_fraction", "macs_fraction")},
            "val_dice": ps["child"]["val_dice"],
            **{k: ps[k] for k in ("steps", "final_step")},
            "test": test["pruned"],
            "latency": lat["pruned"],
        },
        "speedup": speedup,
        "export": ex.to_dict(),
        "benchmark": str(out / "benchmark.json"),
        "report": str(report),
        "seconds": st.seconds,
        "cpu_seconds": st.cpu_seconds,
        "summary": st.lines,
    }
