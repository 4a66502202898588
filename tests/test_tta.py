"""Test-time augmentation: views undo exactly, the Predictor averages them, evaluate and the CLI pass it on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cli_helpers import assert_error, cli
from polyprune.errors import ConfigError
from polyprune.evaluate import evaluate_model
from polyprune.export import synthetic_image
from polyprune.io import InputSpec
from polyprune.predictor import Predictor
from polyprune.tta import TTA_VIEWS, make_views, merge_views

SIZE = 16


@settings(max_examples=25, deadline=None)
@given(mode=st.sampled_from(sorted(TTA_VIEWS)), seed=st.integers(0, 2**16))
def test_merging_the_views_of_an_identity_model_gives_back_the_input(mode, seed):
    x = np.random.default_rng(seed).normal(size=(3, 8, 8)).astype(np.float32)
    views = make_views(x, mode)
    assert views.shape == (len(TTA_VIEWS[mode]), 3, 8, 8) and views.flags.c_contiguous
    np.testing.assert_array_equal(views[0], x)  # view 0 is the input itself
    np.testing.assert_allclose(merge_views(views[:, 1], mode), x[1], rtol=0, atol=1e-6)


def test_views_are_the_distinct_dihedral_symmetries():
    x = np.arange(3 * 4 * 4, dtype=np.float32).reshape(3, 4, 4)  # no symmetry of its own
    for mode, spec in TTA_VIEWS.items():
        views = make_views(x, mode)
        assert len({v.tobytes() for v in views}) == len(spec), mode
    np.testing.assert_array_equal(make_views(x, "hflip")[1], x[:, :, ::-1])
    flips = make_views(x, "flips")
    np.testing.assert_array_equal(flips[2], x[:, ::-1, ::-1])  # both mirrors
    np.testing.assert_array_equal(flips[3], x[:, ::-1, :])  # up-down mirror


def test_bad_mode_and_bad_view_count():
    with pytest.raises(ConfigError, match="unknown TTA mode 'mirror'; choose from none, hflip"):
        make_views(np.zeros((3, 4, 4), np.float32), "mirror")
    with pytest.raises(ConfigError, match="unknown TTA mode"):
        Predictor(nn.Conv2d(3, 1, 1), tta="mirror")
    with pytest.raises(ValueError, match="hflip has 2 views, got 3"):
        merge_views(np.zeros((3, 4, 4), np.float32), "hflip")


class _LeftEdge(nn.Module):
    """Logit = the red channel times a left-to-right ramp: not mirror-symmetric, so TTA must change it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(-1.0, 1.0, x.shape[-1])
        return x[:, :1] * ramp


def test_predictor_averages_the_logits_of_the_views():
    spec = InputSpec(size=SIZE, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    image = synthetic_image(SIZE, SIZE, seed=1)
    plain = Predictor(_LeftEdge(), input_spec=spec)
    mirrored = Predictor(_LeftEdge(), input_spec=spec, tta="hflip")
    x = plain.preprocess(image)
    f = plain.predict_logits(x[None])[0, 0]
    f_of_mirror = plain.predict_logits(x[None, :, :, ::-1].copy())[0, 0]
    np.testing.assert_allclose(mirrored.infer(x), 0.5 * (f + f_of_mirror[:, ::-1]), atol=1e-6)
    assert np.abs(mirrored.infer(x) - f).max() > 0.1  # the ramp is odd: averaging changes the logits
    assert mirrored.describe()["tta"] == "hflip" and "tta='hflip'" in repr(mirrored)
    assert plain.predict(image).shape == mirrored.predict(image).shape == (SIZE, SIZE)


def test_tta_is_a_no_op_for_a_symmetric_model(model_file, onnx_file):
    pointwise = nn.Conv2d(3, 1, 1)  # a 1x1 conv commutes with every flip and turn
    image = synthetic_image(40, 30, seed=2)
    ref = Predictor(pointwise, input_spec=InputSpec(size=SIZE)).predict(image)
    for mode in TTA_VIEWS:
        out = Predictor(pointwise, input_spec=InputSpec(size=SIZE), tta=mode).predict(image)
        np.testing.assert_allclose(out, ref, atol=1e-6)
    # ONNX Runtime's batch-1 graph runs the views one by one and gives the torch numbers
    torch_d4 = Predictor(model_file, tta="d4").predict(image)
    ort_d4 = Predictor(onnx_file, threads=1, tta="d4").predict(image)
    assert np.abs(ort_d4 - torch_d4).max() < 1e-4


def test_evaluate_records_tta_and_refuses_it_on_a_ready_predictor(synth_dir, model_file):
    res = evaluate_model(model_file, [synth_dir], progress=False, tta="hflip")
    assert res.meta["tta"] == "hflip"
    assert evaluate_model(model_file, [synth_dir], progress=False).meta["tta"] == "none"
    with pytest.raises(ConfigError, match="set on the Predictor itself"):
        evaluate_model(Predictor(model_file), [synth_dir], progress=False, tta="hflip")


def test_cli_tta_errors(capsys, synth_dir, model_file, tmp_path):
    assert_error(
        cli(capsys, "evaluate", "--model", model_file, "--data", synth_dir, "--tta", "x"), "TTA mode"
    )
    assert_error(
        cli(capsys, "evaluate", "--preds", tmp_path, "--data", synth_dir, "--tta", "hflip"),
        "--tta needs --model",
    )
    rc, _, err = cli(capsys, "evaluate", "--model", model_file, "--data", synth_dir, "--tta", "flips", "-q")
    assert rc == 0, err


def test_cli_predict_with_tta_records_it(capsys, synth_dir, model_file, tmp_path):
    import json

    out = tmp_path / "pred"
    rc, _, err = cli(
        capsys,
        "predict",
        "--model",
        model_file,
        "--source",
        synth_dir / "images",
        "--out",
        out,
        "--tta",
        "hflip",
    )
    assert rc == 0, err
    record = json.loads((out / "predict.json").read_text())
    assert record["tta"] == "hflip" and record["frames"] == len(list((synth_dir / "images").iterdir()))
