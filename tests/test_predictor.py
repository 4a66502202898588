"""Predictor backends, masks and overlays, image / folder / video prediction, real-time accounting, CLI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from polyprune.errors import ConfigError, DataError, ModelFileError
from polyprune.export import synthetic_image
from polyprune.io import InputSpec
from polyprune.models import build_model
from polyprune.predictor import Predictor, overlay, to_mask

SIZE = 32

IMAGE = synthetic_image(50, 70, seed=3)


def test_torch_api_unchanged(model_file):
    p = Predictor(model_file)
    assert p.backend == "torch" and p.input_spec.size == SIZE
    prob = p.predict(IMAGE)
    assert prob.shape == (50, 70) and prob.dtype == np.float32
    assert prob.min() >= 0.0 and prob.max() <= 1.0
    module = build_model("unet", base_width=4)
    q = Predictor(module, backend="torch", input_spec=InputSpec(size=SIZE))
    assert q.predict(IMAGE).shape == (50, 70)
    assert Predictor(module).input_spec == InputSpec()  # a bare module: defaults


def test_onnxruntime_matches_torch(model_file, onnx_file):
    ref = Predictor(model_file).predict(IMAGE)
    auto = Predictor(onnx_file, threads=1)
    assert auto.backend == "onnxruntime" and auto.describe()["threads"] == 1
    assert auto._session.get_session_options().intra_op_num_threads == 1
    assert np.abs(auto.predict(IMAGE) - ref).max() < 1e-4
    batch = np.stack([auto.preprocess(IMAGE)] * 2)  # static batch-1 graph: looped
    assert auto.predict_logits(batch).shape == (2, 1, SIZE, SIZE)


def test_onnxruntime_from_safetensors_exports_on_the_fly(model_file):
    ref = Predictor(model_file).predict(IMAGE)
    with Predictor(model_file, backend="onnxruntime") as p:
        tmp = p._tmpdir.name
        assert np.abs(p.predict(IMAGE) - ref).max() < 1e-4
    import os

    assert not os.path.exists(tmp)  # the temporary export is gone after close()


def test_openvino_backend(model_file, onnx_file):
    pytest.importorskip("openvino", reason="openvino (optional extra polyprune[openvino]) is not installed")
    ref = Predictor(model_file).predict(IMAGE)
    f32 = Predictor(onnx_file, backend="openvino", threads=1, precision="f32")
    assert f32.precision == "f32"
    assert np.abs(f32.predict(IMAGE) - ref).max() < 1e-4
    default = Predictor(onnx_file, backend="openvino", threads=1)  # bf16 where the CPU has it
    assert default.precision in ("f32", "bf16", "f16")
    assert np.abs(default.predict(IMAGE) - ref).max() < 0.05


SIGNAL_AFTER_TWO_MODELS = """
import gc, os, signal, sys
from polyprune.predictor import Predictor
a = Predictor(sys.argv[1], backend="openvino", threads=1)
b = Predictor(sys.argv[1], backend="openvino", threads=1)
del a  # freed out of creation order: OpenVINO restores a signal stack that b's compile unmapped
gc.collect()
del b
gc.collect()
signal.signal(signal.SIGUSR1, lambda *_: print("handled", flush=True))
os.kill(os.getpid(), signal.SIGUSR1)
"""


def test_openvino_models_leave_the_signal_stack_usable(onnx_file):
    """Two OpenVINO models freed out of order, then a signal with a handler (as Ctrl-C would be): the
    process lives. Without predictor.keep_signal_stack it dies with SIGSEGV (that crash first showed up
    as a pytest worker dying several tests after the OpenVINO one)."""
    pytest.importorskip("openvino", reason="openvino (optional extra polyprune[openvino]) is not installed")
    r = subprocess.run(
        [sys.executable, "-c", SIGNAL_AFTER_TWO_MODELS, str(onnx_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "handled" in r.stdout, (r.returncode, r.stderr[-2000:])


def test_mask_and_overlay(model_file):
    p = Predictor(model_file, input_spec=InputSpec(size=SIZE, threshold=0.3))
    prob, mask = p.predict(IMAGE), p.predict_mask(IMAGE)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    assert np.array_equal(mask == 255, prob >= 0.3)

    img = np.full((40, 60, 3), 100, np.uint8)
    m = np.zeros((40, 60), np.uint8)
    m[10:30, 20:40] = 255
    vis = overlay(img, m, color=(255, 0, 0))
    assert vis.shape == img.shape and vis.dtype == np.uint8
    assert (vis[0, 0] == 100).all()  # background untouched
    assert vis[20, 30, 0] > 100 and vis[20, 30, 1] < 100  # fill tinted red
    assert tuple(vis[10, 30]) == (255, 0, 0)  # contour in the solid colour
    assert np.array_equal(overlay(img, m.astype(np.float32) / 255, threshold=0.5), overlay(img, m))
    assert np.array_equal(to_mask(np.array([0.2, 0.5, 0.9]), 0.5), [0, 255, 255])


def test_predictor_user_errors(model_file, onnx_file, tmp_path):
    with pytest.raises(ConfigError, match="unknown backend"):
        Predictor(model_file, backend="tensorrt")
    with pytest.raises(ConfigError, match="ONNX file"):
        Predictor(onnx_file, backend="torch")
    with pytest.raises(ConfigError, match="fixed input size 32x32"):
        Predictor(onnx_file, input_spec=InputSpec(size=64))
    with pytest.raises(DataError, match="RGB uint8"):
        Predictor(model_file).predict(IMAGE.astype(np.float32))
    with pytest.raises(ModelFileError, match="not found"):
        Predictor(tmp_path / "nope.onnx")
