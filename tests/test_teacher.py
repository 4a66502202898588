import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polyprune.errors import ConfigError
from polyprune.io import InputSpec, save_model
from polyprune.models import build_model
from polyprune.teacher import Teacher, load_teacher, tta_views_logits
from polyprune.tta import TTA_VIEWS, make_views, merge_views

TF = InputSpec(size=32, mean=(127 / 255,) * 3, std=(128 / 255,) * 3)  # EfficientNet-Lite's scaling
IMAGENET = InputSpec(size=32)


def _unet(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("unet", base_width=4).eval()


def _normalize(img: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    return (img - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)


@pytest.mark.parametrize("mode", list(TTA_VIEWS))
def test_torch_views_agree_with_the_numpy_tta_of_predict(mode):
    """The teacher's batched views must be exactly the `predict --tta` ones (polyprune.tta), not a
    look-alike: same turns, same mirrors, undone in the same order."""
    model = _unet(0)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ours = tta_views_logits(model, x, mode)[0, 0].numpy()
        views = torch.from_numpy(make_views(x[0].numpy(), mode))
        theirs = merge_views(model(views)[:, 0].numpy(), mode)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(st.sampled_from(list(TTA_VIEWS)), st.integers(0, 2**16))
def test_views_of_a_pixelwise_model_change_nothing(mode, seed):
    conv = torch.nn.Conv2d(3, 1, 1)  # a 1x1 conv commutes with every flip and turn
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(tta_views_logits(conv, x, mode), conv(x), atol=1e-5, rtol=1e-5)


def test_ensemble_feeds_each_member_its_own_preprocessing_and_averages_logits(tmp_path):
    a, b = _unet(1), _unet(2)
    save_model(tmp_path / "a.safetensors", a, input_spec=IMAGENET)
    save_model(tmp_path / "b.safetensors", b, input_spec=TF)
    teacher = load_teacher([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], IMAGENET, tta="hflip")
    img = torch.rand(2, 3, 32, 32)
    xa, xb = _normalize(img, IMAGENET), _normalize(img, TF)
    with torch.no_grad():
        want = (a(xa) + a(xa.flip(3)).flip(3) + b(xb) + b(xb.flip(3)).flip(3)) / 4
        got = teacher(xa)  # the student's batch, in the student's (ImageNet) normalization
        wrong = (a(xa) + a(xa.flip(3)).flip(3) + b(xa) + b(xa.flip(3)).flip(3)) / 4
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - wrong).abs().max() > 1e-3  # the preprocessing really matters for this member


def test_one_file_in_the_students_preprocessing_is_that_model(tmp_path):
    save_model(tmp_path / "a.safetensors", _unet(1), input_spec=IMAGENET)
    assert not isinstance(load_teacher(tmp_path / "a.safetensors", IMAGENET), Teacher)
    assert isinstance(load_teacher(tmp_path / "a.safetensors", TF), Teacher)  # must renormalize
    assert isinstance(load_teacher(tmp_path / "a.safetensors", IMAGENET, tta="hflip"), Teacher)


def test_teacher_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="at least one"):
        load_teacher([], IMAGENET)
    save_model(tmp_path / "a.safetensors", _unet(1), input_spec=IMAGENET)
    with pytest.raises(ConfigError, match="unknown TTA mode"):
        load_teacher(tmp_path / "a.safetensors", IMAGENET, tta="x")
