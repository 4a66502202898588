"""Kill and resume (issue 8 §2): SIGKILL a real `polyprune train` / `polyprune prune` process mid-way,
resume it with `--resume`, and get what an uninterrupted run with the same seed gives: the same
weights, history and widths (one machine, `--threads 1` for both runs, fp32).

While the processes run and die, a watcher reads every file at a final path over and over: each one
must parse (safetensors loads, JSON parses) at every moment. Temporary files start with "." (they may
be left behind by a kill; readers ignore them).
"""

from __future__ import annotations

import contextlib
import json
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from polyprune.io import InputSpec, save_model
from polyprune.models import build_model

TIMEOUT = 240  # seconds for one run; two cores shared with other jobs


# --------------------------------------------------------------------------------------------- helpers


def _parse(path: Path) -> None:
    if path.suffix == ".safetensors":
        load_file(str(path))
    elif path.suffix == ".json":
        json.loads(path.read_text())


@contextlib.contextmanager
def watch_final_files(root: Path):
    """Yield a list that collects every file seen at a final path (name not starting with ".") that
    did not parse, while a thread re-reads the tree until the block ends."""
    problems: list[str] = []
    seen: set[str] = set()
    stop = threading.Event()

    parsed: dict[Path, tuple[int, int, int]] = {}

    def loop() -> None:
        while not stop.is_set():
            for p in list(root.rglob("*")) if root.exists() else []:
                if p.name.startswith("."):
                    continue
                try:
                    st = p.stat()
                    if not p.is_file() or parsed.get(p) == (st.st_ino, st.st_size, st.st_mtime_ns):
                        continue  # unchanged since it last parsed
                    _parse(p)
                except FileNotFoundError:
                    continue
                except Exception as exc:  # a partly written file at a final path
                    problems.append(f"{p.relative_to(root)}: {type(exc).__name__}: {exc}")
                    continue
                parsed[p] = (st.st_ino, st.st_size, st.st_mtime_ns)
                seen.add(str(p.relative_to(root)))
            time.sleep(0.002)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield problems
    finally:
        stop.set()
        thread.join()
        problems.extend([] if seen else [f"the watcher never saw a file under {root}"])


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _reap():
    """No process a test started outlives it, even when the test fails half-way."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def popen(cmd: list[str], **kw) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, **kw)
    _STARTED.append(proc)
    return proc


def start(*args: object, log: Path) -> subprocess.Popen:
    with open(log, "w") as fh:
        return popen(
            [sys.executable, "-m", "polyprune", *map(str, args)], stdout=fh, stderr=subprocess.STDOUT
        )


def run_to_end(*args: object, log: Path) -> None:
    proc = start(*args, log=log)
    rc = proc.wait(timeout=TIMEOUT)
    text = log.read_text()
    assert rc == 0 and "Traceback" not in text, f"rc={rc}\n{text}"


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = TIMEOUT) -> None:
    t0 = time.monotonic()
    while not condition():
        assert proc.poll() is None, f"the run ended (rc={proc.returncode}) before {what}"
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.005)


def kill(proc: subprocess.Popen) -> None:
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def check_tree(root: Path) -> None:
    """After a kill: final files parse; anything else is a hidden temporary file or the run's lock."""
    for p in root.rglob("*"):
        if p.is_file():
            if p.name.startswith("."):
                # ours end in .tmp; safetensors (Rust's tempfile crate) writes its own .tmpXXXXXX first
                assert p.name.endswith(".tmp") or p.name.startswith(".tmp") or p == root / ".lock", p
            else:
                _parse(p)


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys(), a.name
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{a.name}: {k} differs"


def _loop_state(ckpt: Path) -> dict:
    with safe_open(str(ckpt), framework="pt") as fh:
        return json.loads(fh.metadata()["loop"])


# ---------------------------------------------------------------------------------------- atomic writes


WRITER = """
import itertools, sys, torch
from polyprune.io import save_tensors
from polyprune.files import write_json
out = sys.argv[1]
for i in itertools.count():
    save_tensors(f"{out}/t.safetensors", {"a": torch.full((500_000,), float(i))})
    write_json(f"{out}/j.json", {"i": i, "pad": "x" * 300_000})
"""


def test_writes_are_atomic_under_sigkill(tmp_path):
    """A process that rewrites a 2 MB safetensors and a 300 kB JSON in a loop, read continuously and
    killed at a random moment: no reader ever sees a partial file, and what stays parses."""
    rng = torch.Generator().manual_seed(0)
    for round_ in range(2):
        out = tmp_path / f"round{round_}"
        out.mkdir()
        with watch_final_files(out) as problems:
            proc = popen([sys.executable, "-c", WRITER, str(out)])
            wait_for(lambda o=out: (o / "j.json").exists(), proc, "the first write")
            time.sleep(0.2 + 0.3 * float(torch.rand(1, generator=rng)))
            kill(proc)
        assert not problems, problems
        check_tree(out)
        t = load_file(str(out / "t.safetensors"))["a"]
        assert torch.all(t == t[0])  # one complete write, not a mix of two
        assert json.loads((out / "j.json").read_text())["i"] >= 0


def test_the_watcher_catches_a_non_atomic_writer(tmp_path):
    """The check has teeth: a plain open(..., "w") rewrite is caught half-written."""
    target = tmp_path / "r.json"
    target.write_text("{}")
    with watch_final_files(tmp_path) as problems:
        for i in range(200):
            with open(target, "w") as fh:
                fh.write(f'{{"i": {i}, "pad": "')
                fh.flush()
                time.sleep(0.001)
                fh.write("x" * 1000 + '"}')
            if problems:
                break
    assert problems


# --------------------------------------------------------------------------------------------- train


def _train_args(data: Path, out: Path, *extra: object) -> list[object]:
    return [
        "train", "--data", data, "--out", out, "--size", 64, "--width", 8, "--epochs", 5, "--batch", 2,
        "--threads", 1, "--precision", "fp32", "--seed", 3, "-q", *extra,
    ]  # fmt: skip


def test_train_killed_mid_epoch_resumes_to_the_uninterrupted_model(synth_dir, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    run_to_end(*_train_args(synth_dir, full), log=tmp_path / "full.log")
    epochs = json.loads((full / "history.json").read_text())["history"]
    epoch_s = statistics.median(r["seconds"] for r in epochs)

    ckpt = part / "checkpoint" / "last.safetensors"
    with watch_final_files(part) as problems:
        proc = start(*_train_args(synth_dir, part), log=tmp_path / "killed.log")
        wait_for(ckpt.exists, proc, "the first epoch checkpoint")
        time.sleep(0.5 * epoch_s)  # half-way through the next epoch
        kill(proc)
    assert not problems, problems
    check_tree(part)
    done = _loop_state(ckpt)["epoch"]
    assert 1 <= done < 5, done
    assert "summary" not in json.loads((part / "history.json").read_text())

    with watch_final_files(part) as problems:
        run_to_end(*_train_args(synth_dir, part, "--resume"), log=tmp_path / "resumed.log")
    assert not problems, problems

    assert_same_tensors(full / "model.safetensors", part / "model.safetensors")
    assert_same_tensors(full / "checkpoint" / "last.safetensors", ckpt)
    ha = json.loads((full / "history.json").read_text())
    hb = json.loads((part / "history.json").read_text())
    for key in ("epoch", "loss", "val_dice", "lr", "skipped_steps"):
        assert [r[key] for r in ha["history"]] == [r[key] for r in hb["history"]], key
    assert ha["summary"]["best_epoch"] == hb["summary"]["best_epoch"]
    assert _loop_state(ckpt)["epoch"] == 5


# --------------------------------------------------------------------------------------------- prune


def _prune_args(parent: Path, data: Path, out: Path, *extra: object) -> list[object]:
    return [
        "prune", "--model", parent, "--data", data, "--out", out, "--target-params", 0.3,
        "--step-ratio", 0.1, "--round-to", 1, "--min-channels", 2, "--finetune-iters", 3,
        "--latency-runs", 1, "--n-images", 4, "--batch", 4, "--threads", 1, "--precision", "fp32",
        "--seed", 1, "-q", *extra,
    ]  # fmt: skip


def _steps_done(traj: Path) -> int:
    try:
        return len(json.loads(traj.read_text())["steps"]) - 1
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def test_prune_killed_mid_way_resumes_after_its_last_completed_step(synth_dir, tmp_path):
    torch.manual_seed(0)
    parent = save_model(
        tmp_path / "parent.safetensors", build_model("unet", base_width=4), input_spec=InputSpec(size=32)
    )
    full, part = tmp_path / "full", tmp_path / "part"
    run_to_end(*_prune_args(parent, synth_dir, full), log=tmp_path / "full.log")
    traj_full = json.loads((full / "trajectory.json").read_text())
    n_steps = len(traj_full["steps"]) - 1
    assert n_steps >= 4, "the uninterrupted run needs steps left to kill in"

    traj = part / "trajectory.json"
    with watch_final_files(part) as problems:
        proc = start(*_prune_args(parent, synth_dir, part), log=tmp_path / "killed.log")
        wait_for(lambda: _steps_done(traj) >= 2, proc, "two completed steps")
        kill(proc)
    assert not problems, problems
    check_tree(part)
    killed = json.loads(traj.read_text())
    done = len(killed["steps"]) - 1
    assert killed["state"] == "pruning" and 2 <= done < n_steps, (killed["state"], done)
    kept = {p.name: p.stat().st_mtime_ns for p in (part / "steps").iterdir() if not p.name.startswith(".")}

    with watch_final_files(part) as problems:
        run_to_end(*_prune_args(parent, synth_dir, part, "--resume"), log=tmp_path / "resumed.log")
    assert not problems, problems
    for name, mtime in kept.items():  # completed steps were not redone
        assert (part / "steps" / name).stat().st_mtime_ns == mtime, name

    traj_part = json.loads(traj.read_text())
    assert traj_part["state"] == "done" and traj_part["final_step"] == traj_full["final_step"]
    assert [r["widths"] for r in traj_part["steps"]] == [r["widths"] for r in traj_full["steps"]]
    assert [r["params"] for r in traj_part["steps"]] == [r["params"] for r in traj_full["steps"]]
    assert traj_part["final"]["widths"] == traj_full["final"]["widths"]
    assert_same_tensors(full / "model.safetensors", part / "model.safetensors")
    for step in range(1, n_steps + 1):
        name = f"step_{step:03d}.safetensors"
        assert_same_tensors(full / "steps" / name, part / "steps" / name)
