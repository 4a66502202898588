"""Importance criteria: one score per output channel (filter) of every prunable conv. Low = prune first.

Notation. For a conv layer l with filter (output channel) c: W_c its weights; A_c the feature map the
layer hands on, i.e. the output of the BatchNorm right after the conv (the conv output itself where no
BatchNorm follows), shape (H, W) per image; dA_c the gradient reaching A_c; y_n the network output of
calibration image n (all pixels); g_n the gradient injected at y_n. Calibration: N images (default 64)
from a loader, in mini-batches B, model in eval mode (BatchNorm uses running statistics, so every
image is independent of the others in its batch and the scores measure the deployed network).

    taylor-gradnorm   (default; Sapkota et al. 2023, "gradient-normalized backpropagation")
        g_n  = dL(y_n, t_n)/dy_n            signal="loss"   (per-image training loss)
             = z_n ~ N(0, I), seeded         signal="random" (label-free)
        g_n <- g_n / ||g_n||_2               (unit norm over all output pixels, per image)
        s_nc = sum_{h,w} A_c * dA_c          (backprop of the normalized g_n)
        I_c  = sum_n |s_nc|                  reduce="abs"
             = sum_n  s_nc^2                 reduce="sq"
      First-order Taylor estimate of how much removing filter c changes the OUTPUT of image n, with
      every image weighted equally (the normalization removes the scale of each image's gradient).

    taylor            (Molchanov et al. 2019, Taylor-FO on BatchNorm outputs)
        I_c  = sum_B ( sum_{n in B, h, w} A_c * dL_B/dA_c )^2,   L_B the mean loss of mini-batch B
      (signal="random" backpropagates an unnormalized N(0, I) output gradient instead of dL_B/dy)

    l1                I_c = ||W_c||_1
    l2                I_c = ||W_c||_2
    bn-scale          I_c = |gamma_c| of the BatchNorm after the conv (Network Slimming); a conv with
                      no BatchNorm after it gets no score and its group is not pruned
    random            I_c ~ U(0, 1), seeded

For a ConvTranspose, W_c is the slice W[:, c]. Scores are accumulated in float64. Every criterion is
one function in `CRITERIA` with the signature of `Criterion`; `compute_importance` is the entry point.

signal="random": z_n is drawn from a generator seeded by (seed, n), n the image's position among the
calibration images, so the scores do not depend on how the loader batches them.

Under torchrun (a process group is initialized; see polyprune.distributed) the data-driven criteria
split the work: every rank iterates the SAME loader, rank r of K forwards/backwards images r, r+K,
r+2K, ... of the first n_images, and the per-rank sums are all-reduced (sum) before they are returned,
so every rank ranks -- and removes -- the same filters. taylor-gradnorm is a sum over images, so K ranks
give the single-process scores up to float rounding. taylor squares per mini-batch: under K ranks its
mini-batches are each rank's share of a loader batch (as in DDP training, where each rank sees its own
mini-batch), so its scores depend on K. The weight criteria and `random` need no communication: the
weights are identical on every rank and `random` is seeded.

Ours, not torch-pruning 1.6's: its importances score whole groups (with consumers' in-channels, over
the group mean), unlike the per-filter formulas above (checked against hand counts in the tests).
Its own pruner is a baseline: criteria tp-taylor / tp-magnitude (metapruner.py, not scored here).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from polyprune import distributed as dist_utils
from polyprune.errors import ConfigError
from polyprune.pruning.layers import Layer, find_layers, model_device

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
REDUCES = ("abs", "sq")
SIGNALS = ("loss", "random")


@dataclass
class Calibration:
    """What the data-driven criteria need; the weight criteria ignore it."""

    loader: Iterable[Any] | None = None
    n_images: int = 64
    reduce: str = "abs"
    signal: str = "loss"
    loss_fn: LossFn | None = None
    seed: int = 0
    rank: int = 0  # this process scores images rank, rank + world, ... (see the module docstring)
    world: int = 1


class Criterion(Protocol):
    def __call__(
        self, model: nn.Module, layers: dict[str, Layer], calib: Calibration
    ) -> dict[str, torch.Tensor]: ...


def _filter_dims(conv: _ConvNd) -> tuple[int, ...]:
    """Weight dims summed for one output channel: all but dim 0 (conv) or dim 1 (ConvTranspose)."""
    keep = 1 if conv.transposed else 0
    return tuple(d for d in range(conv.weight.dim()) if d != keep)


# -------------------------------------------------------------------------------- weight criteria


def l1(model: nn.Module, layers: dict[str, Layer], calib: Calibration) -> dict[str, torch.Tensor]:
    return {n: ly.conv.weight.detach().double().abs().sum(_filter_dims(ly.conv)) for n, ly in layers.items()}


def l2(model: nn.Module, layers: dict[str, Layer], calib: Calibration) -> dict[str, torch.Tensor]:
    return {
        n: ly.conv.weight.detach().double().pow(2).sum(_filter_dims(ly.conv)).sqrt()
        for n, ly in layers.items()
    }


def bn_scale(model: nn.Module, layers: dict[str, Layer], calib: Calibration) -> dict[str, torch.Tensor]:
    # layers without an affine BatchNorm get no score: the engine then leaves their group alone
    return {
        n: ly.norm.weight.detach().double().abs()
        for n, ly in layers.items()
        if ly.norm is not None and ly.norm.weight is not None
    }


def random_scores(model: nn.Module, layers: dict[str, Layer], calib: Calibration) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(calib.seed)
    return {n: torch.rand(layers[n].out_channels, generator=gen, dtype=torch.float64) for n in sorted(layers)}


# -------------------------------------------------------------------------------- Taylor criteria


class _FeatureRecorder:
    """Forward hooks on each layer's feature module; per batch, s[name] = sum over space of A * dA, (B, C).

    A is cloned in the forward hook because an in-place ReLU may overwrite the BatchNorm output later;
    the tensor hook registered before that in-place op receives dL/dA of the pre-ReLU value.
    """

    def __init__(self, layers: dict[str, Layer]) -> None:
        self.s: dict[str, torch.Tensor] = {}
        self._handles = [ly.feature_module.register_forward_hook(self._hook(n)) for n, ly in layers.items()]

    def _hook(self, name: str) -> Callable[..., None]:
        def forward_hook(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
            if not out.requires_grad:
                return
            a = out.detach().clone()

            def grad_hook(grad: torch.Tensor) -> None:
                s = (a.double() * grad.double()).flatten(2).sum(2)
                self.s[name] = self.s[name] + s if name in self.s else s  # a module run twice adds up

            out.register_hook(grad_hook)

        return forward_hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _batches(
    calib: Calibration, device: torch.device, need_target: bool
) -> Iterator[tuple[torch.Tensor, Any, list[int]]]:
    """(x, target, image indices) mini-batches of this rank's share of the first `n_images` images.

    Image n (counted over the whole loader) belongs to rank n % world; a loader batch with none of
    this rank's images is skipped.
    """
    if calib.loader is None:
        raise ConfigError("this criterion needs calibration images: pass a calibration_loader")
    if calib.n_images < 1:
        raise ConfigError(f"n_images must be >= 1, got {calib.n_images}")
    seen = 0
    for batch in calib.loader:
        if isinstance(batch, dict):
            x, t = batch.get("image"), batch.get("mask")
        elif isinstance(batch, (list, tuple)):
            x, t = batch[0], batch[1] if len(batch) > 1 else None
        else:
            x, t = batch, None
        if need_target and t is None:
            raise ConfigError(
                "signal 'loss' needs (image, mask) batches; use signal 'random' for unlabeled data"
            )
        take = min(x.shape[0], calib.n_images - seen)
        mine = [j for j in range(take) if (seen + j) % calib.world == calib.rank]
        if mine:
            sel = torch.tensor(mine) if len(mine) < x.shape[0] else slice(None)
            xs = x[sel].to(device)
            ts = t[sel].to(device) if t is not None else None
            yield xs, ts, [seen + j for j in mine]
        seen += take
        if seen >= calib.n_images:
            return
    if seen == 0:
        raise ConfigError("the calibration loader yielded no images")


def _loss_fn(calib: Calibration) -> LossFn:
    if calib.loss_fn is not None:
        return calib.loss_fn
    from polyprune.losses import make_loss

    return make_loss("bce-dice")


def _taylor_scores(
    model: nn.Module, layers: dict[str, Layer], calib: Calibration, *, per_sample: bool
) -> dict[str, torch.Tensor]:
    """Shared forward/backward loop of both Taylor criteria (see the module docstring)."""
    if calib.reduce not in REDUCES:
        raise ConfigError(f"reduce must be one of {', '.join(REDUCES)}, got {calib.reduce!r}")
    if calib.signal not in SIGNALS:
        raise ConfigError(f"signal must be one of {', '.join(SIGNALS)}, got {calib.signal!r}")
    device = model_device(model)
    loss_fn = _loss_fn(calib) if calib.signal == "loss" else None
    scores = {n: torch.zeros(ly.out_channels, dtype=torch.float64) for n, ly in layers.items()}
    was_training = model.training
    # no parameter gradients: they are not needed, and the user's .grad stays untouched
    requires = {p: p.requires_grad for p in model.parameters()}
    recorder = _FeatureRecorder(layers)
    try:
        model.eval()
        for p in requires:
            p.requires_grad_(False)
        for x, t, idx in _batches(calib, device, need_target=calib.signal == "loss"):
            recorder.s.clear()
            with torch.enable_grad():
                y = model(x.requires_grad_(True))
                g = _output_gradient(y, t, calib.signal, loss_fn, calib.seed, idx, per_sample)
                if per_sample:  # gradient normalization: unit L2 norm per image over all outputs
                    norm = g.flatten(1).norm(dim=1).clamp_min(1e-12)
                    g = g / norm.view(-1, *([1] * (g.dim() - 1)))
                y.backward(gradient=g)
            for n in layers:
                s = recorder.s.get(n)
                if s is None:  # layer not on the path from input to output
                    continue
                s = s.cpu()
                if per_sample:
                    scores[n] += s.abs().sum(0) if calib.reduce == "abs" else s.pow(2).sum(0)
                else:
                    scores[n] += s.sum(0).pow(2)
    finally:
        recorder.close()
        for p, r in requires.items():
            p.requires_grad_(r)
        model.train(was_training)
    return scores


def _image_seed(seed: int, n: int) -> int:
    """Seed of image n's random output gradient: a function of (seed, n) only."""
    return (seed * 1_000_003 + n) % 2**63


def _output_gradient(
    y: torch.Tensor,
    t: torch.Tensor | None,
    signal: str,
    loss_fn: LossFn | None,
    seed: int,
    idx: list[int],
    per_sample: bool,
) -> torch.Tensor:
    if signal == "random":
        z = [
            torch.randn(y.shape[1:], generator=torch.Generator().manual_seed(_image_seed(seed, n)))
            for n in idx
        ]
        return torch.stack(z).to(device=y.device, dtype=y.dtype)
    assert loss_fn is not None and t is not None
    y_leaf = y.detach().requires_grad_(True)
    with torch.enable_grad():
        if per_sample:
            # one loss per image: d(sum_n L_n)/dy_n = dL_n/dy_n, whatever batch statistics the loss uses
            loss = sum(loss_fn(y_leaf[i : i + 1], t[i : i + 1]) for i in range(y.shape[0]))
        else:
            loss = loss_fn(y_leaf, t)  # the mean mini-batch loss, as in Molchanov's training-time criterion
        (g,) = torch.autograd.grad(loss, y_leaf)
    return g


def taylor_gradnorm(
    model: nn.Module, layers: dict[str, Layer], calib: Calibration
) -> dict[str, torch.Tensor]:
    return _taylor_scores(model, layers, calib, per_sample=True)


def taylor(model: nn.Module, layers: dict[str, Layer], calib: Calibration) -> dict[str, torch.Tensor]:
    return _taylor_scores(model, layers, calib, per_sample=False)


CRITERIA: dict[str, Criterion] = {
    "taylor-gradnorm": taylor_gradnorm,
    "taylor": taylor,
    "l1": l1,
    "l2": l2,
    "bn-scale": bn_scale,
    "random": random_scores,
}
DATA_CRITERIA = ("taylor-gradnorm", "taylor", "tp-taylor")
PRUNER_CRITERIA = ("tp-taylor", "tp-magnitude")  # torch-pruning's MetaPruner ranks these (metapruner.py)


def check_criterion(criterion: str, *, scored: bool = False) -> None:
    """The one check of a criterion name (prune_model, compute_importance and PruneConfig use it);
    scored=True: only those scored here, not torch-pruning's."""
    names = [*CRITERIA] if scored else [*CRITERIA, *PRUNER_CRITERIA]
    if criterion not in names:
        raise ConfigError(f"unknown criterion {criterion!r}; choose from {', '.join(names)}")


def compute_importance(
    model: nn.Module,
    criterion: str = "taylor-gradnorm",
    calibration_loader: Iterable[Any] | None = None,
    *,
    example_input: torch.Tensor | None = None,
    layers: dict[str, Layer] | None = None,
    reduce: str = "abs",
    signal: str = "loss",
    loss_fn: LossFn | None = None,
    n_images: int = 64,
    seed: int = 0,
    distributed: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Scores (float64, one per output channel) keyed by conv name, for `layers` (default: every conv).

    `layers` comes from `find_layers(model, example_input)`; pass one of the two.

    `distributed` (default: whether a torch.distributed process group is initialized): the
    data-driven criteria score this rank's share of the calibration images and all-reduce the sums,
    so EVERY rank must call this with the same loader, layers and options. Pass False to score all
    images in this process alone (e.g. on rank 0 only).
    """
    check_criterion(criterion, scored=True)
    if layers is None:
        if example_input is None:
            raise ConfigError("compute_importance needs example_input or layers")
        layers = find_layers(model, example_input)
    if distributed is None:
        distributed = dist_utils.is_distributed()
    shard = distributed and criterion in DATA_CRITERIA
    rank, world = (dist_utils.rank(), dist_utils.world_size()) if shard else (0, 1)
    calib = Calibration(calibration_loader, n_images, reduce, signal, loss_fn, seed, rank, world)
    scores = CRITERIA[criterion](model, layers, calib)
    if shard and world > 1:
        scores = dist_utils.all_reduce_sum_dict(scores)
    return scores
