"""Reliability, round two (issue 16): interrupts, clobbered data, hostile numbers, special files.

CLI cases run `polyprune.cli.main` in-process (helpers from test_bad_inputs) unless the exit path
itself is under test (Ctrl-C), which needs a real process.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import assert_error, assert_ok, cli, eval_args, train_args
from polyprune.errors import ConfigError
from polyprune.files import write_json
from polyprune.io import InputSpec, save_model
from polyprune.models import build_model
from polyprune.train import TrainConfig

# ------------------------------------------------------------------------------------------- Ctrl-C


def _interrupt(args: list[object], after_file: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Start `polyprune ARGS`, wait until `after_file` exists, send SIGINT, return the finished process."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "polyprune", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # SIGINT goes to this process alone, as Ctrl-C would to a foreground job
    )
    deadline = time.monotonic() + timeout
    while not after_file.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"finished before the interrupt: {proc.communicate()}"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
def test_ctrl_c_in_train_is_exit_130_with_a_resume_hint_and_resumes(data, tmp_path):
    run = tmp_path / "run"
    args = train_args(data, run)
    args[args.index("--epochs") + 1] = 10_000  # runs until interrupted
    r = _interrupt(args, run / "history.json")  # written after the epoch's checkpoint
    assert r.returncode == 130, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("interrupted: polyprune train") and "--resume" in lines[-1], r.stderr
    assert "Traceback" not in r.stderr
    done = json.loads((run / "history.json").read_text())["history"]
    assert done, "the finished epochs are recorded"
    # the same options with --resume continue after the last finished epoch (here: end at 2 more)
    cfg_epochs = len(done) + 2
    args[args.index("--epochs") + 1] = cfg_epochs
    # a changed --epochs would bend the schedule and is refused: resume needs the first run's options
    r2 = subprocess.run(
        [sys.executable, "-m", "polyprune", *map(str, [*args, "--resume"])], capture_output=True, text=True
    )
    assert r2.returncode == 2 and "would change the schedule" in r2.stderr


# ---------------------------------------------------------------------------------- numbers and JSON


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("--lr", "inf", "lr must be a finite number"),
        ("--lr", "nan", "lr must be a finite number"),
        ("--lr", "-1", "lr must be a finite number"),
        ("--weight-decay", "-1", "weight_decay must be a finite number"),
        ("--threads", "-1", "threads must be an int 1..1024"),
        ("--workers", "-1", "workers must be an int 0..256"),
        ("--seed", "-1", "seed must be an int 0..2147483647"),
        ("--seed", str(2**70), "seed must be an int 0..2147483647"),
        ("--batch", "0", "batch must be an int 1..4096"),
        ("--warmup", "1.5", "warmup must be a finite number in [0, 1)"),
    ],
)
def test_bad_numbers_in_train_are_one_line(option, value, words, data, tmp_path, capsys):
    run = tmp_path / "run"
    assert_error(cli(capsys, *train_args(data, run, option, value)), words)  # the last value counts
    assert not run.exists()


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [("--batch", "0", "batch must be"), ("--lr", "inf", "lr must be"), ("--seed", "-1", "seed must be")],
)
def test_bad_numbers_in_prune_are_one_line(option, value, words, data, model_file, tmp_path, capsys):
    args = ["prune", "--model", model_file, "--data", data, "--out", tmp_path / "p", "--target-params", 0.5]
    assert_error(cli(capsys, *args, "--threads", 1, "-q", option, value), words)


def test_train_config_checks_its_numbers_for_the_python_api():
    with pytest.raises(ConfigError, match="lr must be a finite number"):
        TrainConfig(data=["x"], out="y", lr=float("inf"))
    with pytest.raises(ConfigError, match="epochs must be an int"):
        TrainConfig(data=["x"], out="y", epochs=0)


def test_weights_that_turn_inf_are_never_saved(data, tmp_path, capsys, monkeypatch):
    """A finite loss can still step weights to inf (a huge lr): the epoch ends in one error line."""
    import torch

    step = torch.optim.AdamW.step

    def poisoned(self, *a, **k):
        out = step(self, *a, **k)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    run = tmp_path / "run"
    line = assert_error(cli(capsys, *train_args(data, run)), "NaN/inf")
    assert "lower --lr" in line
    assert not (run / "model.safetensors").exists()


def test_json_output_is_strict_nan_becomes_null(tmp_path):
    path = write_json(tmp_path / "x.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": 2.5})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": 2.5}


def test_json_to_a_full_stdout_is_one_line(data, model_file, tmp_path):
    with open("/dev/full", "w") as full:
        r = subprocess.run(
            [sys.executable, "-m", "polyprune", *map(str, eval_args(data, model_file, "--json", "-"))],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
        )
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: cannot write the JSON result to stdout")


# ------------------------------------------------------------------------------------- special files


def test_json_into_a_fifo_writes_through_and_keeps_the_fifo(data, model_file, tmp_path, capsys):
    fifo = tmp_path / "results.fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE, text=True)
    assert_ok(cli(capsys, *eval_args(data, model_file, "--json", fifo)))
    got = json.loads(reader.communicate(timeout=30)[0])
    assert "ds" in got and fifo.is_fifo()


def test_json_through_a_symlink_keeps_the_link(data, model_file, tmp_path, capsys):
    target, link = tmp_path / "real.json", tmp_path / "link.json"
    link.symlink_to(target)
    assert_ok(cli(capsys, *eval_args(data, model_file, "--json", link)))
    assert link.is_symlink() and json.loads(target.read_text())["ds"]["n_images"] > 0


def test_dev_full_is_never_replaced(data, model_file, capsys):
    before = os.stat("/dev/full")
    assert_error(cli(capsys, *eval_args(data, model_file, "--json", "/dev/full")), "/dev/full")
    after = os.stat("/dev/full")
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert not math.isnan(0.0)  # /dev/full stayed a character device (checked above)


# ------------------------------------------------------------------------------------ prune --resume


def test_prune_resume_with_changed_target_or_criterion_is_refused(data, tmp_path, capsys):
    parent = save_model(
        tmp_path / "parent.safetensors", build_model("unet", base_width=4), input_spec=InputSpec(size=32)
    )
    base = ["prune", "--model", parent, "--data", data, "--out", tmp_path / "p", "--finetune-iters", 1,
            "--n-images", 2, "--batch", 2, "--threads", 1, "-q"]  # fmt: skip
    assert_ok(cli(capsys, *base, "--target-params", 0.7))
    line = assert_error(
        cli(capsys, *base, "--target-params", 0.5, "--criterion", "l1", "--resume"), "--resume"
    )
    assert "target_params 0.7 -> 0.5" in line and "criterion 'taylor-gradnorm' -> 'l1'" in line
    assert_ok(cli(capsys, *base, "--target-params", 0.7, "--resume"))  # the same options resume


# ------------------------------------------------------------------------------ data and runs clobbered


def _predict(model, source, out):
    return ["predict", "--model", model, "--source", source, "--out", out, "--threads", 1, "-q"]


@pytest.mark.parametrize("where", ["source", "inside-source", "dataset-root", "masks-folder"])
def test_predict_never_writes_over_the_users_data(where, data, model_file, capsys):
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    source = data / "images"
    out = {
        "source": source,
        "inside-source": source / "preds",
        "dataset-root": data,  # out/masks/<stem>.png would land on the ground truth
        "masks-folder": data / "masks",
    }[where]
    assert_error(cli(capsys, *_predict(model_file, source, out)), "--out")
    after = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    assert after == before


def test_predict_into_its_own_earlier_output_is_fine(data, model_file, tmp_path, capsys):
    out = tmp_path / "preds"
    assert_ok(cli(capsys, *_predict(model_file, data / "images", out)))
    assert_ok(cli(capsys, *_predict(model_file, data / "images", out)))  # predict.json marks it ours


def test_train_refuses_a_non_empty_run_folder_without_resume_or_overwrite(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert_ok(cli(capsys, *train_args(data, run)))
    first = (run / "model.safetensors").read_bytes()
    assert_error(cli(capsys, *train_args(data, run)), "not empty", "--overwrite")
    assert (run / "model.safetensors").read_bytes() == first
    (run / "stray.txt").write_text("from the first run")
    assert_ok(cli(capsys, *train_args(data, run, "--overwrite")))
    assert not (run / "stray.txt").exists() and (run / "model.safetensors").is_file()


def test_overwrite_never_clears_a_folder_that_is_not_a_run(data, tmp_path, capsys):
    folder = tmp_path / "my_stuff"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    assert_error(cli(capsys, *train_args(data, folder, "--overwrite")), "does not look like a polyprune run")
    assert (folder / "thesis.tex").read_text() == "precious"


def test_a_run_folder_held_by_another_process_is_refused(data, tmp_path, capsys):
    from polyprune.files import run_folder

    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from polyprune.files import run_folder\nwith run_folder({str(run)!r}):\n"
         "    print('held', flush=True)\n    import time; time.sleep(60)"],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        line = assert_error(cli(capsys, *train_args(data, run, "--resume")), "another polyprune process")
        assert f"pid {holder.pid}" in line
    finally:
        holder.kill()
        holder.wait()
    with run_folder(run, resume=True):  # the kernel dropped the dead holder's lock
        pass


# ---------------------------------------------------------------------------------- silent data mistakes


def test_exclude_ids_matching_no_image_is_refused(data, tmp_path, capsys):
    ids = tmp_path / "test_ids.txt"
    ids.write_text("cju0u82z3cuma0835wlxrnrjv\ncju15wdt3zla10801odjiw7sy\n")  # Kvasir ids: not in this data
    run = tmp_path / "run"
    assert_error(
        cli(capsys, *train_args(data, run, "--exclude-ids", ids)), "none of the 2 test ids", str(ids)
    )
    assert not run.exists()


def test_unknown_ids_in_train_are_refused(data, tmp_path, capsys):
    ids = tmp_path / "ids.txt"
    first_id = sorted((data / "images").iterdir())[0].stem
    ids.write_text(f"{first_id}\nnot_an_image\n")
    assert_error(
        cli(capsys, *train_args(data, tmp_path / "run", "--ids", ids)), "1 of the 2 ids", "not_an_image"
    )


def test_the_same_data_folder_twice_is_refused(data, tmp_path, capsys):
    assert_error(cli(capsys, *train_args(data, tmp_path / "run", "--data", data)), "given twice")


@pytest.mark.parametrize("label", [1, 2, 100])
def test_lossless_label_maps_are_read_as_polyp(label, tmp_path):
    import cv2
    import numpy as np

    from polyprune.images import read_mask

    m = np.zeros((20, 30), np.uint8)
    m[5:10, 8:20] = label
    cv2.imwrite(str(tmp_path / "m.png"), m)
    got = read_mask(tmp_path / "m.png")
    assert got.sum() == 60 and set(np.unique(got)) == {0, 1}


def test_a_jpeg_label_map_warns_in_one_line(tmp_path):
    import cv2
    import numpy as np

    from polyprune.images import read_mask

    m = np.zeros((32, 32), np.uint8)
    m[8:24, 8:24] = 100
    cv2.imwrite(str(tmp_path / "m.jpg"), m)
    with pytest.warns(UserWarning, match="no value above 127"):
        assert read_mask(tmp_path / "m.jpg").sum() == 0


def test_prediction_maps_of_another_aspect_ratio_warn(data, tmp_path):
    import cv2
    import numpy as np

    from polyprune.evaluate import evaluate_predictions

    preds = tmp_path / "preds"
    preds.mkdir()
    for p in (data / "masks").iterdir():
        cv2.imwrite(str(preds / f"{p.stem}.png"), np.zeros((40, 80), np.uint8))  # GT is 64 x 64
    with pytest.warns(UserWarning, match="another aspect ratio"):
        res = evaluate_predictions(preds, [data], progress=False)
    assert len(res.meta["reshaped"]) == len(list((data / "masks").iterdir()))


# ------------------------------------------------------------------------------------- out of memory


def test_a_training_step_too_big_for_memory_is_refused_before_allocating(data, tmp_path, capsys):
    t0 = time.monotonic()
    line = assert_error(
        cli(capsys, *train_args(data, tmp_path / "run", "--size", 4096, "--width", 64)), "GiB"
    )
    assert "lower --size" in line and time.monotonic() - t0 < 30  # estimated on the meta device
    assert_error(cli(capsys, *train_args(data, tmp_path / "run", "--size", 16000)), "at most 4096")
    assert_error(cli(capsys, *train_args(data, tmp_path / "run", "--width", 10**9)), "width must be an int")


def test_a_30000_px_image_is_refused_not_decoded(tmp_path):
    import cv2
    import numpy as np

    from polyprune.errors import DataError
    from polyprune.images import read_image

    _ok, buf = cv2.imencode(".png", np.zeros((30000, 30000), np.uint8))  # 900 Mpx, ~1 MB compressed
    (tmp_path / "huge.png").write_bytes(buf.tobytes())
    with pytest.raises(DataError, match="OPENCV_IO_MAX_IMAGE_PIXELS"):
        read_image(tmp_path / "huge.png")


def test_benchmark_size_beyond_the_bound_is_one_line(model_file, capsys):
    args = ["benchmark", "--model", model_file, "--size", 16000, "--backend", "torch", "--runs", 1, "-q"]
    assert_error(cli(capsys, *args), "at most 4096")


# ------------------------------------------------------------------------------------------ ONNX files


def test_foreign_onnx_with_copied_metadata_is_refused(model_file, tmp_path, data, capsys):
    import onnx
    import torch

    from polyprune.export import export_onnx
    from polyprune.predictor import Predictor

    good = tmp_path / "good.onnx"
    export_onnx(model_file, good)
    foreign = tmp_path / "foreign.onnx"  # 3 output channels at half the size, with polyprune's metadata
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, stride=2, padding=1)).eval()
    torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), str(foreign), dynamo=False)
    proto = onnx.load(str(foreign))
    for p in onnx.load(str(good)).metadata_props:
        proto.metadata_props.add(key=p.key, value=p.value)
    onnx.save(proto, str(foreign))
    from polyprune.errors import ModelFileError

    with pytest.raises(ModelFileError, match="outputs shape"):
        Predictor(foreign)
    assert_error(cli(capsys, *eval_args(data, foreign)), "outputs shape", "(N, 1, 32, 32)")


def test_benchmark_of_a_static_onnx_runs_at_its_own_size(model_file, tmp_path, capsys):
    from polyprune.benchmark import benchmark_models
    from polyprune.export import export_onnx

    onnx_path = tmp_path / "m.onnx"
    export_onnx(model_file, onnx_path, size=64)  # static 64 px
    rows = benchmark_models([onnx_path], backends=["onnxruntime"], runs=1, warmup=0)
    assert [r["size"] for r in rows] == [64]
