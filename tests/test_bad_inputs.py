"""Bad-input corpus (issue 8 §1 and §3): every case ends in ONE stderr line `error: ...` that names
the file or the value, with exit code 2, or in a documented recovery; never a traceback, never a
silent acceptance.

Most cases run `polyprune.cli.main` in this process: the same code path as the console script
(argument parsing, the library, the error-to-one-line mapping), without paying torch's import for
each of ~100 cases. `test_real_cli_*` run `python -m polyprune` in a subprocess for a case of each
kind, where stderr is the real one (library warnings, OpenCV's and FFmpeg's own prints included).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import subprocess
from pathlib import Path
from unittest import mock

import cv2
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli_helpers import N_PAIRS, assert_error, assert_ok, cli, eval_args, real_cli, train_args
from polyprune.errors import DataError, OutputError
from polyprune.files import atomic_write_bytes, write_json
from polyprune.images import read_image, read_mask
from polyprune.io import InputSpec, save_model, save_tensors
from polyprune.models import build_model

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "polyprune"
HYPO = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def first(data: Path, sub: str) -> Path:
    return sorted((data / sub).iterdir())[0]


@pytest.fixture
def a_file(tmp_path) -> Path:
    f = tmp_path / "a_file"
    f.write_text("a regular file, not a folder\n")
    return f


# ------------------------------------------------------------------------------- broken images and masks


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_middle_byte(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


BROKEN = {  # case -> (folder, how to break its first file)
    "empty-image": ("images", lambda p: p.write_bytes(b"")),
    "truncated-jpeg": ("images", _truncate),
    "random-bytes-image": ("images", lambda p: p.write_bytes(np.random.default_rng(0).bytes(3000))),
    "text-named-jpg": ("images", lambda p: p.write_text("this is text, not a JPEG\n")),
    "truncated-png-mask": ("masks", _truncate),
    "corrupt-png-mask": ("masks", _flip_middle_byte),  # libpng would print CRC errors of its own
    "size-mismatch": ("masks", lambda p: cv2.imwrite(str(p), np.zeros((20, 30), np.uint8))),
    "missing-mask": ("masks", lambda p: p.unlink()),
}


def _break(data: Path, case: str) -> Path:
    """Break the first pair of `data`; return the file an error must name (the image for a missing mask)."""
    folder, how = BROKEN[case]
    target = first(data, folder)
    how(target)
    return first(data, "images") if case == "missing-mask" else target


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_pair_is_one_line_error_in_train_and_evaluate(case, data, model_file, tmp_path, capsys):
    named = _break(data, case)
    assert_error(cli(capsys, *train_args(data, tmp_path / "run")), named)
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert_error(cli(capsys, *eval_args(data, model_file)), named)


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_skip_bad_lists_the_skipped_file_in_one_warning(case, data, model_file, capsys):
    named = _break(data, case)
    err = assert_ok(cli(capsys, *eval_args(data, model_file, "--skip-bad", "--json", "-")))
    warnings_ = [ln for ln in err.splitlines() if ln.startswith("warning: ")]
    assert len(warnings_) == 1 and "skipped" in warnings_[0], err
    assert named.stem in warnings_[0]


def test_skip_bad_in_training_warns_and_trains_on_the_rest(data, tmp_path, capsys):
    bad = _break(data, "text-named-jpg")
    err = assert_ok(cli(capsys, *train_args(data, tmp_path / "run", "--skip-bad")))
    assert re.search(rf"warning: skipped 1 .*{re.escape(str(bad))}", err), err
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert hist["config"]["n_train"] + hist["config"]["n_val"] == N_PAIRS - 1


@pytest.mark.parametrize("case", ["empty-image", "truncated-jpeg", "random-bytes-image", "text-named-jpg"])
def test_broken_image_in_predict_and_export(case, data, model_file, tmp_path, capsys):
    named = _break(data, case)
    assert_error(
        cli(capsys, "predict", "--model", model_file, "--source", named, "--out", tmp_path / "p", "-q"), named
    )
    assert_error(
        cli(capsys, "predict", "--model", model_file, "--source", data, "--out", tmp_path / "f", "-q"), named
    )
    assert_error(
        cli(capsys, "export", "--model", model_file, "--out", tmp_path / "m.onnx", "--image", named), named
    )
    assert not (tmp_path / "m.onnx").exists()


def test_broken_saved_prediction_maps(data, tmp_path, capsys):
    preds = tmp_path / "preds"
    preds.mkdir()
    for m in sorted((data / "masks").iterdir()):
        shutil.copy(m, preds / m.name)
    bad = sorted(preds.iterdir())[0]
    _truncate(bad)
    assert_error(cli(capsys, "evaluate", "--preds", preds, "--data", data, "-q"), bad, "truncated PNG")
    bad.write_bytes(b"")
    assert_error(cli(capsys, "evaluate", "--preds", preds, "--data", data, "-q"), bad, "empty")
    bad.unlink()
    assert_error(cli(capsys, "evaluate", "--preds", preds, "--data", data, "-q"), bad.name, "missing")


# ------------------------------------------------------------------------- valid but unusual inputs work


def _to_png(p: Path, image: np.ndarray) -> None:
    p.unlink()
    assert cv2.imwrite(str(p.with_suffix(".png")), image)


def test_unusual_valid_masks_read_like_the_originals_and_score_the_same(data, model_file, tmp_path, capsys):
    """Masks with values other than 0/255, RGB, 16-bit and {0, 1} label masks mean the same mask."""
    assert_ok(cli(capsys, *eval_args(data, model_file, "--json", tmp_path / "base.json")))
    masks = sorted((data / "masks").iterdir())
    originals = [read_mask(m) for m in masks]
    g = [cv2.imread(str(m), cv2.IMREAD_GRAYSCALE) for m in masks]
    cv2.imwrite(str(masks[0]), np.where(g[0] > 127, 200, 30).astype(np.uint8))  # 30 / 200
    cv2.imwrite(str(masks[1]), cv2.cvtColor(g[1], cv2.COLOR_GRAY2BGR))  # RGB
    cv2.imwrite(str(masks[2]), g[2].astype(np.uint16) * 257)  # 16-bit PNG
    cv2.imwrite(str(masks[3]), (g[3] > 127).astype(np.uint8))  # label map {0, 1}
    cv2.imwrite(str(masks[4]), cv2.merge([np.zeros_like(g[4])] * 3 + [g[4]]))  # drawn in alpha
    for m, want in zip(masks, originals, strict=True):
        assert np.array_equal(read_mask(m), want), m.name
    assert_ok(cli(capsys, *eval_args(data, model_file, "--json", tmp_path / "odd.json")))
    base = json.loads((tmp_path / "base.json").read_text())
    odd = json.loads((tmp_path / "odd.json").read_text())
    assert odd["ds"] == base["ds"]


def test_gray_rgba_and_16bit_images_train_and_evaluate(data, model_file, tmp_path, capsys):
    images = sorted((data / "images").iterdir())
    bgr = [cv2.imread(str(p)) for p in images]
    cv2.imwrite(str(images[0]), cv2.cvtColor(bgr[0], cv2.COLOR_BGR2GRAY))  # grayscale JPEG
    _to_png(images[1], cv2.cvtColor(bgr[1], cv2.COLOR_BGR2BGRA))  # RGBA PNG
    _to_png(images[2], bgr[2].astype(np.uint16) * 257)  # 16-bit RGB PNG
    _to_png(images[3], cv2.cvtColor(bgr[3], cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257)  # 16-bit gray
    assert (
        read_image(images[1].with_suffix(".png")).tolist() == cv2.cvtColor(bgr[1], cv2.COLOR_BGR2RGB).tolist()
    )
    assert np.array_equal(read_image(images[2].with_suffix(".png")), cv2.cvtColor(bgr[2], cv2.COLOR_BGR2RGB))
    assert read_image(images[0]).shape == bgr[0].shape
    assert_ok(cli(capsys, *train_args(data, tmp_path / "run")))
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert_ok(cli(capsys, *eval_args(data, tmp_path / "run" / "model.safetensors")))


# ------------------------------------------------------------------------------ folders, paths, sizes


def test_empty_dataset_folder_and_missing_paths(model_file, tmp_path, capsys):
    empty, missing = tmp_path / "empty", tmp_path / "does-not-exist"
    empty.mkdir()
    for folder, words in ((empty, "empty"), (missing, "not found")):
        assert_error(cli(capsys, *train_args(folder, tmp_path / "run")), folder, words)
        assert_error(cli(capsys, *eval_args(folder, model_file)), folder)
        assert_error(
            cli(capsys, "predict", "--model", model_file, "--source", folder, "--out", tmp_path / "p", "-q"),
            folder,
        )
        assert_error(
            cli(capsys, "prune", "--model", model_file, "--data", folder, "--out", tmp_path / "pr",
                "--target-params", 0.5, "--threads", 1, "-q"),
            folder,
        )  # fmt: skip
    assert_error(cli(capsys, *eval_args(tmp_path, missing / "m.safetensors")), "m.safetensors", "not found")


@HYPO
@given(size=st.integers(-100, 400).filter(lambda s: s <= 0 or s % 16))
def test_size_not_a_positive_multiple_of_16(size, model_file, tmp_path, capsys):
    assert_error(
        cli(capsys, "train", "--data", tmp_path, "--out", tmp_path / "run", "--size", size, "-q"), size
    )
    assert_error(
        cli(capsys, "export", "--model", model_file, "--out", tmp_path / "m.onnx", "--size", size), size
    )


@pytest.mark.parametrize("size", [30, 0, -16])
def test_size_in_prune_and_benchmark(size, data, model_file, tmp_path, capsys):
    assert_error(
        cli(
            capsys,
            "benchmark",
            "--model",
            model_file,
            "--size",
            size,
            "--backend",
            "torch",
            "--runs",
            1,
            "-q",
        ),
        size,
    )
    assert_error(
        cli(capsys, "prune", "--model", model_file, "--data", data, "--out", tmp_path / "p",
            "--target-params", 0.5, "--size", size, "--threads", 1, "-q"),
        size,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--decoder-widths", "8,x,16,32"], "8,x,16,32"),  # not whole numbers
        (["--decoder-widths", "8,16"], "decoder_widths"),  # encoder UNets take 4 (s2..s16)
        (["--arch", "unet", "--decoder-widths", "8,16,32,64"], "decoder_widths"),  # unet takes --width
        (["--scales", "1,big"], "1,big"),
    ],
)
def test_bad_width_and_scale_lists_in_train(extra, named, data, tmp_path, capsys):
    extra = extra if "unet" in extra else ["--arch", "unet-mobilenetv2", "--no-pretrained", *extra]
    assert_error(cli(capsys, *train_args(data, tmp_path / "run", *extra)), named)


# ---------------------------------------------------------------------------------------- model files


def _bad_model(kind: str, folder: Path, good: Path) -> Path:
    from safetensors.torch import save_file

    m = build_model("unet", base_width=4)
    path = folder / f"{kind}.safetensors"
    if kind == "text":
        path.write_text("not a model at all\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "other-architecture":
        save_model(path, m, input_spec=InputSpec(size=32), arch={"name": "resnet50"})
    elif kind == "mismatched-shapes":
        save_model(path, m, input_spec=InputSpec(size=32), arch={"name": "unet", "base_width": 8})
    elif kind == "huge-architecture":  # refused from the shapes alone: nothing of that size is allocated
        save_model(path, m, input_spec=InputSpec(size=32), arch={"name": "unet", "base_width": 10**7})
    elif kind == "arch-not-an-object":
        save_file({"a": torch.zeros(2)}, str(path), metadata={"arch": "[1, 2]", "input": "{}"})
    elif kind == "no-metadata":
        save_file({"a": torch.zeros(2)}, str(path))
    elif kind == "input-size-30":
        save_model(path, m, input_spec=InputSpec(size=30))
    elif kind == "a-folder":
        path.mkdir()
    elif kind == "depth-1e9":  # built naively this hangs and eats memory
        save_model(path, m, input_spec=InputSpec(size=32), arch={"name": "unet", "depth": 10**9})
    elif kind in ("in-channels-0", "out-channels-0"):
        key = kind.split("-")[0] + "_channels"
        save_model(path, m, input_spec=InputSpec(size=32), arch={**m.config(), key: 0})
    elif kind in ("in-channels-1", "in-channels-4"):  # real weights of that shape: only the io rule refuses
        c = int(kind[-1])
        save_model(path, build_model("unet", base_width=4, in_channels=c), input_spec=InputSpec(size=32))
    elif kind == "nan-weights":
        sick = build_model("unet", base_width=4)
        with torch.no_grad():
            sick.enc1.conv1.weight[0, 0, 0, 0] = float("nan")
        save_model(path, sick, input_spec=InputSpec(size=32))
    else:  # hostile metadata fields on good weights
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(good), framework="pt") as fh:
            meta = dict(fh.metadata())
        spec = json.loads(meta["input"])
        edits = {
            "input-size-32000": ("input", {**spec, "size": 32000}),
            "input-size-2e20": ("input", {**spec, "size": 2**20}),
            "nan-mean": ("input", {**spec, "mean": [float("nan"), 0.4, 0.4]}),
            "inf-std": ("input", {**spec, "std": [0.2, float("inf"), 0.2]}),
            "nan-threshold": ("input", {**spec, "threshold": float("nan")}),
            "threshold-1.5": ("input", {**spec, "threshold": 1.5}),
            "version-999": ("polyprune", "999"),
        }
        field, value = edits[kind]
        meta[field] = value if isinstance(value, str) else json.dumps(value)
        save_file(load_file(str(good)), str(path), metadata=meta)
    return path


MODEL_CASES = {  # kind -> words the one line must contain
    "text": "not a readable .safetensors",
    "empty": "not a readable .safetensors",
    "truncated": "not a readable .safetensors",
    "other-architecture": "resnet50",
    "mismatched-shapes": "do not match",
    "huge-architecture": "base_width must be an int in 1..512",
    "arch-not-an-object": "corrupt polyprune metadata",
    "no-metadata": "no polyprune metadata",
    "input-size-30": "30",
    "a-folder": "folder",
    "depth-1e9": "depth must be an int in 1..8",
    "in-channels-0": "in_channels must be an int in 1..64",
    "out-channels-0": "out_channels must be an int in 1..64",
    "in-channels-1": "in_channels 3",
    "in-channels-4": "in_channels 3",
    "nan-weights": "holds NaN/inf",
    "input-size-32000": "input size must be an int in 16..4096",
    "input-size-2e20": "input size must be an int in 16..4096",
    "nan-mean": "3 finite means",
    "inf-std": "3 finite stds",
    "nan-threshold": "threshold must be in (0, 1)",
    "threshold-1.5": "threshold must be in (0, 1)",
    "version-999": "format version '999'",
}


def _model_commands(model: Path, data: Path, out: Path) -> dict[str, list[object]]:
    image = first(data, "images")
    return {
        "evaluate": eval_args(data, model),
        "predict": ["predict", "--model", model, "--source", image, "--out", out / "pred", "-q"],
        "export": ["export", "--model", model, "--out", out / "m.onnx"],
        "prune": ["prune", "--model", model, "--data", data, "--out", out / "prune", "--target-params", 0.5,
                  "--threads", 1, "-q"],
        "benchmark": ["benchmark", "--model", model, "--size", 32, "--backend", "torch", "--runs", 1, "-q"],
    }  # fmt: skip


@pytest.mark.parametrize("kind", sorted(MODEL_CASES))
def test_bad_model_file_in_every_command(kind, data, model_file, tmp_path, capsys):
    model = _bad_model(kind, tmp_path, model_file)
    for command, args in _model_commands(model, data, tmp_path / "out").items():
        line = assert_error(cli(capsys, *args), model, MODEL_CASES[kind])
        assert len(line) < 400, (command, line)
    assert not (tmp_path / "out").exists() or not any(p.is_file() for p in (tmp_path / "out").rglob("*")), (
        "a command wrote something from a bad model"
    )


class _Payload:
    """Unpickling this runs `touch MARKER`: the model file a user must never be hurt by."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth"])
def test_pickle_model_never_runs(suffix, data, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(_Payload(marker))
    # the payload is live: unpickling it really creates the marker (then it is removed again)
    pickle.loads(payload)
    assert marker.exists()
    marker.unlink()
    files = [tmp_path / f"evil{suffix}"]
    files[0].write_bytes(payload)
    if suffix == ".pth":  # torch.save's zip format too
        files.append(tmp_path / "evil_zip.pth")
        torch.save({"state_dict": _Payload(marker)}, files[1])
    for evil in files:
        for args in _model_commands(evil, data, tmp_path / "out").values():
            assert_error(cli(capsys, *args), evil, "not a readable .safetensors")
            assert not marker.exists()
    assert not marker.exists()


def test_real_cli_pickle_model_never_runs(data, tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(_Payload(marker)))
    assert_error(real_cli("predict", "--model", evil, "--source", data, "--out", tmp_path / "o", "-q"), evil,
                 "never unpickles")  # fmt: skip
    assert not marker.exists()


# ----------------------------------------------------------------------------- pruning target, NaN loss


def test_unreachable_pruning_target(data, model_file, tmp_path, capsys):
    line = assert_error(
        cli(capsys, "prune", "--model", model_file, "--data", data, "--out", tmp_path / "p",
            "--target-macs", 0.0001, "--latency-runs", 1, "--threads", 1, "-q"),
        "0.0001",
    )  # fmt: skip
    assert "cannot be met" in line
    assert not (tmp_path / "p" / "model.safetensors").exists()


def _nan_loss(when):
    """The real loss, but NaN at the steps `when(step)` picks (counted from 0)."""
    import polyprune.losses as losses_mod

    real = losses_mod.LOSSES["bce-dice"]
    calls = {"n": 0}

    def loss(logits, target):
        value = real(logits, target)
        calls["n"] += 1
        return value * float("nan") if when(calls["n"] - 1) else value

    return loss


def test_transient_nan_loss_is_skipped_and_training_completes(data, tmp_path, capsys, monkeypatch):
    """Documented recovery (train.py): a non-finite step is skipped (no update) and counted."""
    import polyprune.losses as losses_mod

    monkeypatch.setitem(losses_mod.LOSSES, "bce-dice", _nan_loss(lambda step: step == 1))
    assert_ok(cli(capsys, *train_args(data, tmp_path / "run", "--batch", 1, "--epochs", 2)))
    hist = json.loads((tmp_path / "run" / "history.json").read_text())["history"]
    assert [r["skipped_steps"] for r in hist] == [1, 0]
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.isfinite(v.float()).all() for v in weights.values())


def test_persistent_nan_loss_is_one_line_error(data, tmp_path, capsys, monkeypatch):
    import polyprune.losses as losses_mod

    monkeypatch.setitem(losses_mod.LOSSES, "bce-dice", _nan_loss(lambda step: step >= 2))
    line = assert_error(
        cli(capsys, *train_args(data, tmp_path / "run", "--batch", 1, "--epochs", 8)), "NaN", "20 steps"
    )
    assert "--lr" in line


# ------------------------------------------------------------------------------------ hypothesis: decode


def _silent_stderr(capfd) -> None:
    err = capfd.readouterr().err
    assert err == "", f"the decoder printed to stderr: {err[:300]!r}"


@HYPO
@given(
    prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*"]),
    body=st.binary(min_size=0, max_size=3000),
    name=st.sampled_from(["x.png", "x.jpg", "x.tif", "x.bmp"]),
)
def test_random_bytes_never_crash_the_decoder(prefix, body, name, tmp_path, capfd):
    path = tmp_path / name
    path.write_bytes(prefix + body)
    capfd.readouterr()
    for reader in (read_image, read_mask):
        try:
            out = reader(path)
        except DataError as exc:
            assert str(path) in str(exc)
        else:  # random bytes that happen to decode: still a well-formed array
            assert out.dtype == np.uint8 and out.ndim == (3 if reader is read_image else 2)
    _silent_stderr(capfd)


@HYPO
@given(
    h=st.integers(1, 48),
    w=st.integers(1, 48),
    channels=st.sampled_from([1, 3, 4]),
    deep=st.booleans(),
    ext=st.sampled_from([".png", ".tif", ".bmp", ".jpg"]),
    seed=st.integers(0, 2**16),
)
def test_valid_images_of_random_size_and_type_decode(h, w, channels, deep, ext, seed, tmp_path, capfd):
    rng = np.random.default_rng(seed)
    deep = deep and ext in (".png", ".tif")
    dtype = np.uint16 if deep else np.uint8
    arr = rng.integers(0, np.iinfo(dtype).max, (h, w, channels), dtype=dtype, endpoint=True)
    if ext in (".jpg", ".bmp") and channels == 4:
        arr = arr[..., :3]
    path = tmp_path / f"img{ext}"
    assert cv2.imwrite(str(path), arr[..., 0] if channels == 1 else arr)
    capfd.readouterr()
    image, mask = read_image(path), read_mask(path)
    assert image.shape == (h, w, 3) and image.dtype == np.uint8
    assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 1}
    _silent_stderr(capfd)


@HYPO
@given(data=st.data())
def test_truncated_or_corrupted_png_is_a_quiet_data_error(data, tmp_path, capfd):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    _ok, buf = cv2.imencode(".png", rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    raw = bytearray(buf.tobytes())
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(1, len(raw) - 1))]
    else:
        i = data.draw(st.integers(8, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    path = tmp_path / "m.png"
    path.write_bytes(bytes(raw))
    capfd.readouterr()
    try:
        read_mask(path)
    except DataError as exc:
        assert str(path) in str(exc)
    else:  # a flip inside an ancillary chunk or after IEND leaves the image itself intact
        assert bytes(raw[:8]) == b"\x89PNG\r\n\x1a\n"
    _silent_stderr(capfd)


# ------------------------------------------------------------------------------------------------ writes


@pytest.mark.parametrize(
    ("code", "words"),
    [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied"), (errno.ENOSPC, "no space")],
)
@pytest.mark.parametrize("stage", ["mkstemp", "replace"])
def test_os_errors_become_output_errors_naming_the_path(code, words, stage, tmp_path):
    import tempfile

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    target = tmp_path / "out" / "metrics.json"
    with (
        mock.patch.object(tempfile if stage == "mkstemp" else os, stage, fail),
        pytest.raises(OutputError, match=words) as exc,
    ):
        write_json(target, {"dice": 1.0})
    assert str(target) in str(exc.value)
    assert not target.exists()
    assert not any(p.is_file() for p in tmp_path.rglob("*")), "a temporary file was left behind"


def test_safetensors_io_errors_become_output_errors(tmp_path, monkeypatch):
    """safetensors reports a full disk as SafetensorError('... (os error 28)'), not as an OSError."""
    from safetensors import SafetensorError

    import polyprune.io as io_mod

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(io_mod, "save_file", full)
    for write in (
        lambda p: save_model(p, build_model("unet", base_width=4), input_spec=InputSpec(size=32)),
        lambda p: save_tensors(p, {"a": torch.zeros(3)}),
    ):
        with pytest.raises(OutputError, match="no space left") as exc:
            write(tmp_path / "m.safetensors")
        assert "m.safetensors" in str(exc.value)
    assert list(tmp_path.iterdir()) == []


def test_output_below_a_file_or_in_proc(a_file, tmp_path):
    with pytest.raises(OutputError, match=f"{re.escape(str(a_file))} is a file, not a folder"):
        write_json(a_file / "sub" / "x.json", {})
    with pytest.raises(OutputError, match=re.escape("/proc/polyprune-test/x.json")):
        atomic_write_bytes("/proc/polyprune-test/x.json", b"x")


def test_cli_outputs_inside_a_file(a_file, data, model_file, capsys):
    cases = {
        "train": train_args(data, a_file / "run"),
        "evaluate --json": eval_args(data, model_file, "--json", a_file / "m.json"),
        "evaluate --csv-dir": eval_args(data, model_file, "--csv-dir", a_file / "csv"),
        "export": ["export", "--model", model_file, "--out", a_file / "m.onnx"],
        "predict": ["predict", "--model", model_file, "--source", data, "--out", a_file / "pred", "-q"],
        "synth": ["synth", "--out", a_file / "synth", "--n", 2, "--size", 32, "-q"],
    }
    for name, args in cases.items():
        line = assert_error(cli(capsys, *args), a_file)
        assert "is a file, not a folder" in line or "is a file" in line, (name, line)
    assert a_file.read_text().startswith("a regular file")


def test_final_files_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        p = save_tensors(tmp_path / "t.safetensors", {"a": torch.zeros(2)})
        q = write_json(tmp_path / "j.json", {})
    finally:
        os.umask(old)
    assert oct(p.stat().st_mode & 0o777) == oct(0o644) == oct(q.stat().st_mode & 0o777)


WRITERS = re.compile(
    r"open\([^)]*['\"][wax]b?\+?['\"]|\.write_text\(|\.write_bytes\(|cv2\.imwrite\(|\.savefig\(|torch\.save\("
    r"|np\.save|\.tofile\(|onnx\.save\(|onnx\.export\(|save_file\(|VideoWriter\(|json\.dump\("
)
REVIEWED = {  # (file, line): why it is not a raw write of a final output
    ("distributed.py", 'with path.open("a") as fh:'): "opt-in debug record of cross-rank checks",
    ("export.py", "torch.onnx.export("): "_torch_export writes export_onnx's atomic_path temp file",
    ("export.py", "onnx.save(proto, str(path))  # < 2 GB: one file, weights inside"): "the same temp file",
    ("layer_latency.py", "torch.onnx.export(probe, (x,), buf, dynamo=False, opset_version=17)"): "into an "
    "in-memory buffer (io.BytesIO), never a file",
    ("run.py", 'with os.fdopen(fd, "w") as fh:'): "a cell's claim (lock) file, created with O_EXCL; "
    "readers treat an empty one as held",
    (
        "cli_app.py",
        'sys.stdout = open(os.devnull, "w")  # noqa: SIM115',
    ): "stdout failed: later prints go nowhere",
}


def _code_lines(py: Path) -> dict[int, str]:
    """Line number -> its code, with comments and long strings (docstrings, messages) blanked out;
    short strings such as open()'s mode stay."""
    import io
    import tokenize

    out: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(py.read_text()).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE):
            continue
        text = '""' if tok.type == tokenize.STRING and len(tok.string) > 8 else tok.string
        out[tok.start[0]] = out.get(tok.start[0], "") + text
    return out


def test_every_writer_in_the_package_is_atomic():
    """Each raw write in src/ and benchmarks/ targets a temporary path from `atomic_path` (files.py: the
    helpers)."""
    stragglers = []
    for py in sorted([*SRC.rglob("*.py"), *(REPO / "benchmarks").glob("*.py")]):
        lines = py.read_text().splitlines()
        for n, code in sorted(_code_lines(py).items()):
            if not (WRITERS.search(code) or re.search(r"\.open\(['\"][wax]", code)):
                continue
            line = lines[n - 1].strip()
            if (py.name, line) in REVIEWED:
                continue
            context = "\n".join(lines[max(0, n - 13) : n])
            if py.name == "files.py" or "atomic_path(" in context:
                continue
            stragglers.append(f"{py.relative_to(REPO)}:{n}: {line}")
    assert not stragglers, "non-atomic writes:\n" + "\n".join(stragglers)


def test_nothing_in_the_package_unpickles():
    """No pickle anywhere; torch.load only with weights_only=True (the ImageNet encoder file)."""
    hits = [
        f"{py.relative_to(SRC)}: {m.group(0)}"
        for py in sorted(SRC.rglob("*.py"))
        for m in re.finditer(r"torch\.load\([^)]*\)|pickle\.loads?\(|np\.load\(", py.read_text())
        if "weights_only=True" not in m.group(0)
    ]
    assert not hits, hits


# ---------------------------------------------------------------- a real full disk and read-only folder


@contextlib.contextmanager
def _tmpfs(path: Path, options: str):
    """A real tiny tmpfs; skipped where mounting is not allowed (needs root / CAP_SYS_ADMIN)."""
    path.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
    )
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()[:100]}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def full_disk(tmp_path):
    with _tmpfs(tmp_path / "full", "size=64k") as root:
        with contextlib.suppress(OSError), open(root / ".filler", "wb") as fh:
            fh.write(b"\0" * 256 * 1024)  # fills it: every later write fails with ENOSPC
        yield root


@pytest.fixture
def read_only_fs(tmp_path):
    with _tmpfs(tmp_path / "ro", "ro,size=64k") as root:
        yield root


@pytest.fixture
def video(tmp_path) -> Path:
    path = tmp_path / "clip.mp4"
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (96, 64))
    rng = np.random.default_rng(0)
    for _ in range(12):
        vw.write(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    vw.release()
    return path


def _nothing_visible(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]


def test_full_disk_is_one_line_error(full_disk, data, model_file, video, capsys):
    cases = {
        "train": train_args(data, full_disk / "run"),
        "evaluate": eval_args(data, model_file, "--csv-dir", full_disk / "csv"),
        "export": ["export", "--model", model_file, "--out", full_disk / "m.onnx"],
        "predict video": [
            "predict",
            "--model",
            model_file,
            "--source",
            video,
            "--out",
            full_disk / "v",
            "-q",
        ],
        "predict images": [
            "predict",
            "--model",
            model_file,
            "--source",
            data,
            "--out",
            full_disk / "i",
            "-q",
        ],
    }
    for name, args in cases.items():
        line = assert_error(cli(capsys, *args), full_disk)
        assert "no space left" in line or "disk full" in line, (name, line)
        assert _nothing_visible(full_disk), (name, sorted(full_disk.rglob("*")))


def test_read_only_file_system_is_one_line_error(read_only_fs, data, model_file, capsys):
    cases = {
        "train": train_args(data, read_only_fs / "run"),
        "evaluate": eval_args(data, model_file, "--json", read_only_fs / "m.json"),
        "synth": ["synth", "--out", read_only_fs / "s", "--n", 2, "--size", 32, "-q"],
    }
    for name, args in cases.items():
        line = assert_error(cli(capsys, *args), read_only_fs)
        assert "read-only file system" in line, (name, line)


# ------------------------------------------------------------------------- the real console script, stderr


def test_real_cli_one_line_errors_and_warnings(data, model_file, tmp_path):
    """Real stderr: FFmpeg/libpng/OpenCV print nothing of their own, warnings are one line each."""
    _break(data, "corrupt-png-mask")
    bad_mask = first(data, "masks")
    assert_error(real_cli(*train_args(data, tmp_path / "run")), bad_mask, "CRC")
    rc, _out, err = real_cli(*eval_args(data, model_file, "--skip-bad"))
    assert rc == 0 and "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.startswith("warning: ")] == [
        ln for ln in err.splitlines() if "skipped" in ln
    ]
    assert str(bad_mask) in err
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(np.random.default_rng(1).bytes(4000))
    assert_error(
        real_cli("predict", "--model", model_file, "--source", broken, "--out", tmp_path / "o", "-q"), broken
    )
    assert_error(real_cli("train", "--data", data, "--out", tmp_path / "r2", "--size", 30, "-q"), "30")


def test_teacher_tta_without_a_teacher_or_unknown(data, model_file, tmp_path, capsys):
    from cli_helpers import train_args

    assert_error(cli(capsys, *train_args(data, tmp_path / "r1", "--teacher-tta", "hflip")), "teacher")
    assert_error(
        cli(capsys, *train_args(data, tmp_path / "r2", "--teacher", model_file, "--distill", 1,
                                "--teacher-tta", "spin")),
        "spin",
    )  # fmt: skip
    assert_error(
        cli(capsys, *train_args(data, tmp_path / "r3", "--teacher", tmp_path / "none.safetensors",
                                "--distill", 1)),
        "none.safetensors",
    )  # fmt: skip
