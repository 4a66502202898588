import os
import pickle

import pytest
import torch

from polyprune.errors import ModelFileError
from polyprune.io import InputSpec, load_model, read_metadata, save_model
from polyprune.models import build_model


def test_save_load_roundtrip_identical_outputs(tmp_path):
    torch.manual_seed(0)
    m = build_model("unet", base_width=4).eval()
    path = save_model(tmp_path / "m.safetensors", m, input_spec=InputSpec(size=32), train={"epochs": 1})
    m2 = load_model(path)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(m(x), m2(x))
    meta = read_metadata(path)
    assert meta.input.size == 32 and meta.arch["name"] == "unet" and meta.train == {"epochs": 1}


def test_not_safetensors_and_truncated_files(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"this is not a model")
    with pytest.raises(ModelFileError, match=r"x\.safetensors"):
        load_model(bad)
    m = build_model("unet", base_width=4)
    good = save_model(tmp_path / "g.safetensors", m, input_spec=InputSpec(size=32))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelFileError, match=r"cut\.safetensors"):
        load_model(cut)
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "missing.safetensors")


def test_metadata_with_wrong_architecture_is_refused(tmp_path):
    m = build_model("unet", base_width=4)
    wrong = save_model(
        tmp_path / "w.safetensors", m, input_spec=InputSpec(size=32), arch={"name": "unet", "base_width": 8}
    )
    with pytest.raises(ModelFileError, match="do not match"):
        load_model(wrong)
    other = save_model(tmp_path / "o.safetensors", m, input_spec=InputSpec(size=32), arch={"name": "resnet"})
    with pytest.raises(ModelFileError, match="cannot be built"):
        load_model(other)


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['POLYPRUNE_MARKER']}",))


def test_pickle_file_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("POLYPRUNE_MARKER", str(marker))
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(ModelFileError):
        load_model(evil)
    assert not marker.exists()
