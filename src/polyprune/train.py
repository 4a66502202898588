"""Training and fine-tuning: one loop (`fit`) shared by `polyprune train` and the pruning schedule.

- AdamW, cosine learning rate over all steps (computed from the global step, so resume is exact).
- Loss `bce-dice` (BCE with logits + soft Dice, per image) or `structure` (PraNet: weighted BCE +
  weighted IoU, weights 1 + 5 |avgpool31(mask) - mask|).
- Best weights by validation Dice (per image, threshold 0.5, at the model's input size; an image with
  empty ground truth and empty prediction scores 1).
- Determinism: the shuffle of epoch e comes from a generator seeded with (seed, e) and augmentation of
  item i in epoch e from (seed, e, i), so a run resumed at an epoch boundary sees exactly the batches
  an uninterrupted run sees. On one machine with the same thread count the weights are identical.
- Resume: `checkpoint_dir/last.safetensors` holds weights, optimizer state, best weights and the loop
  state (JSON in the metadata), written atomically at the end of every epoch. Kill at any time; the
  run continues from the last finished epoch.
- Non-finite loss: the step is skipped (no update) and counted; 20 skipped steps in a row end the run
  with a TrainingError that suggests a lower --lr or --precision fp32.
- Under torchrun: DistributedSampler + DDP; only rank 0 writes files or prints.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler

from polyprune import distributed as dist_utils
from polyprune.checks import check_choice, check_int, check_number, check_seed, check_size, check_threads
from polyprune.errors import ConfigError, ModelFileError, TrainingError
from polyprune.io import (
    InputSpec,
    load_model,
    read_metadata,
    run_folder,
    save_model,
    save_tensors,
    write_json,
)
from polyprune.losses import LOSSES, distillation_loss, make_loss
from polyprune.progress import is_main_process, log, progress_bar

MAX_BAD_STEPS = 20


# ----------------------------------------------------------------------------------------- set-up


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA device is available")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' means bf16 autocast on CUDA, fp32 on CPU (bf16 on CPU is faster but opt-in)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"--precision must be auto, fp32 or bf16, got {precision!r}")
    return precision


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def set_threads(threads: int | None) -> None:
    """Default: all cores, shared out among the processes torchrun started on this machine."""
    check_threads(threads)
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // dist_utils.local_world_size()))


# ------------------------------------------------------------------------------------------- data


def _read_split_files(spec: str | Path | list | None) -> dict[str, list[str]]:
    """{split file: its ids} for one file, a list of files, or None (each file read once)."""
    from polyprune.data import read_ids

    files = spec if isinstance(spec, list) else [spec] if spec else []
    return {str(f): read_ids(f) for f in files}


def make_datasets(
    data_dirs: list[str | Path],
    spec: InputSpec,
    *,
    ids_file: str | Path | list | None = None,
    exclude_ids_file: str | Path | list | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    augment: bool = True,
    skip_bad: bool = False,
    progress: bool = False,
) -> tuple[Dataset, Dataset]:
    """Train (augmented) and validation datasets from one or more dataset folders.

    `exclude_ids_file` lists test ids (e.g. PraNet's split): they are never used. `ids_file`, if
    given, restricts the pool to those ids. The validation split is carved from what remains, per
    dataset folder, by a seeded shuffle: never from test data.
    """
    from polyprune.data import SegmentationDataset, find_samples, split_samples

    check_size(spec.size)
    if not data_dirs:
        raise ConfigError("no --data folder given")
    only_files, excluded_files = _read_split_files(ids_file), _read_split_files(exclude_ids_file)
    only = {i for ids in only_files.values() for i in ids}
    excluded = [i for ids in excluded_files.values() for i in ids]
    resolved = [Path(d).resolve() for d in data_dirs]
    twice = next((d for i, d in enumerate(data_dirs) if resolved[i] in resolved[:i]), None)
    if twice is not None:
        raise ConfigError(f"dataset folder given twice: {twice} (its images would count double)")
    found = {d: find_samples(d, skip_bad=skip_bad) for d in data_dirs}
    _check_split_ids(found, only_files, excluded_files)
    _check_data_memory(sum(len(v) for v in found.values()), spec.size)
    train_parts, val_parts = [], []
    for d in data_dirs:
        samples = found[d]
        if only:
            samples = [s for s in samples if s.id in only]
        if excluded:
            present = {s.id for s in samples}
            test_ids = [i for i in excluded if i in present]
        else:
            test_ids = None
        split = split_samples(samples, test_ids=test_ids or None, val_fraction=val_fraction, seed=seed)
        if not split.train:
            raise ConfigError(f"no training images left in {d} after the split")
        train_parts.append(
            SegmentationDataset(split.train, spec, augment=augment, seed=seed, skip_bad=skip_bad)
        )
        if split.val:
            val_parts.append(
                SegmentationDataset(split.val, spec, augment=False, seed=seed, skip_bad=skip_bad)
            )
    train_ds = train_parts[0] if len(train_parts) == 1 else EpochConcat(train_parts)
    val_ds = (
        (val_parts[0] if len(val_parts) == 1 else EpochConcat(val_parts)) if val_parts else EpochConcat([])
    )
    return train_ds, val_ds


def _check_data_memory(n_images: int, size: int) -> None:
    """The decoded set is held in memory (uint8 image + mask at the model size): refuse what cannot fit."""
    from polyprune.counting import available_memory_bytes

    need, avail = n_images * size * size * 4, available_memory_bytes()
    if avail is not None and need > 0.8 * avail:
        raise ConfigError(
            f"{n_images} images at size {size} take {need / 2**30:.1f} GiB in memory, more than the "
            f"{avail / 2**30:.1f} GiB available: lower --size"
        )


def _check_split_ids(
    found: dict, only_files: dict[str, list[str]], excluded_files: dict[str, list[str]]
) -> None:
    """A split file must match the data: test ids that match no image would leak the real test images
    into training (a wrong file, or ids of another dataset); unknown --ids are dropped images."""
    from polyprune.errors import DataError

    present = {s.id for samples in found.values() for s in samples}
    folders = ", ".join(str(d) for d in found)
    for f, ids in excluded_files.items():
        if not any(i in present for i in ids):
            raise DataError(
                f"none of the {len(ids)} test ids in {f} matches an image in {folders}: training would "
                "use the test images it should leave out (wrong split file?)"
            )
    for f, ids in only_files.items():
        absent = [i for i in ids if i not in present]
        if absent:
            raise DataError(
                f"{len(absent)} of the {len(ids)} ids in {f} are in no --data folder, e.g. {', '.join(absent[:3])}"
            )


class EpochConcat(ConcatDataset):
    """ConcatDataset that forwards set_epoch to its parts (augmentation is seeded per epoch)."""

    def __init__(self, datasets: list[Dataset]) -> None:
        if datasets:
            super().__init__(datasets)
        else:  # an empty validation set
            self.datasets, self.cumulative_sizes = [], []

    def __len__(self) -> int:
        return self.cumulative_sizes[-1] if self.cumulative_sizes else 0

    def unaugmented(self) -> EpochConcat:
        return EpochConcat([d.unaugmented() for d in self.datasets])

    def set_epoch(self, epoch: int) -> None:
        for d in self.datasets:
            if hasattr(d, "set_epoch"):
                d.set_epoch(epoch)


# ------------------------------------------------------------------------------------- validation


def dice_per_image(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice at threshold 0.5 for each image of a batch; empty GT and empty prediction -> 1."""
    pred = (logits.float() > 0).flatten(1).float()
    t = (target > 0.5).flatten(1).float()
    inter = (pred * t).sum(1)
    denom = pred.sum(1) + t.sum(1)
    return torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.ones_like(denom))


@torch.no_grad()
def validation_dice(
    model: nn.Module,
    val_ds: Dataset,
    *,
    batch: int = 8,
    device: str | torch.device = "auto",
    precision: str = "auto",
) -> float:
    """Mean per-image Dice@0.5 over `val_ds` (sharded over ranks under torchrun)."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    prec = resolve_precision(precision, dev)
    n = len(val_ds)
    if n == 0:
        return float("nan")
    indices = list(range(dist_utils.rank(), n, dist_utils.world_size()))
    loader = DataLoader(torch.utils.data.Subset(val_ds, indices), batch_size=batch, shuffle=False)
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=dev)
    for x, y in loader:
        x, y = x.to(dev), y.to(dev)
        if dev.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(dev, prec):
            logits = model(x)
        d = dice_per_image(logits, y)
        total[0] += d.sum().double()
        total[1] += d.numel()
    model.train(was_training)
    dist_utils.all_reduce_sum(total)
    return float(total[0] / total[1])


# ------------------------------------------------------------------------------------- checkpoint


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for key, v in meta.get("scalars", {}).items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    path: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    best: dict[str, torch.Tensor] | None,
    loop: dict[str, Any],
) -> None:
    """One safetensors file: weights, optimizer tensors, best weights; loop state as JSON metadata."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _flatten_optimizer(opt)
    tensors.update(opt_tensors)
    if best is not None:
        tensors.update({f"best.{k}": v for k, v in best.items()})
    save_tensors(path, tensors, metadata={"loop": json.dumps(loop), "optimizer": json.dumps(opt_meta)})


def load_checkpoint(
    path: Path, model: nn.Module, opt: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:  # a checkpoint of another run (other --width / --size) or a damaged file: one line, no traceback
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(path))
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        _unflatten_optimizer(opt, tensors, json.loads(meta["optimizer"]))
        best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} or None
        return json.loads(meta["loop"]), best
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        why = lines[1] if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else repr(exc))
        raise ModelFileError(
            f"cannot resume from {path} ({why[:160]}); it belongs to another run or is damaged: "
            "delete it or drop --resume"
        ) from exc


# -------------------------------------------------------------------------------------------- fit


def learning_rate(step: int, total_steps: int, lr: float, warmup_steps: int = 0) -> float:
    """Linear warm-up over `warmup_steps` (a fresh decoder on a pretrained encoder), then cosine to 0."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return lr * 0.5 * (1 + math.cos(math.pi * t))


def fit(
    model: nn.Module,
    train_ds: Dataset,
    val_ds: Dataset | None,
    *,
    epochs: int | None = None,
    iters: int | None = None,
    batch: int = 8,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    warmup: float = 0.0,
    loss: str = "bce-dice",
    device: str | torch.device = "auto",
    precision: str = "auto",
    seed: int = 0,
    workers: int = 0,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    desc: str = "train",
    on_best: Callable[[nn.Module, dict[str, Any]], None] | None = None,
    on_epoch: Callable[[list[dict[str, Any]]], None] | None = None,
    teacher: nn.Module | None = None,
    distill: float = 0.0,
    temperature: float = 1.0,
) -> list[dict[str, Any]]:
    """Train `model` in place; at the end it holds the best-validation weights (last if no val set).

    `iters` (fine-tuning budget in optimizer steps) overrides `epochs`. Returns one history row per
    epoch: epoch, loss, val_dice, lr, seconds, skipped (non-finite) steps.

    `teacher` + `distill` > 0: the loss adds `distill` x `distillation_loss` to the teacher's
    probabilities (the teacher runs in eval mode, without gradients; e.g. the unpruned parent).
    """
    dev = dist_utils.local_device(device if isinstance(device, torch.device) else resolve_device(device))
    prec = resolve_precision(precision, dev)
    if len(train_ds) == 0:
        raise ConfigError("the training set is empty")
    check_training_numbers(lr=lr, weight_decay=weight_decay, batch=batch, seed=seed, workers=workers)
    loss_fn = make_loss(loss)
    check_number("distill", distill, low=0, high=100)
    check_number("temperature", temperature, low=0, low_open=True, high=100)
    if distill > 0 and teacher is None:
        raise ConfigError("distillation needs a teacher model")
    world = dist_utils.world_size()
    model.to(dev)
    if teacher is not None and distill > 0:
        teacher = teacher.to(dev).eval()
        if dev.type == "cpu":
            teacher.to(memory_format=torch.channels_last)
    else:
        teacher = None
    if dev.type == "cpu":
        model.to(memory_format=torch.channels_last)  # oneDNN's fast path, 1.1-1.8x here
    steps_per_epoch = max(1, math.ceil(len(train_ds) / (batch * world)))
    if iters is not None:
        epochs = max(1, math.ceil(iters / steps_per_epoch))
        total_steps = iters
    else:
        epochs = epochs if epochs is not None else 1
        total_steps = epochs * steps_per_epoch
    if epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {epochs}")

    net: nn.Module = model
    if dist_utils.is_distributed():
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None
        )
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    ckpt = Path(checkpoint_dir) / "last.safetensors" if checkpoint_dir else None
    # what fixes the learning-rate schedule and the batch order: a resume must not change it silently
    if not 0.0 <= warmup < 1.0:
        raise ConfigError(f"--warmup must be in [0, 1), got {warmup}")
    warmup_steps = int(warmup * total_steps)
    schedule = {"total_steps": total_steps, "batch": batch, "lr": lr, "seed": seed, "world": world}
    if warmup_steps:  # only when used, so checkpoints of runs without warm-up still resume
        schedule["warmup_steps"] = warmup_steps
    loop: dict[str, Any] = {"epoch": 0, "step": 0, "best_dice": -1.0, "history": [], "schedule": schedule}
    best: dict[str, torch.Tensor] | None = None
    if resume and ckpt is not None and ckpt.is_file():
        loop, best = load_checkpoint(ckpt, model, opt)
        was = loop.setdefault("schedule", schedule)  # checkpoints before this check carry none
        changed = [f"{k} {was[k]} -> {v}" for k, v in schedule.items() if k in was and was[k] != v]
        if changed:
            raise ConfigError(
                f"--resume would change the schedule of {ckpt} ({', '.join(changed)}; total_steps follows "
                "--epochs/--finetune-iters, the data size and the process count): use the first run's "
                "options, or start a new run"
            )
        log(f"resumed from {ckpt} after epoch {loop['epoch']}", enabled=progress)
    history: list[dict[str, Any]] = loop["history"]
    bad_in_a_row = 0

    for epoch in range(loop["epoch"], epochs):
        if loop["step"] >= total_steps:
            break
        if hasattr(train_ds, "set_epoch"):
            train_ds.set_epoch(epoch)
        if world > 1:
            sampler = DistributedSampler(train_ds, shuffle=True, seed=seed)
            sampler.set_epoch(epoch)
            loader = DataLoader(
                train_ds, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=False
            )
        else:
            gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
            loader = DataLoader(train_ds, batch_size=batch, shuffle=True, generator=gen, num_workers=workers)
        net.train()
        t0, loss_sum, n_steps, skipped = time.perf_counter(), 0.0, 0, 0
        n_this_epoch = min(len(loader), total_steps - loop["step"])
        with progress_bar(n_this_epoch, f"{desc} {epoch + 1}/{epochs}", enabled=progress) as bar:
            for x, y in loader:
                if loop["step"] >= total_steps:
                    break
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                if dev.type == "cpu":
                    x = x.contiguous(memory_format=torch.channels_last)
                cur_lr = learning_rate(loop["step"], total_steps, lr, warmup_steps)
                for g in opt.param_groups:
                    g["lr"] = cur_lr
                with autocast(dev, prec):
                    logits = net(x)
                value = loss_fn(logits.float(), y)
                if teacher is not None:
                    with torch.no_grad(), autocast(dev, prec):
                        t_logits = teacher(x)
                    value = value + distill * distillation_loss(logits.float(), t_logits.float(), temperature)
                opt.zero_grad(set_to_none=True)
                finite = torch.isfinite(value)
                if world > 1:  # every rank must agree to step, or DDP deadlocks
                    finite = dist_utils.all_reduce_sum(finite.float().clone()) == world
                if not bool(finite):
                    skipped += 1
                    bad_in_a_row += 1
                    loop["step"] += 1
                    if bad_in_a_row >= MAX_BAD_STEPS:
                        raise TrainingError(
                            f"loss was NaN/inf for {MAX_BAD_STEPS} steps in a row (epoch {epoch + 1}, lr {lr:g}); "
                            "try a lower --lr or --precision fp32"
                        )
                    bar.advance(loss="nan")
                    continue
                bad_in_a_row = 0
                value.backward()
                opt.step()
                loop["step"] += 1
                loss_sum += value.item()
                n_steps += 1
                bar.advance(loss=f"{loss_sum / n_steps:.4f}")
            # DDP broadcast rank 0's BatchNorm statistics before each forward; each rank then updated
            # its own copy on its last batch: make every rank's model identical again (rank 0's)
            dist_utils.broadcast_buffers(model)
            if world > 1:  # the epoch's loss over all ranks' batches, not rank 0's alone
                tot = torch.tensor([loss_sum, n_steps], dtype=torch.float64)
                loss_sum, n_steps = float(dist_utils.all_reduce_sum(tot)[0]), int(tot[1])
            val = (
                validation_dice(model, val_ds, batch=batch, device=dev, precision=prec)
                if val_ds
                else float("nan")
            )
            row = {
                "epoch": epoch + 1,
                "loss": loss_sum / max(1, n_steps),
                "val_dice": val,
                "lr": cur_lr if n_steps else lr,
                "seconds": time.perf_counter() - t0,
                "skipped_steps": skipped,
            }
            bar.set(loss=f"{row['loss']:.4f}", val_dice=f"{val:.4f}")
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            # finite losses can still step the weights to inf (a huge lr): never save such a model
            raise TrainingError(
                f"the weights became NaN/inf in epoch {epoch + 1} (lr {lr:g}); nothing of this epoch was "
                "saved: try a lower --lr or --precision fp32"
            )
        history.append(row)
        log(
            f"{desc} {epoch + 1}/{epochs}: loss {row['loss']:.4f}  val Dice {val:.4f}  ({row['seconds']:.0f} s)",
            enabled=progress,
        )
        improved = not math.isnan(val) and val > loop["best_dice"]
        if improved or (math.isnan(val) and loop["step"] >= total_steps):
            loop["best_dice"] = val if improved else loop["best_dice"]
            best = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if on_best is not None and is_main_process():
                on_best(model, row)
        loop["epoch"] = epoch + 1
        if ckpt is not None and is_main_process():
            save_checkpoint(ckpt, model, opt, best, loop)
        if on_epoch is not None and is_main_process():
            on_epoch(history)
        dist_utils.barrier()
    if best is not None:
        model.load_state_dict(best)
    model.to(memory_format=torch.contiguous_format)
    return history


# ------------------------------------------------------------------------------------------ train


@dataclass
class TrainConfig:
    data: list[str]
    out: str
    size: int = 256
    arch: str = "unet"
    width: int = 16
    upsample: str | None = None  # None: the family's own default (unet: transpose, encoder UNets: bilinear)
    pretrained: bool = True  # ImageNet encoder weights, for the encoder UNets (unet has none)
    warmup: float = 0.0  # share of all steps with a linear learning-rate warm-up before the cosine
    init: str | None = None  # a trained model file to start from (fine-tuning) instead of a fresh model
    teacher: str | None = None  # a model file to distill from (a from-scratch student gets the same help)
    distill: float = 0.0
    epochs: int = 20
    batch: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    loss: str = "bce-dice"
    seed: int = 0
    val_fraction: float = 0.1
    ids_file: list[str] = field(default_factory=list)
    exclude_ids: list[str] = field(default_factory=list)
    augment: bool = True
    threads: int | None = None
    device: str = "auto"
    precision: str = "auto"
    workers: int = 0
    resume: bool = False
    overwrite: bool = False  # clear a non-empty run folder instead of refusing it
    skip_bad: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        check_training_numbers(
            lr=self.lr, weight_decay=self.weight_decay, batch=self.batch, seed=self.seed, workers=self.workers
        )
        check_threads(self.threads)
        check_int("epochs", self.epochs, low=1)
        check_int("width", self.width, low=1, high=512)
        check_number("warmup", self.warmup, low=0, high=1, high_open=True)
        check_number("val_fraction", self.val_fraction, low=0, high=1, high_open=True)
        check_choice("loss", self.loss, tuple(LOSSES))
        check_number("distill", self.distill, low=0, high=100)
        if self.distill > 0 and not self.teacher:
            raise ConfigError("distill needs a teacher model file")


def check_training_numbers(*, lr: Any, weight_decay: Any, batch: Any, seed: Any, workers: Any = 0) -> None:
    """What `fit` needs of its numbers (train and prune share these)."""
    check_number("lr", lr, low=0, low_open=True, high=10)
    check_number("weight_decay", weight_decay, low=0, high=10)
    check_int("batch", batch, low=1, high=4096)
    check_seed(seed)
    check_int("workers", workers, low=0, high=256)


def build_training_model(cfg: TrainConfig) -> nn.Module:
    """The model `train` starts from: `init`'s (a trained model file: fine-tune it, e.g. a zoo model on
    your own data; its architecture wins over --arch), a plain UNet of `width`, or an encoder UNet."""
    from polyprune.models import build_model

    if cfg.init:
        return load_model(cfg.init).train()
    if cfg.arch == "unet":
        return build_model("unet", base_width=cfg.width, upsample=cfg.upsample or "transpose")
    extra = {"upsample": cfg.upsample} if cfg.upsample else {}
    return build_model(cfg.arch, pretrained=cfg.pretrained, **extra)


def _skeleton(cfg: TrainConfig) -> nn.Module:
    """The training model's shapes (call under torch.device("meta")): no weights read or allocated."""
    from polyprune.models import build_model

    if cfg.init:
        arch = dict(read_metadata(cfg.init).arch)
        name = arch.pop("name", None)
        if name is None:
            raise ConfigError(
                f"--init {cfg.init}: a model outside polyprune's registry cannot be trained by the CLI"
            )
        return build_model(name, **arch)
    return build_training_model(replace(cfg, pretrained=False))


def train(cfg: TrainConfig) -> dict[str, Any]:
    """`polyprune train`: build a UNet, fit it, write RUN/model.safetensors + history.json.

    Returns a summary: best validation Dice, epochs, minutes, params, MACs, paths. The run folder is
    held (`io.run_folder`) by rank 0 while training: not empty -> refused unless resume / overwrite.
    """
    claim = (
        run_folder(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite)
        if is_main_process()  # RANK from torchrun's environment: the process group is not up yet
        else contextlib.nullcontext()
    )
    with claim:
        return _train(cfg)


def _train(cfg: TrainConfig) -> dict[str, Any]:
    from polyprune.counting import check_training_memory, count_macs, count_params

    check_size(cfg.size)
    with torch.device("meta"):  # shapes only: a model or size too big for memory is refused up front
        skeleton = _skeleton(cfg)
    check_size(cfg.size, int(getattr(skeleton, "stride", 16)))
    check_training_memory(skeleton, cfg.size, cfg.batch)
    dist_utils.setup(cfg.device)
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    dev = resolve_device(cfg.device)
    if dist_utils.is_distributed() and dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    out = Path(cfg.out)
    # the encoder's own normalization (TF scaling for EfficientNet-Lite); --init keeps its file's
    spec = read_metadata(cfg.init).input if cfg.init else InputSpec.for_model(skeleton)
    spec = replace(spec, size=cfg.size)
    train_ds, val_ds = make_datasets(
        cfg.data,
        spec,
        ids_file=cfg.ids_file or None,
        exclude_ids_file=cfg.exclude_ids or None,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
        augment=cfg.augment,
        skip_bad=cfg.skip_bad,
    )
    model = build_training_model(cfg)
    params, macs = count_params(model), count_macs(model, cfg.size)
    train_meta = {k: v for k, v in asdict(cfg).items() if k not in ("progress", "resume", "overwrite")}
    train_meta.update(n_train=len(train_ds), n_val=len(val_ds))
    what = f"UNet width {cfg.width}" if cfg.arch == "unet" else f"{cfg.arch} (pretrained: {cfg.pretrained})"
    if cfg.init:
        what = f"{model.config()['name']} from {cfg.init}"
    log(
        f"training {what} ({params / 1e6:.2f} M params, {macs / 1e9:.2f} GMACs at {cfg.size}) "
        f"on {len(train_ds)} images, validating on {len(val_ds)}",
        enabled=cfg.progress,
    )

    def on_best(m: nn.Module, row: dict[str, Any]) -> None:
        save_model(out / "model.safetensors", m, input_spec=spec, train={**train_meta, "best": row})

    def on_epoch(rows: list[dict[str, Any]]) -> None:
        write_json(out / "history.json", {"config": train_meta, "history": rows})

    history = fit(
        model,
        train_ds,
        val_ds,
        epochs=cfg.epochs,
        batch=cfg.batch,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup=cfg.warmup,
        loss=cfg.loss,
        device=dev,
        precision=cfg.precision,
        seed=cfg.seed,
        workers=cfg.workers,
        checkpoint_dir=out / "checkpoint",
        resume=cfg.resume,
        progress=cfg.progress,
        desc="epoch",
        on_best=on_best,
        on_epoch=on_epoch,
        teacher=load_model(cfg.teacher) if cfg.teacher else None,
        distill=cfg.distill,
    )
    # all epochs, those before a resume included (their times are kept in the checkpoint's history)
    minutes = sum(r["seconds"] for r in history) / 60
    best_row = max(
        (r for r in history if not math.isnan(r["val_dice"])), key=lambda r: r["val_dice"], default=None
    )
    summary = {
        "model": str(out / "model.safetensors"),
        "best_val_dice": best_row["val_dice"] if best_row else float("nan"),
        "best_epoch": best_row["epoch"] if best_row else len(history),
        "epochs": len(history),
        "minutes": minutes,
        "params": params,
        "macs": macs,
        "size": cfg.size,
        "arch": model.config()["name"] if hasattr(model, "config") else cfg.arch,
        "width": cfg.width,
    }
    if is_main_process():
        write_json(out / "history.json", {"config": train_meta, "history": history, "summary": summary})
    dist_utils.teardown()
    return summary
