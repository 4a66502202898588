"""The benchmark grid: methods, targets, seeds, budgets; cell keys and the resume bookkeeping.

Pure logic (no torch): `run.py` drives it and `tests/test_benchmarks.py` tests it.

A *cell* is one (method, target, seed). Its folder under the work dir is named by the method, the
target, the seed and a short hash of everything that changes its result (parent file, budgets,
evaluation settings), so a rerun with other budgets never reuses a stale cell. A cell is finished when
its `done.json` exists; that file is written atomically, last.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Method:
    name: str  # the table's name
    engine: str  # who ranks and removes: "polyprune" | "torch-pruning" (MetaPruner) | "scratch"
    criterion: str = (
        ""  # `polyprune prune --criterion` (tp-taylor / tp-magnitude: torch-pruning's MetaPruner)
    )
    reduce: str = "abs"  # taylor-gradnorm only
    signal: str = "loss"  # taylor-gradnorm / taylor only
    label: str = ""
    distill: float = 0.0  # `--distill W`: fine-tune against the unpruned parent's probabilities
    cost: str = "none"  # `--cost`: rank importance per MAC / param / ms saved
    round_to: int | None = None  # `--round-to`; None: the library's default (engine.default_round_to)
    title: str = ""  # what reports show when `label` (frozen in the cell hash) has gone stale

    def record(self) -> dict[str, Any]:
        """What names the method in a cell's hash (round_to only when set, title never: older cells keep their names)."""
        d = asdict(self)
        del d["title"]
        if d["round_to"] is None:
            del d["round_to"]
        return d

    @property
    def description(self) -> str:
        return self.title or self.label


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "tgn-abs-loss",
            "polyprune",
            "taylor-gradnorm",
            "abs",
            "loss",
            "taylor-gradnorm |s|, loss (ours, default)",
            # the label predates `--cost macs` becoming the default; it stays as written for the hash
            title="taylor-gradnorm |s|, loss, the paper's plain ranking (ours, --cost none)",
        ),
        Method(
            "tgn-sq-loss", "polyprune", "taylor-gradnorm", "sq", "loss", "taylor-gradnorm s², loss (ours)"
        ),
        Method(
            "tgn-abs-random",
            "polyprune",
            "taylor-gradnorm",
            "abs",
            "random",
            "taylor-gradnorm |s|, random signal (ours, label-free)",
        ),
        Method(
            "tgn-sq-random",
            "polyprune",
            "taylor-gradnorm",
            "sq",
            "random",
            "taylor-gradnorm s², random signal (ours, label-free)",
        ),
        Method("taylor", "polyprune", "taylor", "abs", "loss", "Molchanov Taylor-FO on BN outputs"),
        Method("l1", "polyprune", "l1", label="filter L1 norm"),
        Method(
            "bn-scale", "polyprune", "bn-scale", label="|BN gamma| (Network Slimming, no sparsity training)"
        ),
        Method("random", "polyprune", "random", label="random filters"),
        Method(
            "tgn-abs-loss-distill",
            "polyprune",
            "taylor-gradnorm",
            label="taylor-gradnorm |s|, loss, fine-tuned with distillation from the parent (--distill 1)",
            distill=1.0,
        ),
        Method(
            "tgn-abs-loss-cost-macs",
            "polyprune",
            "taylor-gradnorm",
            label="taylor-gradnorm |s|, loss, ranked per MAC saved (--cost macs)",
            cost="macs",
            title="taylor-gradnorm |s|, loss, ranked per MAC saved (ours, default: --cost macs)",
        ),
        Method(
            "tp-taylor",
            "torch-pruning",
            "tp-taylor",
            label="torch-pruning MetaPruner + GroupTaylorImportance",
            round_to=1,  # torch-pruning's default; its round-down with 8 halves 16-wide layers per step
        ),
        Method(
            "tp-magnitude",
            "torch-pruning",
            "tp-magnitude",
            label="torch-pruning MetaPruner + MagnitudeImportance (L2)",
            round_to=1,  # torch-pruning's default; its round-down with 8 halves 16-wide layers per step
        ),
        Method("scratch", "scratch", label="uniform-width UNet trained from scratch at the same MACs"),
    )
}
PRUNING_METHODS = tuple(n for n, m in METHODS.items() if m.engine != "scratch")


@dataclass(frozen=True)
class ParentSpec:
    """The parent UNet the harness trains when --parent is not given."""

    width: int = 16
    size: int = 192
    epochs: int = 25
    batch: int = 8
    lr: float = 1e-3
    seed: int = 0
    train_limit: int | None = None  # smoke: train on the first N ids (sorted) of the training pool


@dataclass(frozen=True)
class Grid:
    name: str
    methods: tuple[str, ...]
    targets: tuple[float, ...]  # fractions of the parent's MACs
    seeds: tuple[int, ...]
    prune_steps: int  # prune -> fine-tune rounds per cell (geometric MACs schedule)
    finetune_iters: int  # total fine-tuning optimizer steps per cell, split evenly over the rounds
    oneshot_methods: tuple[str, ...]
    oneshot_ratios: tuple[float, ...]  # fractions of filters removed (0 = the parent)
    finetune_lr: float = 1e-4  # `polyprune prune`'s default
    batch: int = 8
    n_images: int = 64  # calibration images per scoring (data-driven criteria, tp-taylor)
    latency_sizes: tuple[int, ...] = (256, 352)
    latency_runs: int = 30
    latency_warmup: int = 5
    latency_threads: int = 2
    # the final pass's rest before each model's turn (idle ONNX Runtime threads stop spinning); not in any
    # cell's hash: it changes no cell's own record
    latency_pause_s: float = 0.5
    test_limit: int | None = None  # smoke: the first N ids of each test split
    parent: ParentSpec = field(default_factory=ParentSpec)
    # methods run at other targets than `targets` (cells cut to fit the budget): ((method, (t, ...)), ...)
    method_targets: tuple[tuple[str, tuple[float, ...]], ...] = ()
    zoo_parent: str | None = "zoo/unet-mobilenetv2-pranet352.safetensors"  # None: train grid.parent
    # single cells cut to fit the budget, once earlier cells showed what they would say: ((method, target,
    # seed), ...); not in any cell's hash, so cutting (or restoring) one leaves every other cell's folder
    cut_cells: tuple[tuple[str, float, int], ...] = ()

    def targets_of(self, method: str) -> tuple[float, ...]:
        return dict(self.method_targets).get(method, self.targets)

    def has_cell(self, method: str, target: float, seed: int) -> bool:
        return target in self.targets_of(method) and (method, target, seed) not in self.cut_cells


GRIDS: dict[str, Grid] = {
    # ~6.4 CPU hours on this 2-core machine with the zoo MobileNetV2-UNet parent (352 px): 28 pruning cells of
    # 1000 fine-tuning steps (~11 min each at 1 thread), 2 scratch cells of parent + 1000 steps (~40 min),
    # 11 one-shot curves at 5 ratios (~40 min).
    # Cut to fit, before the fine-tuning budget: the 10 % target; tgn-sq-*, tgn-abs-random, bn-scale and
    # random as cells (their one-shot curves stay); scratch at 50 %.
    "full": Grid(
        name="full",
        methods=(
            "tgn-abs-loss",
            "tgn-abs-loss-distill",
            "tgn-abs-loss-cost-macs",
            "taylor",
            "l1",
            "tp-taylor",
            "tp-magnitude",
            "scratch",
        ),
        targets=(0.5, 0.25),
        seeds=(0, 1),
        prune_steps=2,
        finetune_iters=1000,
        # distillation only changes fine-tuning: no one-shot curve of its own
        oneshot_methods=tuple(m for m in PRUNING_METHODS if not METHODS[m].distill),
        oneshot_ratios=(0.0, 0.1, 0.2, 0.3, 0.4, 0.6),
        method_targets=(("scratch", (0.25,)),),
        # cut after seed 0 at 50 %: tp-magnitude's model was dead after its first step (val Dice 0.000, the
        # 32-channel stem cut to 2; one-shot 0.000 from 10 % of the filters) and did not recover in 500
        # steps; l1 kept 0.387 Kvasir Dice. Their other cells would cost ~65 CPU min for no new question.
        cut_cells=(
            ("tp-magnitude", 0.25, 0),
            ("tp-magnitude", 0.5, 1),
            ("tp-magnitude", 0.25, 1),
            ("l1", 0.5, 1),
            ("l1", 0.25, 1),
        ),
    ),
    # under 30 minutes (zoo parent, 2 threads): our default criterion against L1 and torch-pruning at 50 %
    "quick": Grid(
        name="quick",
        methods=("tgn-abs-loss", "l1", "tp-taylor"),
        targets=(0.5,),
        seeds=(0,),
        prune_steps=2,
        finetune_iters=150,
        oneshot_methods=("tgn-abs-loss", "l1", "tp-taylor"),
        oneshot_ratios=(0.0, 0.3, 0.6),
        latency_runs=20,
    ),
    "smoke": Grid(
        name="smoke",
        methods=("tgn-abs-loss", "tp-taylor", "scratch"),
        targets=(0.5,),
        seeds=(0,),
        prune_steps=2,
        finetune_iters=4,
        oneshot_methods=("tgn-abs-loss", "tp-taylor"),
        oneshot_ratios=(0.0, 0.3, 0.6),
        n_images=16,
        latency_runs=20,
        latency_warmup=3,
        latency_pause_s=0.05,  # tiny models: a short rest is enough, and the smoke test stays short
        test_limit=20,
        parent=ParentSpec(width=8, size=64, epochs=5, train_limit=110),
        zoo_parent=None,
    ),
}


def make_grid(
    name: str,
    *,
    seeds: list[int] | None = None,
    methods: list[str] | None = None,
    targets: list[float] | None = None,
) -> Grid:
    grid = GRIDS[name]
    if seeds:
        grid = replace(grid, seeds=tuple(seeds))
    if targets:
        bad = [t for t in targets if not 0 < t < 1]
        if bad:
            raise ValueError(f"targets are fractions of the parent's MACs in (0, 1), got {bad}")
        grid = replace(grid, targets=tuple(sorted(set(targets), reverse=True)))
    if methods:
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        grid = replace(
            grid, methods=tuple(methods), oneshot_methods=tuple(m for m in methods if m != "scratch")
        )
    return grid


# ------------------------------------------------------------------------------------------ cells


@dataclass(frozen=True)
class Cell:
    method: str
    target: float
    seed: int
    key: str  # short hash of everything that changes the result

    @property
    def name(self) -> str:
        return f"{self.method}_t{round(self.target * 100):03d}_s{self.seed}_{self.key}"

    @property
    def label(self) -> str:
        return f"{self.method} @ {self.target:.0%} MACs, seed {self.seed}"


def short_hash(obj: Any, n: int = 8) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def cell_config(grid: Grid, method: str, target: float, seed: int, parent_id: str) -> dict[str, Any]:
    """Everything a cell's result depends on (its hash names the cell's folder)."""
    cfg = asdict(grid)
    for k in (
        "name",
        "methods",
        "targets",
        "seeds",
        "oneshot_methods",
        "oneshot_ratios",
        "cut_cells",
        "latency_pause_s",
    ):
        cfg.pop(k)
    cfg.pop("parent")  # the parent is identified by parent_id (hash of its file)
    return {"method": METHODS[method].record(), "target": target, "seed": seed, "parent": parent_id, **cfg}


def make_cells(grid: Grid, parent_id: str) -> list[Cell]:
    """Every (method, target, seed) of the grid, ordered: for each seed, for each target, each method."""
    cells = []
    for seed in grid.seeds:
        for target in grid.targets:
            for method in grid.methods:
                if not grid.has_cell(method, target, seed):
                    continue
                key = short_hash(cell_config(grid, method, target, seed, parent_id))
                cells.append(Cell(method, target, seed, key))
    return cells


def cell_dir(work: Path, cell: Cell) -> Path:
    return Path(work) / "cells" / cell.name


def is_done(folder: Path) -> bool:
    return (Path(folder) / "done.json").is_file()


def pending(work: Path, cells: list[Cell]) -> list[Cell]:
    """The cells without a done.json, in grid order (what a resumed run still has to do)."""
    return [c for c in cells if not is_done(cell_dir(work, c))]


def read_done(work: Path, cells: list[Cell]) -> list[dict[str, Any]]:
    out = []
    for c in cells:
        path = cell_dir(work, c) / "done.json"
        if path.is_file():
            out.append(json.loads(path.read_text()))
    return out


# ---------------------------------------------------------------------------------- time estimate


def estimate_minutes(
    grid: Grid, cells: list[Cell], sec_per_step: float, parent_steps: int
) -> dict[str, float]:
    """Rough wall time in minutes from the parent's measured seconds per training step (batch `grid.batch`).

    A model at a fraction f of the parent's MACs trains at about f**0.7 of its step time on this CPU
    (thin layers parallelise worse); scoring is ~n_images/batch steps per round; evaluation (162 test
    images at GT resolution) and ORT latency (2 exports + runs) cost about 40 x parent steps per cell.
    """
    per_cell_overhead = 40 * sec_per_step
    minutes: dict[str, float] = {"cells": 0.0}
    for c in cells:
        f = c.target**0.7
        if METHODS[c.method].engine == "scratch":
            s = (parent_steps + grid.finetune_iters) * sec_per_step * f
        else:
            scoring = grid.prune_steps * math.ceil(grid.n_images / grid.batch) * sec_per_step
            s = grid.finetune_iters * sec_per_step * f + scoring
        minutes["cells"] += (s + per_cell_overhead) / 60
    n_oneshot = len(grid.oneshot_methods) * max(0, len(grid.oneshot_ratios) - 1)
    minutes["oneshot"] = n_oneshot * (math.ceil(grid.n_images / grid.batch) + 10) * sec_per_step / 60
    minutes["total"] = minutes["cells"] + minutes["oneshot"]
    return minutes
