"""What one prune run holds besides its trajectory: the parent (and an unpruned copy to distill from),
the datasets, calibration images, the device, and how to measure (params, MACs, latency on the chosen
backend, validation Dice), fine-tune (`fit.fit`) and save each step."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from polyprune import distributed as dist_utils
from polyprune.checks import check_size
from polyprune.counting import check_training_memory, count_macs, count_params
from polyprune.errors import ConfigError
from polyprune.files import write_json
from polyprune.freeze import check_layer_names
from polyprune.io import load_model, save_model
from polyprune.progress import is_main_process, log
from polyprune.pruning.config import PruneConfig, latency_function
from polyprune.teacher import load_teacher, teacher_of


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
        lat = latency_function(backend)(model, size, runs=runs, threads=threads)
    return float(lat.median_ms)


INT8_CALIB_IMAGES = 16  # per latency measurement: latency does not depend on the ranges it finds


def _image_paths(ds: Any) -> list[Path]:
    """The image files of a SegmentationDataset, or of the parts of an EpochConcat, in order."""
    parts = getattr(ds, "datasets", None)
    if parts is not None:
        return [p for part in parts for p in _image_paths(part)]
    return [s.image for s in ds.samples]


class PruneSession:
    """What a prune run needs besides its trajectory: parent, data, device, and how to measure / save."""

    def _teacher(self, parent: nn.Module) -> nn.Module:
        if self.cfg.teacher:
            return load_teacher(self.cfg.teacher, self.spec, self.cfg.teacher_tta)
        twin = copy.deepcopy(parent).eval()  # the parent itself is pruned in place: distill from a copy
        return teacher_of([twin], [self.spec], self.spec, self.cfg.teacher_tta)

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
        check_layer_names(parent, cfg.ignore, "--ignore")
        check_layer_names(parent, cfg.freeze, "--freeze")
        self.size = cfg.size if cfg.size is not None else self.spec.size
        check_size(self.size, int(getattr(parent, "stride", 1)))
        self.teacher = self._teacher(parent) if cfg.distill > 0 else None
        check_training_memory(copy.deepcopy(parent).to("meta"), self.spec.size, cfg.batch)
        # the parent's own train / val split (its training seed), so validation never scores images the
        # parent trained on; the run's seed drives calibration, random scores and fine-tuning
        self.split_seed = int((self.meta.train or {}).get("seed", cfg.seed))
        self.train_ds, self.val_ds = make_datasets(
            cfg.data,
            self.spec,
            ids_file=cfg.ids_file or None,
            exclude_ids_file=cfg.exclude_ids or None,
            val_fraction=cfg.val_fraction,
            seed=self.split_seed,
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
        self.layer_latency = None
        if cfg.cost == "latency":
            from polyprune.pruning.layer_latency import LayerLatency

            self.layer_latency = LayerLatency(
                cfg.backend, threads=cfg.threads, cache=self.out / "layer_latency.json"
            )

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
        from polyprune.validation import validation_dice

        if len(self.val_ds) == 0:
            return float("nan")
        return validation_dice(
            model, self.val_ds, batch=self.cfg.batch, device=self.device, precision=self.cfg.precision
        )

    def calibrate(self, model: nn.Module) -> dict[str, Any] | None:
        """The logit scale fitted on validation, folded into the output conv (polyprune.calibration);
        None where it does not apply (no output conv, no validation split, a threshold other than 0.5)."""
        from polyprune.calibration import calibrate_output_scale

        if self.spec.threshold != 0.5:  # scaling keeps the masks only where the threshold is logit 0
            return None
        result = calibrate_output_scale(
            model, self.val_ds, batch=self.cfg.batch, device=self.device, precision=self.cfg.precision
        )
        if result is not None and "fitted_scale" in result:
            log(
                f"calibration: left the output as it is (validation fits logits x "
                f"{result['fitted_scale']:.3f}, not under-confident)",
                enabled=self.cfg.progress,
            )
        elif result is not None:
            log(
                f"calibrated the output: logits x {result['logit_scale']:.3f} (val BCE "
                f"{result['val_bce_before']:.4f} -> {result['val_bce_after']:.4f}; masks at 0.5 unchanged)",
                enabled=self.cfg.progress,
            )
        return result

    def finetune(
        self, model: nn.Module, *, epochs: int | None, iters: int | None, seed: int, desc: str, **kw: Any
    ) -> int:
        """Fine-tune `model` in place; returns the optimizer steps spent (all epochs, resumed ones too)."""
        from polyprune.fit import fit

        history = fit(
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
            freeze=self.cfg.freeze,
            **kw,
        )
        return sum(int(r.get("steps", 0)) for r in history)

    def parent_steps(self) -> int | None:
        """Optimizer steps of the parent's own training (epochs x batches per epoch), from its file."""
        t = self.meta.train or {}
        try:
            return int(t["epochs"]) * math.ceil(int(t["n_train"]) / int(t["batch"]))
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            return None

    # ------------------------------------------------------------------------------ files

    def step_path(self, step: int) -> Path:
        return Path(self.parent_path) if step == 0 else self.steps_dir / f"step_{step:03d}.safetensors"

    def save(self, path: Path, model: nn.Module, traj: dict[str, Any], history: list, upto: int) -> None:
        if not is_main_process():
            return
        pruning = {
            "criterion": self.cfg.criterion,
            "options": traj["options"],
            "steps": [_short_row(r) for r in traj["steps"][1 : upto + 1]],
            "history": history,
        }
        if (traj.get("final") or {}).get("calibration"):  # the final model's logit scale
            pruning["calibration"] = traj["final"]["calibration"]
        save_model(
            path,
            model,
            input_spec=self.spec,
            parent=traj["parent"],
            train={"parent": self.meta.train, "finetune": traj["finetune"]},
            pruning=pruning,
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
