"""PruneConfig: the recipe's per-criterion defaults are resolved when the config is made, so the trajectory
(and the resume check) records the values that ran."""

from __future__ import annotations

import pytest

from polyprune.pruning.config import PruneConfig


def _cfg(**kw) -> PruneConfig:
    return PruneConfig(model="m.safetensors", data=[], out="run", **kw)


@pytest.mark.parametrize(
    ("criterion", "cost", "round_to"),
    [("taylor-gradnorm", "macs", 8), ("taylor", "none", 8), ("l1", "none", 8), ("tp-taylor", "none", 1)],
)
def test_defaults_follow_the_criterion(criterion, cost, round_to):
    cfg = _cfg(criterion=criterion)
    assert (cfg.cost, cfg.round_to) == (cost, round_to)


def test_explicit_values_are_kept():
    cfg = _cfg(criterion="taylor-gradnorm", cost="none", round_to=4)
    assert (cfg.cost, cfg.round_to) == ("none", 4)


def test_a_teacher_needs_distillation_and_a_known_tta_mode():
    from polyprune.errors import ConfigError
    from polyprune.pruning.config import check_config

    base = dict(target_macs=0.5)
    with pytest.raises(ConfigError, match="--distill"):
        check_config(_cfg(teacher_tta="hflip", **base))
    with pytest.raises(ConfigError, match="--distill"):
        check_config(_cfg(teacher=["t.safetensors"], **base))
    with pytest.raises(ConfigError, match="TTA mode"):
        check_config(_cfg(teacher_tta="spin", distill=1.0, **base))
    check_config(_cfg(teacher_tta="hflip", distill=1.0, **base))
