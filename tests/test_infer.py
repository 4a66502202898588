"""Predictor backends, masks and overlays, image / folder / video prediction, real-time accounting, CLI."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from polyprune.errors import DataError
from polyprune.export import synthetic_image
from polyprune.infer import predict_path
from polyprune.predictor import Predictor

SIZE = 32
IMAGE = synthetic_image(50, 70, seed=3)


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
    import polyprune.pipeline as pipeline

    calls = {"n": 0}
    real = pipeline.overlay

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("boom on frame 5")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "overlay", failing)
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


def test_cli_predict(onnx_file, video_file, tmp_path):
    from typer.testing import CliRunner

    from polyprune.cli import app

    args = ["predict", "--model", str(onnx_file), "--source", str(video_file), "--out", str(tmp_path)]
    res = CliRunner().invoke(app, [*args, "--stream", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "20 frames (onnxruntime, stream)" in res.output and "would be dropped" in res.output
    res = CliRunner().invoke(app, [*args, "--json", "-"])
    assert res.exit_code == 0 and json.loads(res.stdout)["frames"] == 20
