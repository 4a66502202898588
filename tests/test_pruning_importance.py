"""Importance criteria: formulas, gradient normalization, fidelity to the true effect of removing a filter."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn
from torch.nn import functional as F

from polyprune.errors import ConfigError
from polyprune.models import build_model
from polyprune.pruning.importance import CRITERIA, compute_importance
from polyprune.pruning.layers import find_layers

N = 16


def _unet(seed: int = 0, **kw) -> nn.Module:
    """A tiny UNet with non-trivial BatchNorm (an untrained one has gamma=1, beta=0, unit statistics)."""
    torch.manual_seed(seed)
    m = build_model("unet", base_width=4, depth=2, **kw)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.2, 1.5)
                mod.bias.uniform_(-0.3, 0.3)
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


def _data(n: int = N, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = (torch.rand(n, 1, 32, 32, generator=g) > 0.5).float()
    return x, y


def _loader(x: torch.Tensor, y: torch.Tensor, batch: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)]


def _layers(model: nn.Module, x: torch.Tensor) -> dict:
    layers = find_layers(model, x[:1])
    layers.pop("head")
    return layers


def _flat(scores: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([scores[k] for k in sorted(scores)])


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
def test_every_criterion_scores_every_channel(criterion):
    m = _unet()
    x, y = _data(8)
    layers = _layers(m, x)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    scores = compute_importance(m, criterion, _loader(x, y), layers=layers, n_images=8)
    expected = {n for n, ly in layers.items() if criterion != "bn-scale" or ly.norm is not None}
    assert set(scores) == expected
    for n in expected:
        assert scores[n].shape == (layers[n].out_channels,) and torch.isfinite(scores[n]).all()
        assert (scores[n] >= 0).all()
    # scoring changes nothing: weights, BN statistics, .grad and the train/eval mode stay as they were
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(p.grad is None for p in m.parameters()) and not m.training


def test_weight_criteria_formulas():
    m = _unet()
    layers = _layers(m, torch.zeros(1, 3, 32, 32))
    w = m.enc0.conv1.weight.detach().double()
    assert torch.allclose(compute_importance(m, "l1", layers=layers)["enc0.conv1"], w.abs().sum((1, 2, 3)))
    assert torch.allclose(
        compute_importance(m, "l2", layers=layers)["enc0.conv1"], w.pow(2).sum((1, 2, 3)).sqrt()
    )
    wt = m.up0.weight.detach().double()  # ConvTranspose: (in, out, k, k), filters along dim 1
    assert torch.allclose(compute_importance(m, "l1", layers=layers)["up0"], wt.abs().sum((0, 2, 3)))
    bn = compute_importance(m, "bn-scale", layers=layers)
    assert torch.allclose(bn["dec0.conv1"], m.dec0.bn1.weight.detach().double().abs())


def test_taylor_gradnorm_matches_the_formula_by_hand():
    """s_nc = sum_hw A * dA with the per-image unit-norm output gradient; I = sum_n |s_nc| or s_nc^2."""
    m = _unet()
    x, y = _data(4)
    layers = _layers(m, x)
    feats = {}
    h = m.enc1.bn2.register_forward_hook(lambda mod, i, o: feats.__setitem__("a", o))
    xx = x.clone().requires_grad_(True)
    out = m(xx)
    a = feats["a"]
    a.retain_grad()
    h.remove()
    y_leaf = out.detach().requires_grad_(True)
    loss = sum(F.binary_cross_entropy_with_logits(y_leaf[i : i + 1], y[i : i + 1]) for i in range(4))
    (g,) = torch.autograd.grad(loss, y_leaf)
    g = g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    out.backward(g)
    s = (a * a.grad).sum((2, 3)).double()
    for reduce, want in (("abs", s.abs().sum(0)), ("sq", s.pow(2).sum(0))):
        got = compute_importance(
            m,
            "taylor-gradnorm",
            [(x, y)],
            layers=layers,
            reduce=reduce,
            loss_fn=F.binary_cross_entropy_with_logits,
        )["enc1.conv2"]
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-12)


def test_gradient_normalization_makes_each_image_count_equally():
    """Scale one image's loss by 100: taylor-gradnorm's scores stay (up to rounding), plain taylor's move."""
    m = _unet()
    x, y = _data(8)
    special = y[3].clone()
    layers = _layers(m, x)

    def weighted_loss(scale: float):
        def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            w = torch.tensor([scale if torch.equal(t, special) else 1.0 for t in target]).view(-1, 1, 1, 1)
            return (w * F.binary_cross_entropy_with_logits(logits, target, reduction="none")).mean()

        return loss

    def scores(criterion: str, scale: float) -> torch.Tensor:
        kw = {"layers": layers, "loss_fn": weighted_loss(scale), "n_images": 8}
        return _flat(compute_importance(m, criterion, _loader(x, y), **kw))

    gn1, gn100 = scores("taylor-gradnorm", 1.0), scores("taylor-gradnorm", 100.0)
    assert torch.allclose(gn1, gn100, rtol=1e-6)
    assert torch.equal(torch.argsort(gn1), torch.argsort(gn100))
    t1, t100 = scores("taylor", 1.0), scores("taylor", 100.0)
    assert spearmanr(t1, t100).statistic < 0.99  # one image now dominates plain Taylor's ranking
    assert not torch.equal(torch.argsort(t1), torch.argsort(t100))


def test_taylor_gradnorm_ranks_filters_like_removing_them_does():
    """Brute force: remove each filter alone (zero its BN output, or its ConvTranspose slice) and measure
    sum_n ||y_n' - y_n||_2 over the calibration images.

    Why this is a real test: with signal="random" each image's output gradient g_n is a random unit
    direction, so E|<g_n, J_n a_c>| is proportional to ||J_n a_c||, the first-order change of image n's
    output when filter c (feature map a_c) is removed. taylor-gradnorm with reduce="abs" therefore
    estimates exactly the brute-force quantity, over all layers at once (the global ranking). Hooking the
    wrong tensor, dropping the normalization or mixing images would break the correlation; the weight
    norm l1 and random scores, which ignore the data, are shown not to pass the same bar.
    """
    m = _unet()
    x, y = _data(32)
    layers = _layers(m, x)
    names = {mod: n for n, mod in m.named_modules()}
    loader = _loader(x, y, batch=8)
    est = compute_importance(m, "taylor-gradnorm", loader, layers=layers, signal="random", n_images=32)
    truth: dict[str, list[float]] = {}
    with torch.no_grad():
        base = m(x)
        for name, ly in sorted(layers.items()):
            truth[name] = []
            for c in range(ly.out_channels):
                m2 = _unet()
                if ly.norm is not None:
                    bn = m2.get_submodule(names[ly.norm])
                    bn.weight[c] = 0
                    bn.bias[c] = 0
                else:
                    conv = m2.get_submodule(name)
                    conv.weight[:, c] = 0
                    conv.bias[c] = 0
                truth[name].append(float((m2(x) - base).flatten(1).norm(dim=1).sum()))
    flat_truth = [v for n in sorted(truth) for v in truth[n]]
    rho = spearmanr(flat_truth, _flat(est)).statistic
    within = [spearmanr(truth[n], est[n]).statistic for n in sorted(truth)]
    assert rho >= 0.5, rho
    assert sum(within) / len(within) >= 0.5, within
    for baseline in ("l1", "random"):
        other = compute_importance(m, baseline, layers=layers)
        assert spearmanr(flat_truth, _flat(other)).statistic < rho


def test_seeded_criteria_are_deterministic():
    m = _unet()
    x, y = _data(8)
    layers = _layers(m, x)
    for crit, kw in (("random", {}), ("taylor-gradnorm", {"signal": "random"})):
        a = compute_importance(m, crit, _loader(x, y), layers=layers, seed=3, **kw)
        b = compute_importance(m, crit, _loader(x, y), layers=layers, seed=3, **kw)
        c = compute_importance(m, crit, _loader(x, y), layers=layers, seed=4, **kw)
        assert torch.equal(_flat(a), _flat(b)) and not torch.equal(_flat(a), _flat(c))


def test_n_images_limits_the_calibration_set():
    m = _unet()
    x, y = _data(12)
    layers = _layers(m, x)
    kw = {"layers": layers, "signal": "random"}
    first8 = compute_importance(m, "taylor-gradnorm", _loader(x[:8], y[:8], batch=3), n_images=8, **kw)
    cut = compute_importance(m, "taylor-gradnorm", _loader(x, y, batch=3), n_images=8, **kw)
    assert torch.allclose(_flat(first8), _flat(cut))


def test_random_signal_needs_no_labels_and_loss_signal_does():
    m = _unet()
    x, _ = _data(4)
    layers = _layers(m, x)
    scores = compute_importance(m, "taylor-gradnorm", [x], layers=layers, signal="random")
    assert set(scores) == set(layers)
    with pytest.raises(ConfigError, match="signal 'loss' needs"):
        compute_importance(m, "taylor-gradnorm", [x], layers=layers, signal="loss")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"criterion": "taylorfo"}, "unknown criterion 'taylorfo'"),
        ({"reduce": "max"}, "reduce must be one of abs, sq, got 'max'"),
        ({"signal": "noise"}, "signal must be one of loss, random, got 'noise'"),
        ({"loader": None}, "needs calibration images"),
        ({"n_images": 0}, "n_images must be >= 1, got 0"),
    ],
)
def test_bad_options_are_config_errors(kw, match):
    m = _unet()
    x, y = _data(4)
    args = {"criterion": "taylor-gradnorm", "loader": [(x, y)], **kw}
    with pytest.raises(ConfigError, match=match):
        compute_importance(
            m,
            args.pop("criterion"),
            args.pop("loader"),
            example_input=x[:1],
            **args,
        )
