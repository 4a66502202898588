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
- `ema` > 0: validation, model selection and the saved model use an exponential moving average of the
  weights (polyprune.ema), kept in the checkpoint too.
- Non-finite loss: the step is skipped (no update) and counted; 20 skipped steps in a row end the run
  with a TrainingError that suggests a lower --lr or --precision fp32.
- Under torchrun: DistributedSampler + DDP; only rank 0 writes files or prints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from polyprune import distributed as dist_utils
from polyprune.checkpoint import load_checkpoint, save_checkpoint
from polyprune.checks import check_int, check_number, check_seed
from polyprune.data import epoch_loader
from polyprune.device import autocast, resolve_device, resolve_precision
from polyprune.ema import WeightEMA
from polyprune.errors import ConfigError, TrainingError
from polyprune.freeze import FrozenLayers
from polyprune.losses import distillation_loss, make_loss
from polyprune.multiscale import MultiScale
from polyprune.progress import is_main_process, log, progress_bar
from polyprune.validation import validation_dice

MAX_BAD_STEPS = 20


# -------------------------------------------------------------------------------------------- fit


def check_training_numbers(*, lr: Any, weight_decay: Any, batch: Any, seed: Any, workers: Any = 0) -> None:
    """What `fit` needs of its numbers (train and prune share these)."""
    check_number("lr", lr, low=0, low_open=True, high=10)
    check_number("weight_decay", weight_decay, low=0, high=10)
    check_int("batch", batch, low=1, high=4096)
    check_seed(seed)
    check_int("workers", workers, low=0, high=256)


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
    scales: tuple[float, ...] = (),
    ema: float = 0.0,
    freeze: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Train `model` in place; at the end it holds the best-validation weights (last if no val set).

    `iters` (fine-tuning budget in optimizer steps) overrides `epochs`. Returns one history row per
    epoch: epoch, loss, val_dice, lr, seconds, skipped (non-finite) steps.

    `teacher` + `distill` > 0: the loss adds `distill` x `distillation_loss` to the teacher's
    probabilities (the teacher runs in eval mode, without gradients; e.g. the unpruned parent).

    `scales` (e.g. (0.75, 1, 1.25), PraNet's multi-scale training): each step resizes its batch to one of
    them x the data's size (rounded to the model's stride), drawn from (seed, step), so a resume sees the
    same sizes; validation stays at the data's size.

    `ema` (e.g. 0.999): validate, select and return an exponential moving average of the weights.

    `freeze` (layer names, e.g. ["encoder"]): those layers keep their weights and BatchNorm statistics
    (polyprune.freeze); they train again when fit returns.
    """
    dev = dist_utils.local_device(device if isinstance(device, torch.device) else resolve_device(device))
    prec = resolve_precision(precision, dev)
    if len(train_ds) == 0:
        raise ConfigError("the training set is empty")
    check_training_numbers(lr=lr, weight_decay=weight_decay, batch=batch, seed=seed, workers=workers)
    loss_fn = make_loss(loss)
    _check_fit_options(warmup, distill, temperature, teacher, scales)
    world = dist_utils.world_size()
    model.to(dev)
    teacher = _prepare_teacher(teacher, dev) if distill > 0 else None
    if dev.type == "cpu":
        model.to(memory_format=torch.channels_last)  # oneDNN's fast path, 1.1-1.8x here
    frozen = FrozenLayers(model, freeze)  # before the optimizer: it holds only what trains
    try:
        averager = WeightEMA(model, ema) if ema else None
        selected = averager.module if averager else model  # what validation sees and fit keeps
        epochs, total_steps = _budget(epochs, iters, max(1, math.ceil(len(train_ds) / (batch * world))))
        net: nn.Module = model
        if dist_utils.is_distributed():
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[dev.index] if dev.type == "cuda" else None
            )
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ConfigError(f"--freeze {' '.join(freeze)} leaves nothing to train")
        opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
        ckpt = Path(checkpoint_dir) / "last.safetensors" if checkpoint_dir else None
        warmup_steps = int(warmup * total_steps)
        # what fixes the learning-rate schedule and the batch order: a resume must not change it silently
        schedule = {"total_steps": total_steps, "batch": batch, "lr": lr, "seed": seed, "world": world}
        used = {"warmup_steps": warmup_steps, "scales": list(scales), "ema": ema, "freeze": list(freeze)}
        # only when used: older checkpoints still resume
        schedule.update({k: v for k, v in used.items() if v})
        loop, best = _start_or_resume(ckpt if resume else None, model, opt, schedule, progress, averager)
        history: list[dict[str, Any]] = loop["history"]
        step = _Stepper(
            net, opt, loss_fn, dev, prec, lr, total_steps, warmup_steps, teacher, distill, temperature
        )
        step.rescale = MultiScale(scales, int(getattr(model, "stride", 32)), seed) if scales else None
        step.averager = averager

        for epoch in range(loop["epoch"], epochs):
            if loop["step"] >= total_steps:
                break
            loader = epoch_loader(train_ds, epoch, batch, seed, workers, world)
            net.train()
            frozen.keep_in_eval()
            t0 = time.perf_counter()
            label = f"{desc} {epoch + 1}/{epochs}"
            with progress_bar(min(len(loader), total_steps - loop["step"]), label, enabled=progress) as bar:
                step.run_epoch(loader, loop, total_steps, epoch, bar)
                # DDP broadcast rank 0's BatchNorm statistics before each forward; each rank then updated
                # its own copy on its last batch: make every rank's model identical again (rank 0's)
                dist_utils.broadcast_buffers(model)
                val = (
                    validation_dice(selected, val_ds, batch=batch, device=dev, precision=prec)
                    if val_ds
                    else math.nan
                )
                row = step.epoch_row(epoch, val, time.perf_counter() - t0)
                bar.set(loss=f"{row['loss']:.4f}", val_dice=f"{val:.4f}")
            best = _end_of_epoch(
                model, opt, row, loop, best, history, ckpt, label, total_steps, progress, on_best, on_epoch,
                averager,
            )  # fmt: skip
        if best is not None:
            model.load_state_dict(best)
        model.to(memory_format=torch.contiguous_format)
        return history
    finally:
        frozen.thaw()


def _budget(epochs: int | None, iters: int | None, steps_per_epoch: int) -> tuple[int, int]:
    """(epochs, optimizer steps): `iters` steps if given, else `epochs` (default 1) whole epochs."""
    if iters is not None:
        return max(1, math.ceil(iters / steps_per_epoch)), iters
    epochs = 1 if epochs is None else epochs
    if epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {epochs}")
    return epochs, epochs * steps_per_epoch


def _check_fit_options(
    warmup: float, distill: float, temperature: float, teacher: nn.Module | None, scales: tuple[float, ...]
) -> None:
    for v in scales:
        check_number("scales", v, low=0.25, high=4)
    check_number("distill", distill, low=0, high=100)
    check_number("temperature", temperature, low=0, low_open=True, high=100)
    if not 0.0 <= warmup < 1.0:
        raise ConfigError(f"--warmup must be in [0, 1), got {warmup}")
    if distill > 0 and teacher is None:
        raise ConfigError("distillation needs a teacher model")


def _end_of_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    row: dict[str, Any],
    loop: dict[str, Any],
    best: dict[str, torch.Tensor] | None,
    history: list[dict[str, Any]],
    ckpt: Path | None,
    label: str,
    total_steps: int,
    progress: bool,
    on_best: Callable[[nn.Module, dict[str, Any]], None] | None,
    on_epoch: Callable[[list[dict[str, Any]]], None] | None,
    averager: WeightEMA | None = None,
) -> dict[str, torch.Tensor] | None:
    """Check the weights, log, keep the best weights (the average's, with `averager`), checkpoint;
    returns the best weights so far."""
    epoch, val = row["epoch"], row["val_dice"]
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        # finite losses can still step the weights to inf (a huge lr): never save such a model
        raise TrainingError(
            f"the weights became NaN/inf in epoch {epoch} (lr {opt.defaults['lr']:g}); nothing of this "
            "epoch was saved: try a lower --lr or --precision fp32"
        )
    history.append(row)
    log(f"{label}: loss {row['loss']:.4f}  val Dice {val:.4f}  ({row['seconds']:.0f} s)", enabled=progress)
    improved = not math.isnan(val) and val > loop["best_dice"]
    if improved or (math.isnan(val) and loop["step"] >= total_steps):
        loop["best_dice"] = val if improved else loop["best_dice"]
        selected = averager.module if averager is not None else model
        best = {k: v.detach().clone() for k, v in selected.state_dict().items()}
        if on_best is not None and is_main_process():
            on_best(selected, row)
    loop["epoch"] = epoch
    if ckpt is not None and is_main_process():
        save_checkpoint(ckpt, model, opt, best, loop, averager.state() if averager is not None else None)
    if on_epoch is not None and is_main_process():
        on_epoch(history)
    dist_utils.barrier()
    return best


def _prepare_teacher(teacher: nn.Module | None, dev: torch.device) -> nn.Module | None:
    if teacher is None:
        return None
    teacher = teacher.to(dev).eval()
    if dev.type == "cpu":
        teacher.to(memory_format=torch.channels_last)
    return teacher


def _start_or_resume(
    ckpt: Path | None,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    schedule: dict[str, Any],
    progress: bool,
    averager: WeightEMA | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """(loop state, best weights): fresh, or from `ckpt` if it exists (refused if the schedule changed)."""
    loop: dict[str, Any] = {"epoch": 0, "step": 0, "best_dice": -1.0, "history": [], "schedule": schedule}
    if ckpt is None or not ckpt.is_file():
        return loop, None
    loop, best, ema_state = load_checkpoint(ckpt, model, opt)
    was = loop.setdefault("schedule", schedule)  # checkpoints before this check carry none
    changed = [f"{k} {was[k]} -> {v}" for k, v in schedule.items() if k in was and was[k] != v]
    if was.get("ema", 0.0) != schedule.get("ema", 0.0):  # the average is in the checkpoint or is not
        changed.append(f"ema {was.get('ema', 0.0)} -> {schedule.get('ema', 0.0)}")
    if changed:
        raise ConfigError(
            f"--resume would change the schedule of {ckpt} ({', '.join(changed)}; total_steps follows "
            "--epochs/--finetune-iters, the data size and the process count): use the first run's "
            "options, or start a new run"
        )
    if averager is not None and ema_state is not None:
        averager.load_state(ema_state)
    log(f"resumed from {ckpt} after epoch {loop['epoch']}", enabled=progress)
    return loop, best


class _Stepper:
    """One optimizer step per call; a non-finite loss skips the update (counted, and fatal after
    MAX_BAD_STEPS in a row, across epochs)."""

    def __init__(
        self,
        net: nn.Module,
        opt: torch.optim.Optimizer,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        dev: torch.device,
        prec: str,
        lr: float,
        total_steps: int,
        warmup_steps: int,
        teacher: nn.Module | None,
        distill: float,
        temperature: float,
    ) -> None:
        self.net, self.opt, self.loss_fn, self.dev, self.prec = net, opt, loss_fn, dev, prec
        self.lr, self.total_steps, self.warmup_steps = lr, total_steps, warmup_steps
        self.teacher, self.distill, self.temperature = teacher, distill, temperature
        self.world = dist_utils.world_size()
        self.bad_in_a_row = 0
        self.rescale: MultiScale | None = None
        self.averager: WeightEMA | None = None
        self.epoch_start()

    def epoch_start(self) -> None:
        self.loss_sum, self.n_steps, self.skipped, self.lr_now = 0.0, 0, 0, self.lr

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int, epoch: int, bar: Any) -> int:
        """Train on one batch at global step `step`; returns the next step."""
        x, y = x.to(self.dev, non_blocking=True), y.to(self.dev, non_blocking=True)
        if self.rescale is not None:
            x, y = self.rescale(x, y, step)
        if self.dev.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        self.lr_now = learning_rate(step, self.total_steps, self.lr, self.warmup_steps)
        for g in self.opt.param_groups:
            g["lr"] = self.lr_now
        with autocast(self.dev, self.prec):
            logits = self.net(x)
        value = self.loss_fn(logits.float(), y)
        if self.teacher is not None:
            with torch.no_grad(), autocast(self.dev, self.prec):
                t_logits = self.teacher(x)
            value = value + self.distill * distillation_loss(
                logits.float(), t_logits.float(), self.temperature
            )
        self.opt.zero_grad(set_to_none=True)
        finite = torch.isfinite(value)
        if self.world > 1:  # every rank must agree to step, or DDP deadlocks
            finite = dist_utils.all_reduce_sum(finite.float().clone()) == self.world
        if not bool(finite):
            self.skipped += 1
            self.bad_in_a_row += 1
            if self.bad_in_a_row >= MAX_BAD_STEPS:
                raise TrainingError(
                    f"loss was NaN/inf for {MAX_BAD_STEPS} steps in a row (epoch {epoch + 1}, lr {self.lr:g}); "
                    "try a lower --lr or --precision fp32"
                )
            bar.advance(loss="nan")
            return step + 1
        self.bad_in_a_row = 0
        value.backward()
        self.opt.step()
        if self.averager is not None:
            self.averager.update(getattr(self.net, "module", self.net))  # DDP's inner model
        self.loss_sum += value.item()
        self.n_steps += 1
        bar.advance(loss=f"{self.loss_sum / self.n_steps:.4f}")
        return step + 1

    def run_epoch(self, loader: Any, loop: dict[str, Any], total_steps: int, epoch: int, bar: Any) -> None:
        """One epoch's batches (fewer where the budget ends); `loop["step"]` counts them."""
        self.epoch_start()
        for x, y in loader:
            if loop["step"] >= total_steps:
                break
            loop["step"] = self(x, y, loop["step"], epoch, bar)

    def epoch_row(self, epoch: int, val: float, seconds: float) -> dict[str, Any]:
        """The history row of the epoch just run; its loss is over all ranks' batches, not rank 0's."""
        loss_sum, n_steps = self.loss_sum, self.n_steps
        if self.world > 1:
            tot = dist_utils.all_reduce_sum(torch.tensor([loss_sum, n_steps], dtype=torch.float64))
            loss_sum, n_steps = float(tot[0]), int(tot[1])
        return {
            "epoch": epoch + 1,
            "loss": loss_sum / max(1, n_steps),
            "val_dice": val,
            "lr": self.lr_now if n_steps else self.lr,
            "seconds": seconds,
            "steps": self.n_steps + self.skipped,  # optimizer steps taken (skipped ones count: budget)
            "skipped_steps": self.skipped,
        }
