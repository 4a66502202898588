import warnings

import pytest
import torch

from polyprune import device as device_mod
from polyprune.device import resolve_precision
from polyprune.errors import ConfigError


@pytest.fixture
def fresh_warning():
    device_mod._warn_slow_bf16.cache_clear()
    yield
    device_mod._warn_slow_bf16.cache_clear()


def test_auto_is_fp32_on_the_cpu_and_bad_names_are_refused():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(ConfigError, match="fp32 or bf16"):
        resolve_precision("fp8", torch.device("cpu"))


@pytest.mark.parametrize("fast", [True, False])
def test_bf16_on_a_cpu_without_native_bf16_warns_once(monkeypatch, fresh_warning, fast):
    monkeypatch.setattr(device_mod, "cpu_has_fast_bf16", lambda: fast)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):  # a prune run resolves precision once per fine-tuning stage
            assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    slow = [w for w in caught if "emulated" in str(w.message)]
    assert len(slow) == (0 if fast else 1)
    if slow:
        assert "--precision fp32" in str(slow[0].message)
