"""Multi-scale training: per-step sizes from (seed, step), binary masks, and fit / train / CLI wiring."""

import pytest
import torch

from cli_helpers import assert_error, cli
from polyprune.errors import ConfigError
from polyprune.fit import fit
from polyprune.io import InputSpec
from polyprune.models import build_model
from polyprune.multiscale import MultiScale
from polyprune.train import TrainConfig, make_datasets


def test_sizes_are_stride_multiples_of_each_scale_and_fixed_by_seed_and_step():
    ms = MultiScale((0.75, 1.0, 1.25), stride=32, seed=0)
    sizes = [ms.size_at((352, 352), step) for step in range(60)]
    assert set(sizes) == {(256, 256), (352, 352), (448, 448)}  # 264 and 440 rounded to the stride
    assert sizes == [MultiScale((0.75, 1.0, 1.25), 32, 0).size_at((352, 352), s) for s in range(60)]
    assert sizes != [MultiScale((0.75, 1.0, 1.25), 32, 1).size_at((352, 352), s) for s in range(60)]


def test_rescaled_masks_stay_binary_and_images_keep_their_range():
    ms = MultiScale((1.5,), stride=16, seed=0)
    x = torch.rand(2, 3, 32, 32)
    y = (torch.rand(2, 1, 32, 32) > 0.7).float()
    x2, y2 = ms(x, y, 0)
    assert x2.shape == (2, 3, 48, 48) and y2.shape == (2, 1, 48, 48)
    assert set(torch.unique(y2).tolist()) <= {0.0, 1.0} and x2.min() >= 0 and x2.max() <= 1


def test_fit_trains_at_every_scale_and_validates_at_the_data_size(synth_dir):
    tr, val = make_datasets([synth_dir], InputSpec(size=32), val_fraction=0.25, seed=0)
    torch.manual_seed(0)
    model = build_model("unet", base_width=4, depth=2)  # stride 4
    seen: list[tuple[int, int, bool]] = []
    model.register_forward_pre_hook(lambda m, inp: seen.append((*inp[0].shape[-2:], m.training)))
    fit(
        model,
        tr,
        val,
        iters=12,
        batch=4,
        device="cpu",
        precision="fp32",
        progress=False,
        scales=(0.5, 1.0, 1.5),
    )
    assert {(h, w) for h, w, training in seen if training} == {(16, 16), (32, 32), (48, 48)}
    assert {(h, w) for h, w, training in seen if not training} == {(32, 32)}


def test_bad_scales_are_one_line_errors(capsys, tmp_path, synth_dir):
    with pytest.raises(ConfigError, match="scales"):
        TrainConfig(data=[str(synth_dir)], out=str(tmp_path / "run"), scales=[0.0])
    args = ["train", "--data", synth_dir, "--out", tmp_path / "run", "--scales", "0.75,big"]
    assert_error(cli(capsys, *args), "--scales takes numbers")
