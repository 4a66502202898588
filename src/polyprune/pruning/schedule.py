"""`polyprune prune`: iterative prune -> fine-tune to a target, with a trajectory and resume.

    step i:  score filters on the calibration images (n_images of the training split, no augmentation)
             remove step_ratio of the REMAINING filters (global ranking, widths rounded, see engine.py)
             -- for params / MACs targets a step never goes past the target: it stops exactly there
             fine-tune (finetune_epochs or finetune_iters); keep the better of pruned / fine-tuned by val Dice
             measure params, MACs, latency (batch 1, `size`, backend), val Dice; append to trajectory.json
    until    target_params / target_macs: params / MACs <= fraction * parent's
             target_fps: measured fps >= F
             max_dice_drop D: a step's val Dice < parent - D; the result is then the last step within D
    then     final_epochs of fine-tuning (with resume) and RUN/model.safetensors

`one_shot` prunes straight to a params / MACs target in one step without fine-tuning (for fps and Dice
targets: the same steps, without fine-tuning); final_epochs still applies.

RUN/ holds trajectory.json (atomic, rewritten after every step), steps/step_NNN.safetensors (one model
per completed step), checkpoint/ (the final fine-tune's resume state) and model.safetensors. A killed
run restarted with resume=True continues after its last completed step.

Under torchrun (K processes) every rank runs the same schedule on identical models: importance is
scored on each rank's share of the calibration images and all-reduced (see importance.py), so every
rank removes the same filters; fine-tuning is DDP (train.fit wraps the pruned model anew each time);
validation Dice is all-reduced; latency is measured on rank 0 and broadcast, so every rank takes the
same decisions. After every step `assert_same_across_ranks` compares the layer widths and fails
loudly on any mismatch. Only rank 0 writes RUN/; the other ranks read step files after a barrier
(several nodes: RUN/ must be on a filesystem all nodes share, as must the parent model and data).
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from polyprune import distributed as dist_utils
from polyprune.checks import check_number, check_size, check_threads
from polyprune.counting import check_training_memory, count_macs, count_params
from polyprune.errors import ConfigError, TargetError
from polyprune.files import read_json, run_folder, write_json
from polyprune.io import load_model, save_model
from polyprune.progress import is_main_process, log, progress_bar
from polyprune.pruning.engine import SCOPES, prune_model
from polyprune.pruning.importance import CRITERIA, REDUCES, SIGNALS
from polyprune.structure import layer_widths

BACKENDS = ("torch", "onnxruntime", "openvino")


@dataclass
class PruneConfig:
    model: str
    data: list[str]
    out: str
    criterion: str = "taylor-gradnorm"
    reduce: str = "abs"
    signal: str = "loss"
    n_images: int = 64
    target_params: float | None = None
    target_macs: float | None = None
    target_fps: float | None = None
    max_dice_drop: float | None = None
    size: int | None = None  # MACs / latency input size; default: the model's own input size
    backend: str = "torch"
    latency_runs: int = 20
    int8: bool = False  # latency of the INT8 deployment (onnxruntime / openvino backends)
    step_ratio: float = 0.1
    finetune_epochs: int | None = None  # default 1 when finetune_iters is not given
    finetune_iters: int | None = None
    final_epochs: int = 0
    one_shot: bool = False
    scope: str = "global"
    round_to: int = 8
    min_channels: int = 4
    group_reduce: str = "sum"
    cost: str = "none"  # none | macs | params: rank importance per MAC (param) saved
    ignore: list[str] = field(default_factory=list)  # layer names never pruned (e.g. a pretrained stem)
    max_steps: int = 100
    batch: int = 8
    lr: float = 1e-4
    weight_decay: float = 1e-4
    loss: str = "bce-dice"
    distill: float = 0.0  # weight of the loss to the unpruned parent's probabilities while fine-tuning
    distill_temperature: float = 1.0
    seed: int = 0
    threads: int | None = None
    device: str = "auto"
    precision: str = "auto"
    ids_file: list[str] = field(default_factory=list)
    exclude_ids: list[str] = field(default_factory=list)
    val_fraction: float = 0.1
    skip_bad: bool = False
    resume: bool = False
    overwrite: bool = False  # clear a non-empty run folder instead of refusing it
    progress: bool = True


def check_config(cfg: PruneConfig) -> None:
    """ConfigError for any option that cannot work, before anything is loaded."""
    from polyprune.fit import check_training_numbers

    if cfg.size is not None:
        check_size(cfg.size)
    check_training_numbers(lr=cfg.lr, weight_decay=cfg.weight_decay, batch=cfg.batch, seed=cfg.seed)
    check_number("distill", cfg.distill, low=0, high=100)
    check_number("distill_temperature", cfg.distill_temperature, low=0, low_open=True, high=100)
    check_threads(cfg.threads)
    targets = {
        k: getattr(cfg, k)
        for k in ("target_params", "target_macs", "target_fps", "max_dice_drop")
        if getattr(cfg, k) is not None
    }
    if len(targets) != 1:
        got = ", ".join(f"--{k.replace('_', '-')}" for k in targets) or "none"
        raise ConfigError(
            f"give exactly one target: --target-params, --target-macs, --target-fps or --max-dice-drop (got {got})"
        )
    for k in ("target_params", "target_macs"):
        v = getattr(cfg, k)
        if v is not None and not 0 < v < 1:
            raise ConfigError(f"--{k.replace('_', '-')} must be a fraction of the parent in (0, 1), got {v}")
    if cfg.target_fps is not None and cfg.target_fps <= 0:
        raise ConfigError(f"--target-fps must be > 0, got {cfg.target_fps}")
    if cfg.max_dice_drop is not None and not 0 <= cfg.max_dice_drop < 1:
        raise ConfigError(f"--max-dice-drop must be in [0, 1), got {cfg.max_dice_drop}")
    if cfg.criterion not in CRITERIA:
        raise ConfigError(f"unknown criterion {cfg.criterion!r}; choose from {', '.join(CRITERIA)}")
    if cfg.reduce not in REDUCES:
        raise ConfigError(f"--reduce must be one of {', '.join(REDUCES)}, got {cfg.reduce!r}")
    if cfg.signal not in SIGNALS:
        raise ConfigError(f"--signal must be one of {', '.join(SIGNALS)}, got {cfg.signal!r}")
    if cfg.scope not in SCOPES:
        raise ConfigError(f"--scope must be one of {', '.join(SCOPES)}, got {cfg.scope!r}")
    if cfg.backend not in BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {cfg.backend!r}")
    _latency_fn(cfg.backend)
    if not 0 < cfg.step_ratio < 1:
        raise ConfigError(f"--step-ratio must be in (0, 1), got {cfg.step_ratio}")
    if cfg.finetune_epochs is not None and cfg.finetune_iters is not None:
        raise ConfigError("give --finetune-epochs or --finetune-iters, not both")
    for k in ("finetune_epochs", "finetune_iters"):
        v = getattr(cfg, k)
        if v is not None and v < 0:
            raise ConfigError(f"--{k.replace('_', '-')} must be >= 0, got {v}")
    if cfg.final_epochs < 0:
        raise ConfigError(f"--final-epochs must be >= 0, got {cfg.final_epochs}")
    if cfg.n_images < 1:
        raise ConfigError(f"--n-images must be >= 1, got {cfg.n_images}")
    if cfg.int8 and cfg.backend == "torch":
        raise ConfigError("--int8 latency needs --backend onnxruntime or openvino (torch runs fp32)")
    if cfg.latency_runs < 1:
        raise ConfigError(f"latency runs must be >= 1, got {cfg.latency_runs}")
    if cfg.max_steps < 1:
        raise ConfigError(f"max_steps must be >= 1, got {cfg.max_steps}")


def _latency_fn(backend: str) -> Any:
    """polyprune.latency.<backend>_latency(model, size, *, runs, threads) -> Latency."""
    from polyprune import latency

    fn = getattr(latency, f"{backend}_latency", None)
    if fn is None:
        raise ConfigError(f"--backend {backend} is not available: polyprune.latency has no {backend}_latency")
    return fn


def measure_latency(
    model: nn.Module,
    size: int,
    backend: str,
    runs: int,
    threads: int | None,
    int8_calib: list[Path] | None = None,
) -> float:
    """Median ms at batch 1; runtimes other than torch get a CPU copy of the model. `int8_calib`: time
    the INT8 deployment instead (quantized on those images), as `--int8` asks."""
    from polyprune.latency import int8_latency

    if backend != "torch" and next(model.parameters()).device.type != "cpu":
        model = copy.deepcopy(model).cpu()
    if int8_calib:
        lat = int8_latency(model, size, int8_calib, backend=backend, runs=runs, threads=threads)
    else:
        lat = _latency_fn(backend)(model, size, runs=runs, threads=threads)
    return float(lat.median_ms)


INT8_CALIB_IMAGES = 16  # per latency measurement: latency does not depend on the ranges it finds


def _image_paths(ds: Any) -> list[Path]:
    """The image files of a SegmentationDataset, or of the parts of an EpochConcat, in order."""
    parts = getattr(ds, "datasets", None)
    if parts is not None:
        return [p for part in parts for p in _image_paths(part)]
    return [s.image for s in ds.samples]


class _Run:
    """What a prune run needs besides its trajectory: parent, data, device, and how to measure / save."""

    def __init__(self, cfg: PruneConfig) -> None:
        from polyprune.device import resolve_device, set_threads
        from polyprune.train import make_datasets

        self.cfg = cfg
        self.out = Path(cfg.out)
        self.steps_dir = self.out / "steps"
        set_threads(cfg.threads)
        self.device = dist_utils.local_device(resolve_device(cfg.device))
        parent = load_model(cfg.model)
        self.meta = parent.polyprune_meta  # type: ignore[attr-defined]
        self.spec = self.meta.input
        self.size = cfg.size if cfg.size is not None else self.spec.size
        check_size(self.size, int(getattr(parent, "stride", 1)))
        # the parent itself is pruned in place below: distillation needs an unpruned copy
        self.teacher = copy.deepcopy(parent).eval() if cfg.distill > 0 else None
        check_training_memory(copy.deepcopy(parent).to("meta"), self.spec.size, cfg.batch)
        self.train_ds, self.val_ds = make_datasets(
            cfg.data,
            self.spec,
            ids_file=cfg.ids_file or None,
            exclude_ids_file=cfg.exclude_ids or None,
            val_fraction=cfg.val_fraction,
            seed=cfg.seed,
            augment=True,
            skip_bad=cfg.skip_bad,
        )
        plain_train = self.train_ds.unaugmented()  # calibration images: no augmentation, no re-decoding
        self.int8_calib = _image_paths(self.train_ds)[:INT8_CALIB_IMAGES] if cfg.int8 else None
        if cfg.max_dice_drop is not None and len(self.val_ds) == 0:
            raise ConfigError("--max-dice-drop needs a validation split (is --val-fraction 0?)")
        # calibration: a seeded subset of the training split, without augmentation (same seed, same scores);
        # under K ranks each rank scores every K-th image of a loader batch, i.e. `batch` images per pass
        perm = torch.randperm(len(plain_train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        self.calibration = DataLoader(
            Subset(plain_train, perm[: cfg.n_images]), batch_size=cfg.batch * dist_utils.world_size()
        )
        self.parent = parent.to(self.device)
        self.parent_path = str(Path(cfg.model))
        self.traj_path = self.out / "trajectory.json"

    # ------------------------------------------------------------------------------ measuring

    def measure(self, model: nn.Module) -> dict[str, Any]:
        """Params, MACs, latency: measured on rank 0 and broadcast, so every rank decides alike."""
        row = None
        if dist_utils.rank() == 0:
            row = {
                "params": count_params(model),
                "macs": count_macs(model, self.size),
                "latency_ms": measure_latency(
                    model,
                    self.size,
                    self.cfg.backend,
                    self.cfg.latency_runs,
                    self.cfg.threads,
                    self.int8_calib,
                ),
                "size": self.size,
                "backend": self.cfg.backend + (" int8" if self.cfg.int8 else ""),
            }
        return dist_utils.broadcast_object(row)

    def dice(self, model: nn.Module) -> float:
        from polyprune.fit import validation_dice

        if len(self.val_ds) == 0:
            return float("nan")
        return validation_dice(
            model, self.val_ds, batch=self.cfg.batch, device=self.device, precision=self.cfg.precision
        )

    def finetune(
        self, model: nn.Module, *, epochs: int | None, iters: int | None, seed: int, desc: str, **kw: Any
    ) -> None:
        from polyprune.fit import fit

        fit(
            model,
            self.train_ds,
            self.val_ds if len(self.val_ds) else None,
            epochs=epochs,
            iters=iters,
            batch=self.cfg.batch,
            lr=self.cfg.lr,
            weight_decay=self.cfg.weight_decay,
            loss=self.cfg.loss,
            device=self.device,
            precision=self.cfg.precision,
            seed=seed,
            progress=self.cfg.progress,
            desc=desc,
            teacher=self.teacher,
            distill=self.cfg.distill,
            temperature=self.cfg.distill_temperature,
            **kw,
        )

    # ------------------------------------------------------------------------------ files

    def step_path(self, step: int) -> Path:
        return Path(self.parent_path) if step == 0 else self.steps_dir / f"step_{step:03d}.safetensors"

    def save(self, path: Path, model: nn.Module, traj: dict[str, Any], history: list, upto: int) -> None:
        if not is_main_process():
            return
        save_model(
            path,
            model,
            input_spec=self.spec,
            parent=traj["parent"],
            train={"parent": self.meta.train, "finetune": traj["finetune"]},
            pruning={
                "criterion": self.cfg.criterion,
                "options": traj["options"],
                "steps": [_short_row(r) for r in traj["steps"][1 : upto + 1]],
                "history": history,
            },
        )

    def write_trajectory(self, traj: dict[str, Any]) -> None:
        if is_main_process():
            write_json(self.traj_path, traj)

    def load_step(self, step: int) -> tuple[nn.Module, list]:
        dist_utils.barrier()  # rank 0 may have just written the file
        model = load_model(self.step_path(step))
        history = model.polyprune_meta.pruning.get("history", []) if step else []  # type: ignore[attr-defined]
        return model.to(self.device), list(history)


def _short_row(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "widths"}


def _new_trajectory(run: _Run) -> dict[str, Any]:
    cfg = run.cfg
    parent_row = {"step": 0, "filters_removed": 0, **run.measure(run.parent)}
    d0 = run.dice(run.parent)
    parent_row.update(
        val_dice_before_finetune=d0, val_dice_after_finetune=d0, val_dice=d0, widths=layer_widths(run.parent)
    )
    return {
        "parent": {
            "path": run.parent_path,
            "arch": run.meta.arch,
            "params": parent_row["params"],
            "macs": parent_row["macs"],
            "latency_ms": parent_row["latency_ms"],
            "val_dice": d0,
            "size": run.size,
        },
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("resume", "overwrite", "progress")},
        "options": {
            k: getattr(cfg, k)
            for k in (
                "reduce",
                "signal",
                "n_images",
                "scope",
                "round_to",
                "min_channels",
                "group_reduce",
                "seed",
            )
        },
        "finetune": {
            "epochs": cfg.finetune_epochs,
            "iters": cfg.finetune_iters,
            "final_epochs": cfg.final_epochs,
            "lr": cfg.lr,
            "batch": cfg.batch,
            "loss": cfg.loss,
        },
        "steps": [parent_row],
        "state": "pruning",  # pruning -> final -> done
        "final_step": None,
        "final": None,
    }


def _target_reached(cfg: PruneConfig, traj: dict[str, Any], row: dict[str, Any]) -> bool:
    p = traj["parent"]
    if cfg.target_params is not None:
        return row["params"] <= cfg.target_params * p["params"]
    if cfg.target_macs is not None:
        return row["macs"] <= cfg.target_macs * p["macs"]
    if cfg.target_fps is not None:
        return 1000.0 / row["latency_ms"] >= cfg.target_fps
    return False  # max_dice_drop: prune until the budget is spent


def _step_target(cfg: PruneConfig, traj: dict[str, Any], current: dict[str, Any]) -> dict[str, float]:
    """This step's target for prune_model: step_ratio of the remaining filters, never past the final target."""
    p = traj["parent"]
    target: dict[str, float] = {}
    if not cfg.one_shot:
        target["ratio"] = cfg.step_ratio
    if cfg.target_params is not None:
        target["params"] = min(1.0, cfg.target_params * p["params"] / current["params"])
    elif cfg.target_macs is not None:
        target["macs"] = min(1.0, cfg.target_macs * p["macs"] / current["macs"])
    elif cfg.one_shot:
        target["ratio"] = cfg.step_ratio  # fps / Dice targets step without fine-tuning
    return target


def _check_reachable(run: _Run) -> None:
    """TargetError now, not after hours of fine-tuning: widths are what limit a params / MACs target."""

    cfg = run.cfg
    if cfg.target_params is None and cfg.target_macs is None:
        return
    target = {"params": cfg.target_params} if cfg.target_params is not None else {"macs": cfg.target_macs}
    # how far pruning can go depends on the widths only, not on the scores (bn-scale: on which groups)
    crit = "bn-scale" if cfg.criterion == "bn-scale" else "l1"
    prune_model(
        copy.deepcopy(run.parent),
        torch.zeros(1, 3, run.size, run.size, device=run.device),
        None,
        crit,
        target,  # type: ignore[arg-type]
        min_channels=cfg.min_channels,
        round_to=cfg.round_to,
        scope=cfg.scope,
        ignored_layers=cfg.ignore or None,
    )


def _check_widths(model: nn.Module, what: str) -> None:
    """Every rank must hold the same architecture (DistributedMismatchError otherwise)."""
    dist_utils.assert_same_across_ranks(layer_widths(model), f"layer widths {what}")


def prune_run(cfg: PruneConfig) -> dict[str, Any]:
    """Run (or resume) `polyprune prune`; returns the summary that the CLI prints.

    Under torchrun: joins the process group (gloo on CPU, nccl on GPU) and leaves it at the end.
    """
    check_config(cfg)
    owned = dist_utils.setup(cfg.device)
    claim = (
        run_folder(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite)
        if is_main_process()  # RANK from torchrun's environment: the process group is not up yet
        else contextlib.nullcontext()
    )
    with claim:
        summary = _prune_run(cfg)
    dist_utils.barrier()
    if owned:
        dist_utils.teardown()
    return summary


# options that change neither the result nor the decisions: a resume may differ in these
RESUME_FREE = ("resume", "overwrite", "progress", "threads", "device")


def _check_same_options(traj_path: Path, was: dict[str, Any], cfg: PruneConfig) -> None:
    """`--resume` continues the same run: refuse options that would give another result."""
    now = {k: v for k, v in asdict(cfg).items() if k not in RESUME_FREE}
    changed = [f"{k} {was[k]!r} -> {v!r}" for k, v in now.items() if k in was and was[k] != v]
    if changed:
        raise ConfigError(
            f"--resume would change the run in {traj_path.parent} ({'; '.join(changed)}): resume with the "
            "first run's options, or prune into a new --out"
        )


def _prune_run(cfg: PruneConfig) -> dict[str, Any]:
    from polyprune.device import seed_everything

    run = _Run(cfg)
    traj: dict[str, Any] | None = None
    if cfg.resume and dist_utils.rank() == 0 and run.traj_path.is_file():
        traj = read_json(run.traj_path)
    traj = dist_utils.broadcast_object(traj)  # rank 0 decides: resume or start afresh
    if traj is not None and traj.get("config", {}).get("model") != cfg.model:
        raise ConfigError(
            f"--resume: {run.traj_path} belongs to a run on another model ({traj['config']['model']})"
        )
    if traj is not None:
        _check_same_options(run.traj_path, traj.get("config", {}), cfg)
    if traj is None:
        _check_reachable(run)
        traj = _new_trajectory(run)
        run.write_trajectory(traj)
    p = traj["parent"]
    t_start = time.perf_counter()
    ft_iters = cfg.finetune_iters if not cfg.one_shot else None
    ft_epochs = (
        None
        if cfg.one_shot or ft_iters is not None
        else (cfg.finetune_epochs if cfg.finetune_epochs is not None else 1)
    )

    # ---------------------------------------------------------------------------------- pruning steps
    if traj["state"] == "pruning":
        last = traj["steps"][-1]["step"]
        model, history = run.load_step(last) if last else (run.parent, [])
        if last:
            log(f"resuming after step {last}", enabled=cfg.progress)
        _check_widths(model, f"at step {last}")
        while traj["state"] == "pruning":
            step = traj["steps"][-1]["step"] + 1
            prev = traj["steps"][-1]
            if step > cfg.max_steps:
                _stop_or_fail(cfg, traj, prev, f"reached max_steps={cfg.max_steps}")
                run.write_trajectory(traj)
                break
            seed_everything(cfg.seed + step)
            t0 = time.perf_counter()
            with progress_bar(2, f"step {step}: score + prune", enabled=cfg.progress) as bar:
                try:
                    result = prune_model(
                        model,
                        torch.zeros(1, 3, run.size, run.size, device=run.device),
                        run.calibration,
                        cfg.criterion,
                        _step_target(cfg, traj, prev),
                        reduce=cfg.reduce,
                        signal=cfg.signal,
                        loss_fn=_loss(cfg.loss),
                        n_images=cfg.n_images,
                        min_channels=cfg.min_channels,
                        round_to=cfg.round_to,
                        scope=cfg.scope,
                        group_reduce=cfg.group_reduce,
                        cost=cfg.cost,
                        ignored_layers=cfg.ignore or None,
                        seed=cfg.seed + step,
                    )
                except TargetError as exc:  # nothing more can be removed
                    _stop_or_fail(cfg, traj, prev, str(exc))
                    run.write_trajectory(traj)
                    break
                bar.advance(1, removed=result.filters_removed)
                d_before = run.dice(model)
                bar.advance(1, val_dice=f"{d_before:.4f}")
            history += result.history
            d_after: float | None = None
            kept = "pruned"
            if ft_epochs or ft_iters:  # fit shows its own bar (rich allows one live display at a time)
                pruned_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                run.finetune(
                    model,
                    epochs=ft_epochs,
                    iters=ft_iters,
                    seed=cfg.seed + step,
                    desc=f"step {step} fine-tune",
                )
                d_after = run.dice(model)
                kept = "finetuned"
                if d_before > d_after:  # fit keeps its best epoch; the pruned weights may be better still
                    model.load_state_dict(pruned_state)
                    kept = "pruned"
            row = {"step": step, "filters_removed": result.filters_removed, **run.measure(model)}
            val = d_after if kept == "finetuned" else d_before
            row.update(
                val_dice_before_finetune=d_before,
                val_dice_after_finetune=d_after,
                val_dice=val,
                kept=kept,
                seconds=time.perf_counter() - t0,
                checkpoint=str(run.step_path(step).relative_to(run.out)),
                widths=layer_widths(model),
            )
            _check_widths(model, f"after step {step}")
            traj["steps"].append(row)
            run.save(run.step_path(step), model, traj, history, step)
            log(
                f"step {step}: params {row['params'] / p['params']:.1%}, MACs {row['macs'] / p['macs']:.1%}, "
                f"{row['latency_ms']:.1f} ms, val Dice {d_before:.4f} -> {val:.4f} (parent {p['val_dice']:.4f})",
                enabled=cfg.progress,
            )
            if cfg.max_dice_drop is not None and not val >= p["val_dice"] - cfg.max_dice_drop:
                row["within_dice_drop"] = False
                traj.update(state="final", final_step=step - 1)
            elif _target_reached(cfg, traj, row):
                traj.update(state="final", final_step=step)
            run.write_trajectory(traj)

    # ---------------------------------------------------------------------------------- final fine-tune
    if traj["state"] == "final":
        final_step = traj["final_step"]
        model, history = run.load_step(final_step)
        if cfg.final_epochs > 0:
            seed_everything(cfg.seed + 10_000)
            run.finetune(
                model,
                epochs=cfg.final_epochs,
                iters=None,
                seed=cfg.seed + 10_000,
                desc="final fine-tune",
                checkpoint_dir=run.out / "checkpoint",
                resume=cfg.resume,
            )
        _check_widths(model, "of the final model")
        final = {
            "step": final_step,
            **run.measure(model),
            "val_dice": run.dice(model),
            "widths": layer_widths(model),
        }
        traj.update(final=final, state="done")
        run.save(run.out / "model.safetensors", model, traj, history, final_step)
        run.write_trajectory(traj)

    final = traj["final"]
    summary = {
        "model": str(run.out / "model.safetensors"),
        "trajectory": str(run.traj_path),
        "criterion": cfg.criterion,
        "steps": len(traj["steps"]) - 1,
        "final_step": traj["final_step"],
        "parent": {k: p[k] for k in ("params", "macs", "latency_ms", "val_dice")},
        "child": {k: final[k] for k in ("params", "macs", "latency_ms", "val_dice")},
        "params_fraction": final["params"] / p["params"],
        "macs_fraction": final["macs"] / p["macs"],
        "size": run.size,
        "backend": cfg.backend,
        "minutes": (time.perf_counter() - t_start) / 60,
    }
    return summary


def _loss(name: str) -> Any:
    from polyprune.losses import make_loss

    return make_loss(name)


def _stop_or_fail(cfg: PruneConfig, traj: dict[str, Any], prev: dict[str, Any], why: str) -> None:
    """No further step is possible: a Dice budget ends at the last step; any other target was missed."""
    if cfg.max_dice_drop is not None:
        traj.update(state="final", final_step=prev["step"])
        return
    if cfg.target_fps is not None:
        fps = 1000.0 / prev["latency_ms"]
        raise TargetError(
            f"--target-fps {cfg.target_fps:g} cannot be met: best {fps:.1f} fps at step {prev['step']} ({why})"
        )
    raise TargetError(f"pruning target not met after step {prev['step']}: {why}")
