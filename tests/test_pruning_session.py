"""PruneSession: what a prune run distills from (the unpruned parent, over TTA views, or other files)."""

from __future__ import annotations

import torch

from polyprune.io import InputSpec, save_model
from polyprune.models import build_model
from polyprune.pruning.config import PruneConfig
from polyprune.pruning.session import PruneSession
from polyprune.teacher import Teacher


def _session(model_file, data, tmp_path, **kw) -> PruneSession:
    cfg = PruneConfig(
        model=str(model_file), data=[str(data)], out=str(tmp_path / "run"), target_macs=0.5, threads=1,
        progress=False, **kw,
    )  # fmt: skip
    return PruneSession(cfg)


def test_the_teacher_is_an_unpruned_copy_of_the_parent_or_the_named_files(model_file, data, tmp_path):
    x = torch.randn(1, 3, 32, 32)
    assert _session(model_file, data, tmp_path).teacher is None  # no --distill: no teacher
    s = _session(model_file, data, tmp_path, distill=1.0)
    assert not isinstance(s.teacher, Teacher) and s.teacher is not s.parent
    s = _session(model_file, data, tmp_path, distill=1.0, teacher_tta="hflip")
    assert isinstance(s.teacher, Teacher) and s.teacher.tta == "hflip"
    with torch.no_grad():
        want = (s.parent.eval()(x) + s.parent(x.flip(3)).flip(3)) / 2
        torch.testing.assert_close(s.teacher(x), want)
    other = build_model("unet", base_width=4).eval()
    path = save_model(tmp_path / "other.safetensors", other, input_spec=InputSpec(size=32))
    s = _session(model_file, data, tmp_path, distill=1.0, teacher=[str(path)])
    with torch.no_grad():
        torch.testing.assert_close(s.teacher(x), other(x))
