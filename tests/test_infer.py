"""Predictor backends, masks and overlays, image / folder / video prediction, real-time accounting, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from polyprune.errors import ConfigError, DataError, ModelFileError
from polyprune.export import export_onnx, synthetic_image
from polyprune.infer import Predictor, overlay, predict_path, simulate_realtime, to_mask
from polyprune.io import InputSpec, save_model
from polyprune.models import build_model

SIZE = 32


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "unet.safetensors"
    torch.manual_seed(0)
    save_model(path, build_model("unet", base_width=4).eval(), input_spec=InputSpec(size=SIZE, threshold=0.5))
    return path


@pytest.fixture(scope="module")
def onnx_file(model_file, tmp_path_factory):
    return export_onnx(model_file, tmp_path_factory.mktemp("o") / "unet.onnx").path


@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
    """20 frames, 64x48, 10 FPS, mp4v: written with OpenCV like a user's clip."""
    path = tmp_path_factory.mktemp("v") / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (64, 48))
    assert writer.isOpened()
    for i in range(20):
        writer.write(cv2.cvtColor(synthetic_image(48, 64, seed=i), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def _count_frames(path) -> tuple[int, tuple[int, int]]:
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened()
    n, shape = 0, (0, 0)
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        n, shape = n + 1, frame.shape[:2]
    cap.release()
    return n, shape


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
from polyprune.infer import Predictor
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
    process lives. Without infer.keep_signal_stack it dies with SIGSEGV (that crash first showed up
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


def _image_folder(root):
    sizes = {"a.png": (40, 56), "b.jpg": (64, 48), "c.png": (33, 71)}
    (root / "images").mkdir(parents=True)
    for i, (name, (h, w)) in enumerate(sizes.items()):
        cv2.imwrite(
            str(root / "images" / name), cv2.cvtColor(synthetic_image(h, w, seed=i), cv2.COLOR_RGB2BGR)
        )
    return sizes


@pytest.mark.parametrize("stream", [False, True])
def test_predict_folder(onnx_file, tmp_path, stream):
    sizes = _image_folder(tmp_path / "data")
    out = tmp_path / "out"
    result = predict_path(Predictor(onnx_file), tmp_path / "data", out, stream=stream, progress=False)
    assert result["kind"] == "folder" and result["frames"] == 3 and result["stream"] is stream
    for name, (h, w) in sizes.items():
        stem = name.split(".")[0]
        mask = cv2.imread(str(out / "masks" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        vis = cv2.imread(str(out / "overlays" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
        assert vis.shape == (h, w, 3)
    assert set(result["latency_ms"]) == {"decode", "preprocess", "inference", "postprocess", "write"}
    assert result["latency_ms"]["inference"] > 0 and result["fps"] > 0
    assert "realtime" not in result  # images have no source frame rate
    assert json.loads((out / "predict.json").read_text())["frames"] == 3


def test_predict_single_image(model_file, tmp_path):
    path = tmp_path / "one.jpg"
    cv2.imwrite(str(path), cv2.cvtColor(IMAGE, cv2.COLOR_RGB2BGR))
    result = predict_path(Predictor(model_file), path, tmp_path / "out", progress=False)
    assert result["kind"] == "image" and result["frames"] == 1
    assert cv2.imread(str(tmp_path / "out" / "masks" / "one.png"), cv2.IMREAD_UNCHANGED).shape == (50, 70)


@pytest.mark.parametrize("stream", [False, True])
def test_predict_video(onnx_file, video_file, tmp_path, stream):
    result = predict_path(Predictor(onnx_file), video_file, tmp_path, stream=stream, progress=False)
    assert result["kind"] == "video" and result["frames"] == 20
    out_video = tmp_path / "clip_overlay.mp4"
    assert result["outputs"]["video"] == str(out_video)
    assert _count_frames(out_video) == (20, (48, 64))  # frames in == frames out, source size
    assert result["video"]["fps"] == pytest.approx(10.0)
    rt = result["realtime"]
    assert rt["source_fps"] == pytest.approx(10.0) and rt["budget_ms"] == pytest.approx(100.0)
    assert rt["dropped"] == len(rt["dropped_indices"]) and isinstance(rt["realtime"], bool)
    assert result["fps"] == pytest.approx(20 / result["wall_s"])
    saved = json.loads((tmp_path / "predict.json").read_text())
    assert saved["frames"] == 20 and saved["stream"] is stream
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip_overlay.mp4", "predict.json"]  # no temp files


def test_stream_error_propagates_and_leaves_no_video(onnx_file, video_file, tmp_path, monkeypatch):
    import polyprune.infer as infer

    calls = {"n": 0}
    real = infer.overlay

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("boom on frame 5")
        return real(*args, **kwargs)

    monkeypatch.setattr(infer, "overlay", failing)
    with pytest.raises(RuntimeError, match="boom on frame 5"):
        predict_path(Predictor(onnx_file), video_file, tmp_path, stream=True, progress=False)
    assert list(tmp_path.iterdir()) == []  # atomic: no partial overlay video


def test_unreadable_sources(onnx_file, tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(DataError, match=r"broken\.mp4"):
        predict_path(Predictor(onnx_file), bad, tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="not found"):
        predict_path(Predictor(onnx_file), tmp_path / "missing", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        predict_path(Predictor(onnx_file), tmp_path / "empty", tmp_path / "out", progress=False)


def test_simulate_realtime_by_hand():
    # 10 FPS (100 ms budget), every frame takes 250 ms, one waiting slot:
    # f0 served 0-250; f1 waits; f2 (t=200) finds the slot full -> dropped; f1 served 250-500;
    # f3 (t=300) waits; f4 (t=400) dropped; f3 served 500-750; f5 (t=500) waits, served 750-1000.
    rt = simulate_realtime([250.0] * 6, fps=10.0, queue_size=1)
    assert rt["dropped_indices"] == [2, 4] and rt["dropped"] == 2 and not rt["realtime"]
    assert rt["over_budget"] == 6
    assert rt["max_latency_ms"] == pytest.approx(500.0)  # f5: arrives 500, done 1000
    fast = simulate_realtime([40.0] * 50, fps=10.0, queue_size=1)
    assert fast["dropped"] == 0 and fast["realtime"] and fast["max_latency_ms"] == pytest.approx(40.0)


def test_cli_predict(onnx_file, video_file, tmp_path):
    from typer.testing import CliRunner

    from polyprune.cli import app

    args = ["predict", "--model", str(onnx_file), "--source", str(video_file), "--out", str(tmp_path)]
    res = CliRunner().invoke(app, [*args, "--stream", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "20 frames (onnxruntime, stream)" in res.output and "would be dropped" in res.output
    res = CliRunner().invoke(app, [*args, "--json", "-"])
    assert res.exit_code == 0 and json.loads(res.stdout)["frames"] == 20
