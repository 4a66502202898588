"""Physical pruning: coupled groups through skip concats, targets, widths, save/load, user networks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from polyprune.counting import count_macs
from polyprune.errors import ConfigError, ModelFileError, TargetError
from polyprune.io import InputSpec, load_model, save_model
from polyprune.models import build_model
from polyprune.pruning import layer_widths, prune_model, replay_pruning_history
from polyprune.pruning.engine import allowed_width

SIZE = 32


def _unet(upsample: str = "transpose", width: int = 8, depth: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("unet", base_width=width, depth=depth, upsample=upsample).eval()


def _loader(n: int = 8, batch: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, SIZE, SIZE, generator=g)
    y = (torch.rand(n, 1, SIZE, SIZE, generator=g) > 0.5).float()
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


X = torch.randn(1, 3, SIZE, SIZE)


@pytest.mark.parametrize("upsample", ["transpose", "bilinear"])
@pytest.mark.parametrize(("target", "key"), [({"macs": 0.5}, "macs"), ({"params": 0.4}, "params")])
def test_prune_meets_target_keeps_shape_and_head(upsample, target, key):
    m = _unet(upsample, width=16)
    head_w = m.head.weight.detach().clone()
    r = prune_model(m, X, _loader(), "taylor-gradnorm", target, loss_fn=F.binary_cross_entropy_with_logits)
    after, before = (r.macs_after, r.macs_before) if key == "macs" else (r.params_after, r.params_before)
    assert after <= target[key] * before
    assert r.params_after < r.params_before and r.macs_after < r.macs_before
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 1, 64, 64)  # runs, at other sizes too
    assert m.head.out_channels == 1  # the head keeps its output channels...
    kept = [i for i in range(head_w.shape[1]) if i not in dict(r.history).get("dec0.conv2", [])]
    assert torch.equal(m.head.weight.detach(), head_w[:, kept])  # ...and its weights for the kept inputs
    assert "head" not in r.removed
    assert r.widths_after == layer_widths(m)
    cfg = m.config()
    build_model(cfg.pop("name"), **cfg).load_state_dict(m.state_dict())  # config() reads the new widths


def test_ratio_target_removes_that_fraction_of_filters():
    m = _unet()
    total = sum(v for k, v in layer_widths(m).items() if k != "head")
    r = prune_model(m, X, _loader(), "l1", {"ratio": 0.25}, round_to=1)
    assert 0.25 * total <= r.filters_removed <= 0.25 * total + 1
    assert sum(v for k, v in layer_widths(m).items() if k != "head") == total - r.filters_removed


def test_pruned_channels_are_the_ones_the_criterion_ranks_lowest():
    m = _unet()
    ref = copy.deepcopy(m)
    r = prune_model(m, X, None, "l2", {"ratio": 0.3}, round_to=1, min_channels=1)
    norms = {
        n: mod.weight.detach().pow(2).sum((1, 2, 3))
        for n, mod in ref.named_modules()
        if isinstance(mod, nn.Conv2d)
    }
    removed = [float(norms[n][i]) for n, idxs in r.history if n in norms for i in idxs]
    kept = [
        float(v)
        for n, row in norms.items()
        if n != "head"
        for i, v in enumerate(row)
        if i not in dict(r.history).get(n, [])
    ]
    assert max(removed) <= min(kept)  # global ranking: no kept filter scores below a removed one


def test_output_is_exact_when_pruned_channels_are_already_dead():
    """Zero the BN of some channels (their features are 0 after ReLU): pruning them changes nothing."""
    m = _unet()
    with torch.no_grad():
        for bn in (m.enc0.bn2, m.enc1.bn2, m.bottleneck.bn1, m.dec1.bn1):
            bn.weight[:2] = 0
            bn.bias[:2] = 0
    ref = m(X).detach()
    r = prune_model(m, X, None, "bn-scale", {"ratio": 0.01}, round_to=1, min_channels=1)
    assert r.filters_removed >= 1
    assert torch.allclose(m(X), ref, atol=1e-6)


def test_same_seed_same_widths():
    def widths(seed: int) -> dict[str, int]:
        m = _unet(width=8, depth=3)
        prune_model(m, X, _loader(), "taylor-gradnorm", {"macs": 0.4}, signal="random", seed=seed)
        return layer_widths(m)

    assert widths(1) == widths(1)
    rand = [
        prune_model(_unet(), X, None, "random", {"ratio": 0.3}, round_to=1, seed=s).history for s in (5, 5, 6)
    ]
    assert rand[0] == rand[1] != rand[2]


@pytest.mark.parametrize(("round_to", "min_channels"), [(8, 4), (1, 6), (4, 8)])
def test_round_to_and_min_channels(round_to, min_channels):
    m = _unet(width=8, depth=3)
    before = layer_widths(m)
    prune_model(m, X, None, "l1", {"ratio": 0.6}, round_to=round_to, min_channels=min_channels)
    for name, w in layer_widths(m).items():
        if w != before[name]:
            assert w % round_to == 0 and w >= min_channels, (name, w)
    assert any(layer_widths(m)[k] < v for k, v in before.items())


def test_round_to_never_leaves_a_layer_wider_than_the_ranking_asks():
    """torch-pruning's round_to left level 0 unpruned at r=0.75 (env.md); nearest rounding does not."""
    m = _unet(width=16, depth=2)
    prune_model(m, X, None, "l1", {"ratio": 0.75}, scope="uniform", round_to=8, min_channels=4)
    assert m.widths()["enc0.conv1"] == 8 and all(w % 8 == 0 for w in m.widths().values())


def test_allowed_width():
    assert allowed_width(64, 30, 4, 8) == 32  # nearest multiple of 8
    assert allowed_width(64, 28, 4, 8) == 32  # tie keeps more
    assert allowed_width(64, 1, 4, 8) == 8  # never below one multiple / min_channels
    assert allowed_width(12, 5, 4, 8) == 8
    assert allowed_width(6, 1, 4, 8) == 6  # cannot be rounded below its width: untouched
    assert allowed_width(10, 2, 4, 1) == 4


def test_uniform_scope_prunes_every_layer_by_the_same_fraction():
    m = _unet(width=8, depth=2)
    before = m.widths()
    prune_model(m, X, None, "l1", {"ratio": 0.5}, scope="uniform", round_to=1, min_channels=1)
    assert m.widths() == {k: v // 2 for k, v in before.items()}


def test_ignored_layers_stay_whole():
    m = _unet()
    before = layer_widths(m)
    prune_model(m, X, None, "l1", {"ratio": 0.5}, round_to=1, ignored_layers=["enc0", m.bottleneck.conv2])
    after = layer_widths(m)
    for name in ("enc0.conv1", "enc0.conv2", "bottleneck.conv2"):
        assert after[name] == before[name]


def test_unreachable_target_is_a_target_error_and_leaves_the_model_alone():
    m = _unet()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(TargetError, match=r"target macs 0\.0001 \(best reachable 0\.\d+\)"):
        prune_model(m, X, None, "l1", {"macs": 0.0001})
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"target": None}, "needs a target"),
        ({"target": {"flops": 0.5}}, r"unknown target key\(s\) \['flops'\]"),
        ({"target": {"macs": 0.0}}, r"target macs must be a fraction in \(0, 1\], got 0.0"),
        ({"target": {"ratio": 1.0}}, r"target ratio must be in \[0, 1\), got 1.0"),
        ({"criterion": "taylorfo"}, "unknown criterion 'taylorfo'"),
        ({"scope": "layer"}, "scope must be one of global, uniform, got 'layer'"),
        ({"group_reduce": "prod"}, "group_reduce must be one of sum, mean, max, got 'prod'"),
        ({"round_to": 0}, "round_to must be >= 1"),
        ({"min_channels": 0}, "min_channels must be >= 1, got 0"),
        ({"criterion": "taylor-gradnorm"}, "needs calibration images"),
    ],
)
def test_bad_options_are_config_errors(kw, match):
    args = {"criterion": "l1", "target": {"ratio": 0.1}, **kw}
    with pytest.raises(ConfigError, match=match):
        prune_model(_unet(), X, None, args.pop("criterion"), args.pop("target"), **args)


def test_pruned_unet_round_trips_through_save_and_load(tmp_path):
    m = _unet(width=8, depth=3, upsample="bilinear")
    prune_model(m, X, _loader(), "taylor", {"macs": 0.5}, loss_fn=F.binary_cross_entropy_with_logits)
    path = save_model(tmp_path / "p.safetensors", m, input_spec=InputSpec(size=SIZE))
    loaded = load_model(path)
    x = torch.randn(2, 3, SIZE, SIZE)
    assert torch.equal(loaded(x), m.eval()(x))
    assert loaded.widths() == m.widths()


class UserNet(nn.Module):
    """Not from the registry: residual add, concat skip, ConvTranspose, a 1x1 head and a sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.down = nn.Conv2d(16, 24, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(24, 12, 2, stride=2)
        self.fuse = nn.Sequential(nn.Conv2d(16 + 12, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.out = nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        s = F.relu(s + self.b(F.relu(self.a(s))))  # residual: stem and b share their channels
        u = self.up(F.relu(self.down(s)))
        return torch.sigmoid(self.out(self.fuse(torch.cat([s, u], 1))))


def test_user_network_prunes_and_round_trips_with_base_model(tmp_path):
    torch.manual_seed(0)
    net = UserNet().eval()
    loader = [(x, torch.rand(4, 2, SIZE, SIZE)) for x in torch.randn(2, 4, 3, SIZE, SIZE)]
    r = prune_model(net, X, loader, "taylor-gradnorm", {"params": 0.6}, round_to=4, loss_fn=F.mse_loss)
    assert r.params_after <= 0.6 * r.params_before
    w = layer_widths(net)
    assert w["out"] == 2 and w["stem.0"] == w["b"]  # head kept; the residual pair stays coupled
    assert net(torch.randn(1, 3, 48, 48)).shape == (1, 2, 48, 48)
    path = save_model(
        tmp_path / "user.safetensors", net, input_spec=InputSpec(size=SIZE), pruning={"history": r.history}
    )
    with pytest.raises(ModelFileError, match="pass base_model"):
        load_model(path)
    loaded = load_model(path, base_model=UserNet())
    x = torch.randn(2, 3, SIZE, SIZE)
    assert torch.equal(loaded(x), net(x))


def test_history_accumulates_over_calls_and_replays():
    m = _unet(width=8, depth=3)
    history = []
    for _ in range(3):
        history += prune_model(m, X, None, "random", {"ratio": 0.2}, round_to=1, seed=len(history)).history
    fresh = replay_pruning_history(_unet(width=8, depth=3), history, SIZE)
    assert layer_widths(fresh) == layer_widths(m)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh(X), m(X))
    with pytest.raises(ModelFileError, match="'nope'"):
        replay_pruning_history(_unet(), [["nope", [0]]], SIZE)


def test_macs_are_counted_at_the_example_input_size():
    m = _unet()
    assert count_macs(m, 64) == 4 * count_macs(m, SIZE)


# ------------------------------------------------------------------------ users' own networks (issue 16)


class _GatedNet(nn.Module):
    """A 1-channel sigmoid map multiplied into a 16-channel tensor (an attention gate)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.gate = nn.Conv2d(16, 1, 1)
        self.c3, self.b3 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 1, 1)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(x)))
        y = y * torch.sigmoid(self.gate(y))
        return self.head(torch.relu(self.b3(self.c3(y))))


class _GroupNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.g1 = nn.Conv2d(3, 64, 3, padding=1), nn.GroupNorm(32, 64)
        self.c2, self.g2 = nn.Conv2d(64, 64, 3, padding=1), nn.GroupNorm(16, 64)
        self.head = nn.Conv2d(64, 1, 1)

    def forward(self, x):
        return self.head(torch.relu(self.g2(self.c2(torch.relu(self.g1(self.c1(x)))))))


def _user_loader():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(2, 3, 32, 32, generator=g), (torch.rand(2, 1, 32, 32, generator=g) > 0.5).float())]


def test_broadcast_gate_is_left_alone_with_a_warning_and_the_rest_prunes():
    m = _GatedNet()
    with pytest.warns(UserWarning, match="not pruning c2, gate"):
        r = prune_model(m, example_input=torch.randn(1, 3, 32, 32), calibration_loader=_user_loader(),
                        target={"ratio": 0.3}, round_to=4)  # fmt: skip
    assert r.widths_after["c2"] == 16 and r.widths_after["gate"] == 1
    assert r.widths_after["c1"] < 16 or r.widths_after["c3"] < 16
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 1, 32, 32)


def test_groupnorm_widths_stay_multiples_of_its_groups():
    m = _GroupNormNet()
    r = prune_model(m, example_input=torch.randn(1, 3, 32, 32), calibration_loader=_user_loader(),
                    target={"ratio": 0.4}, round_to=1)  # fmt: skip
    assert r.widths_after["c1"] % 32 == 0 and r.widths_after["c2"] % 16 == 0
    assert r.widths_after["c2"] < 64
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 1, 32, 32)


def test_save_model_records_the_history_of_a_pruned_user_module(tmp_path):
    from polyprune.export import export_onnx
    from polyprune.io import InputSpec, load_model, save_model

    torch.manual_seed(0)
    m = _GroupNormNet().eval()
    prune_model(m, example_input=torch.randn(1, 3, 32, 32), calibration_loader=_user_loader(),
                target={"ratio": 0.4}, round_to=1)  # fmt: skip
    path = save_model(tmp_path / "mine.safetensors", m, input_spec=InputSpec(size=32))  # no pruning=...
    back = load_model(path, base_model=_GroupNormNet())
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(back(x), m(x))
    report = export_onnx(path, tmp_path / "mine.onnx", base_model=_GroupNormNet())
    assert (tmp_path / "mine.onnx").is_file() and report.max_abs_diff < 1e-4


# ------------------------------------------------------------------------------------ cost-aware ranking


def test_cost_aware_ranking_removes_the_best_importance_per_mac():
    """Two parallel branches with equal importance per channel; one costs 4x more MACs per channel
    (16x the spatial size). Plain ranking is a tie broken by order; cost="macs" must take the costly one."""

    class TwoBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.big = nn.Conv2d(3, 8, 3, padding=1)  # full resolution
            self.small = nn.Conv2d(3, 8, 3, stride=4, padding=1)  # 1/16 of the pixels
            self.head = nn.Conv2d(16, 1, 1)

        def forward(self, x):
            small = F.interpolate(self.small(x), size=x.shape[2:])
            return self.head(torch.cat([self.big(x), small], 1))

    from polyprune.pruning.groups import group_costs, prunable_groups
    from polyprune.structure import build_graph

    m = TwoBranch()
    x = torch.randn(1, 3, 32, 32)
    dg = build_graph(m, x)
    groups = prunable_groups(m, dg)
    costs = dict(zip([g.root for g in groups], group_costs(m, dg, groups, x, "macs"), strict=True))
    # per channel: big = 27 x 1024 out + 1024 (head's input); small = 27 x 64 out + 1024 (head runs at full size)
    assert costs["big"] == pytest.approx(27 * 1024 + 1024) and costs["small"] == pytest.approx(27 * 64 + 1024)
    r = prune_model(m, example_input=x, criterion="random", target={"ratio": 0.25}, round_to=1, min_channels=1,
                    cost="macs", seed=0)  # fmt: skip
    assert r.removed.get("big", 0) > r.removed.get("small", 0)  # the expensive channels go first
    with pytest.raises(ConfigError, match="cost must be one of"):
        prune_model(TwoBranch(), example_input=x, criterion="l1", target={"ratio": 0.1}, cost="latency-ish")


@pytest.mark.parametrize("arch", ["unet-mobilenetv2", "unet-efficientnet-lite0"])
def test_encoder_unets_prune_reload_and_export(arch, tmp_path):
    """Inverted residual chains and depthwise convs through the dependency graph: the pruned net runs at
    other sizes, reloads from its file bit-exact, and exports to ONNX within tolerance (TF pads too)."""
    from polyprune.export import export_onnx, read_onnx_metadata

    torch.manual_seed(0)
    m = build_model(arch).eval()
    before = m.widths()
    x = torch.randn(1, 3, 64, 64)
    loader = [(torch.randn(2, 3, 64, 64), (torch.rand(2, 1, 64, 64) > 0.5).float())]
    r = prune_model(
        m, x, loader, "taylor-gradnorm", {"macs": 0.6}, loss_fn=F.binary_cross_entropy_with_logits
    )
    assert r.macs_after <= 0.6 * r.macs_before
    after = m.widths()
    assert any(after[k] < v for k, v in before.items() if k.endswith(".hidden"))  # expansion + depthwise
    assert any(after[k] < v for k, v in before.items() if k.startswith("block") and k.endswith(".out"))
    m.eval()
    assert m(torch.randn(1, 3, 96, 96)).shape == (1, 1, 96, 96)
    spec = InputSpec.for_model(m, 64)
    save_model(tmp_path / "p.safetensors", m, input_spec=spec)
    m2 = load_model(tmp_path / "p.safetensors")
    assert m2.widths() == m.widths()
    with torch.no_grad():
        assert torch.equal(m2(x), m(x))
    rep = export_onnx(tmp_path / "p.safetensors", tmp_path / "p.onnx")
    assert max(rep.checks.values()) <= rep.tolerance
    assert read_onnx_metadata(tmp_path / "p.onnx").input.mean == pytest.approx(spec.mean)
