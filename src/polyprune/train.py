"""`polyprune train`: assemble the datasets (several folders, split files, validation carved from the
training data), build the model (a UNet, an ImageNet-encoder UNet, or `--init` a model file), `fit` it,
and write RUN/model.safetensors + history.json (the loop itself: `fit`)."""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from polyprune import distributed as dist_utils
from polyprune.checks import check_choice, check_int, check_number, check_size, check_threads
from polyprune.device import resolve_device, seed_everything, set_threads
from polyprune.errors import ConfigError
from polyprune.files import run_folder, write_json
from polyprune.fit import check_training_numbers, fit
from polyprune.io import InputSpec, load_model, read_metadata, save_model
from polyprune.losses import LOSSES
from polyprune.progress import is_main_process, log
from polyprune.teacher import load_teacher
from polyprune.tta import check_tta

if TYPE_CHECKING:
    from polyprune.data import Split

# ------------------------------------------------------------------------------------------- data


def _read_split_files(spec: str | Path | list | None) -> dict[str, list[str]]:
    """{split file: its ids} for one file, a list of files, or None (each file read once)."""
    from polyprune.data import read_ids

    files = spec if isinstance(spec, list) else [spec] if spec else []
    return {str(f): read_ids(f) for f in files}


def split_folders(
    data_dirs: list[str | Path],
    *,
    ids_file: str | Path | list | None = None,
    exclude_ids_file: str | Path | list | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    skip_bad: bool = False,
) -> dict[str | Path, Split]:
    """{dataset folder: its train / val / test Split}, as `train` and `prune` carve them.

    `exclude_ids_file` lists test ids (e.g. PraNet's split): they go to `test` and are never used. `ids_file`,
    if given, restricts the pool to those ids. The validation split is carved from what remains, per
    dataset folder, by a seeded shuffle: never from test data. (`benchmarks/zoo_eval.py --split val`
    scores a model on the same validation images.)
    """
    from polyprune.data import find_samples, split_samples

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
    splits = {}
    for d, samples in found.items():
        if only:
            samples = [s for s in samples if s.id in only]
        present = {s.id for s in samples}
        test_ids = [i for i in excluded if i in present]
        splits[d] = split_samples(samples, test_ids=test_ids or None, val_fraction=val_fraction, seed=seed)
        if not splits[d].train:
            raise ConfigError(f"no training images left in {d} after the split")
    return splits


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
    """Train (augmented) and validation datasets from one or more dataset folders (`split_folders`)."""
    from polyprune.data import SegmentationDataset

    check_size(spec.size)
    splits = split_folders(
        data_dirs,
        ids_file=ids_file,
        exclude_ids_file=exclude_ids_file,
        val_fraction=val_fraction,
        seed=seed,
        skip_bad=skip_bad,
    )
    held = sum(len(sp.train) + len(sp.val) for sp in splits.values())  # test images are never loaded
    _check_data_memory(held, spec.size)
    train_parts, val_parts = [], []
    for split in splits.values():
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


# ------------------------------------------------------------------------------------------ train


@dataclass
class TrainConfig:
    data: list[str]
    out: str
    size: int = 256
    arch: str = "unet"
    width: int = 16
    upsample: str | None = None  # None: the family's own default (unet: transpose, encoder UNets: bilinear)
    decoder_widths: list[int] = field(default_factory=list)  # encoder UNets (s2..s16); []: the family's own
    pretrained: bool = True  # ImageNet encoder weights, for the encoder UNets (unet has none)
    warmup: float = 0.0  # share of all steps with a linear learning-rate warm-up before the cosine
    scales: list[float] = field(default_factory=list)  # multi-scale training, e.g. [0.75, 1, 1.25]
    init: str | None = None  # a trained model file to start from (fine-tuning) instead of a fresh model
    # model file(s) to distill from (several: their mean logits); a from-scratch student gets the same help
    teacher: str | list[str] | None = None
    teacher_tta: str = "none"  # the teacher's test-time augmentation (polyprune.tta), e.g. hflip
    distill: float = 0.0
    ema: float = 0.0  # decay of an exponential moving average of the weights (0: off), e.g. 0.999
    freeze: list[str] = field(default_factory=list)  # layers trained as they are, e.g. ["encoder"]
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
        if self.decoder_widths and self.arch == "unet":
            raise ConfigError("decoder_widths is for the encoder UNets; a plain unet takes width")
        check_number("warmup", self.warmup, low=0, high=1, high_open=True)
        for v in self.scales:
            check_number("scales", v, low=0.25, high=4)
        check_number("val_fraction", self.val_fraction, low=0, high=1, high_open=True)
        check_choice("loss", self.loss, tuple(LOSSES))
        check_number("distill", self.distill, low=0, high=100)
        check_number("ema", self.ema, low=0, high=1, high_open=True)
        if self.distill > 0 and not self.teacher:
            raise ConfigError("distill needs a teacher model file")
        check_tta(self.teacher_tta)
        if self.teacher_tta != "none" and not self.teacher:
            raise ConfigError("teacher_tta needs a teacher model file")


def build_training_model(cfg: TrainConfig) -> nn.Module:
    """The model `train` starts from: `init`'s (a trained model file: fine-tune it, e.g. a zoo model on
    your own data; its architecture wins over --arch), a plain UNet of `width`, or an encoder UNet."""
    from polyprune.models import build_model

    if cfg.init:
        return load_model(cfg.init).train()
    if cfg.arch == "unet":
        return build_model("unet", base_width=cfg.width, upsample=cfg.upsample or "transpose")
    extra = {"upsample": cfg.upsample} if cfg.upsample else {}
    extra |= {"decoder_widths": list(cfg.decoder_widths)} if cfg.decoder_widths else {}
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
    held (`files.run_folder`) by rank 0 while training: not empty -> refused unless resume / overwrite.
    """
    claim = (
        run_folder(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite)
        if is_main_process()  # RANK from torchrun's environment: the process group is not up yet
        else contextlib.nullcontext()
    )
    with claim:
        return _train(cfg)


def _train(cfg: TrainConfig) -> dict[str, Any]:
    from polyprune.counting import count_macs, count_params

    skeleton = _check_before_loading(cfg)
    dev = _training_device(cfg)
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
    log(
        f"training {_what(cfg, model)} ({params / 1e6:.2f} M params, {macs / 1e9:.2f} GMACs at {cfg.size}) "
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
        scales=tuple(cfg.scales),
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
        teacher=load_teacher(cfg.teacher, spec, cfg.teacher_tta) if cfg.teacher else None,
        distill=cfg.distill,
        ema=cfg.ema,
        freeze=cfg.freeze,
    )
    best_row = max(
        (r for r in history if not math.isnan(r["val_dice"])), key=lambda r: r["val_dice"], default=None
    )
    summary = {
        "model": str(out / "model.safetensors"),
        "best_val_dice": best_row["val_dice"] if best_row else float("nan"),
        "best_epoch": best_row["epoch"] if best_row else len(history),
        "epochs": len(history),
        # all epochs, those before a resume included (their times are kept in the checkpoint's history)
        "minutes": sum(r["seconds"] for r in history) / 60,
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


def _check_before_loading(cfg: TrainConfig) -> nn.Module:
    """Size, stride and memory checked on a meta-device skeleton (nothing allocated); returns it."""
    from polyprune.counting import check_training_memory

    check_size(cfg.size)
    with torch.device("meta"):  # shapes only: a model or size too big for memory is refused up front
        skeleton = _skeleton(cfg)
    check_size(cfg.size, int(getattr(skeleton, "stride", 16)))
    check_training_memory(skeleton, cfg.size, cfg.batch)
    return skeleton


def _training_device(cfg: TrainConfig) -> torch.device:
    dist_utils.setup(cfg.device)
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    dev = resolve_device(cfg.device)
    if dist_utils.is_distributed() and dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def _what(cfg: TrainConfig, model: nn.Module) -> str:
    if cfg.init:
        return f"{model.config()['name']} from {cfg.init}"
    return f"UNet width {cfg.width}" if cfg.arch == "unet" else f"{cfg.arch} (pretrained: {cfg.pretrained})"
