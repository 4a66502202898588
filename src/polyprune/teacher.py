"""The teacher a student is distilled from: one trained model file, or several averaged, optionally over
test-time-augmentation views.

    teacher = load_teacher(["zoo/a.safetensors", "zoo/b.safetensors"], student_spec, tta="hflip")
    t_logits = teacher(x)   # x preprocessed the student's way; (N, 1, S, S) mean logits

Why: an ensemble with flips scores higher than any of its members (the MobileNetV2 + EfficientNet-Lite0
parents with `hflip` reach pooled validation Dice 0.918 against 0.907 for the first alone), but costs
several forward passes per frame. Distilling it into one network moves part of that gain into a model
that runs at the speed of one pass. Each member gets its input in its own preprocessing (an
EfficientNet-Lite expects TF scaling, a MobileNetV2 ImageNet mean/std): the student's normalized batch
is mapped back to [0, 1] and normalized again per member. Logits are averaged, as `polyprune.tta` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from polyprune.errors import ConfigError
from polyprune.io import InputSpec, load_model, read_metadata
from polyprune.tta import TTA_VIEWS, check_tta


def tta_views_logits(model: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """(N, C, S, S) -> (N, 1, S, S): `model`'s logits averaged over the views of `mode` (each undone)."""
    out = None
    spec = TTA_VIEWS[check_tta(mode)]
    for k, mirror in spec:
        v = torch.rot90(x, k, dims=(2, 3))
        v = v.flip(3) if mirror else v
        lg = model(v)
        lg = lg.flip(3) if mirror else lg  # undo in reverse order: mirror first, then the turn
        lg = torch.rot90(lg, -k, dims=(2, 3))
        out = lg if out is None else out + lg
    return out / len(spec)


class Teacher(nn.Module):
    """Mean logits of `members` over the `tta` views; input in `student_spec`'s normalization."""

    def __init__(
        self,
        members: Sequence[nn.Module],
        member_specs: Sequence[InputSpec],
        student_spec: InputSpec,
        tta: str = "none",
    ) -> None:
        super().__init__()
        if not members or len(members) != len(member_specs):
            raise ConfigError("a teacher needs at least one model, each with its input spec")
        self.members = nn.ModuleList(members)
        self.tta = check_tta(tta)
        # x_member = x_student * scale + shift per channel: back to [0, 1], then the member's mean/std
        s_mean, s_std = torch.tensor(student_spec.mean), torch.tensor(student_spec.std)
        for i, spec in enumerate(member_specs):
            m_mean, m_std = torch.tensor(spec.mean), torch.tensor(spec.std)
            self.register_buffer(f"scale{i}", (s_std / m_std).view(1, 3, 1, 1), persistent=False)
            self.register_buffer(f"shift{i}", ((s_mean - m_mean) / m_std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for i, member in enumerate(self.members):
            xi = x * getattr(self, f"scale{i}") + getattr(self, f"shift{i}")
            lg = tta_views_logits(member, xi, self.tta)
            total = lg if total is None else total + lg
        return total / len(self.members)


def teacher_of(
    members: Sequence[nn.Module],
    member_specs: Sequence[InputSpec],
    student_spec: InputSpec,
    tta: str = "none",
) -> nn.Module:
    """A `Teacher` of `members`, or the one member itself when it needs no wrapper (no TTA, and it shares
    the student's preprocessing)."""
    same = all((s.mean, s.std) == (student_spec.mean, student_spec.std) for s in member_specs)
    if len(members) == 1 and check_tta(tta) == "none" and same:
        return members[0]
    return Teacher(members, member_specs, student_spec, tta)


def load_teacher(
    paths: str | Path | Sequence[str | Path], student_spec: InputSpec, tta: str = "none"
) -> nn.Module:
    """`teacher_of` the model files `paths` (several are averaged)."""
    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    if not paths:
        raise ConfigError("a teacher needs at least one model file")
    return teacher_of(
        [load_model(p).eval() for p in paths], [read_metadata(p).input for p in paths], student_spec, tta
    )
