"""Two processes on gloo / CPU: `torchrun -m polyprune train`, `torchrun polyprune prune`, sharded importance.

The torchrun children get OMP_NUM_THREADS=1 and --device cpu (gloo even where a GPU exists). Which
process wrote which file is logged by a `sitecustomize` that wraps os.replace (every polyprune write
is an atomic rename), so "only rank 0 writes" is checked, not assumed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from polyprune.distributed import DistributedMismatchError, assert_same_across_ranks
from polyprune.files import read_json
from polyprune.io import load_model
from polyprune.pruning.importance import compute_importance, find_layers
from polyprune.structure import layer_widths

# `make test` runs these in their own pytest process after the xdist run: each starts two processes of its
# own, which beside a second xdist worker would oversubscribe two cores.
pytestmark = pytest.mark.distributed

BIN = Path(sys.executable).parent
SIZE = 32

# imported by every Python process that has WRITE_LOG_DIR/.. on PYTHONPATH; logs renames per RANK
SITECUSTOMIZE = """
import os
if os.environ.get("POLYPRUNE_TEST_WRITE_LOG") and "RANK" in os.environ:
    _replace = os.replace

    def replace(src, dst, *a, **kw):
        _replace(src, dst, *a, **kw)
        log = os.path.join(os.environ["POLYPRUNE_TEST_WRITE_LOG"], "writes_rank" + os.environ["RANK"])
        with open(log, "a") as fh:
            fh.write(os.fspath(dst) + "\\n")

    os.replace = replace
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], tmp: Path, *, module: bool) -> tuple[subprocess.CompletedProcess, Path]:
    """Run `torchrun --nproc_per_node=2 ... -m polyprune ARGS` (module) or `... polyprune ARGS` (script)."""
    hook = tmp / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    writes = tmp / "writes"
    writes.mkdir(exist_ok=True)
    torchrun = (
        [str(BIN / "torchrun")]
        if (BIN / "torchrun").exists()
        else [sys.executable, "-m", "torch.distributed.run"]
    )
    launch = ["-m", "polyprune"] if module else ["--no-python", str(BIN / "polyprune")]
    cmd = [
        *torchrun,
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        *launch,
        *args,
        "--device",
        "cpu",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "POLYPRUNE_TEST_WRITE_LOG": str(writes),
        "POLYPRUNE_RECORD_CHECKS": str(tmp / "checks"),
    }
    # own session: torch elastic signals its process group on shutdown, which would hit the pytest worker
    proc = subprocess.run(
        cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300, start_new_session=True
    )
    assert proc.returncode == 0, (
        f"{' '.join(cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-4000:]}"
    )
    return proc, writes


def _written(writes: Path, rank: int) -> set[str]:
    f = writes / f"writes_rank{rank}"
    return set(f.read_text().split()) if f.exists() else set()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from polyprune.synth import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("ddp_synth"), n=16, size=SIZE, seed=0)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, Path]:
    tmp = tmp_path_factory.mktemp("ddp_train")
    out = tmp / "run"
    args = ["train", "--data", str(data), "--out", str(out), "--size", str(SIZE), "--width", "4"]
    args += ["--epochs", "1", "--batch", "4", "--val-fraction", "0.25", "--json", "-"]
    proc, writes = _torchrun(args, tmp, module=True)
    return proc, out, writes


def test_torchrun_train_two_processes(trained):
    proc, out, writes = trained
    summary = json.loads(proc.stdout)  # one JSON document: rank 0 only prints
    assert summary["epochs"] == 1 and summary["model"] == str(out / "model.safetensors")
    expected = {
        str(out / "model.safetensors"),
        str(out / "history.json"),
        str(out / "checkpoint" / "last.safetensors"),
    }
    assert _written(writes, 0) == expected and _written(writes, 1) == set()
    assert sorted(p.name for p in out.rglob("*")) == [
        ".lock",  # rank 0's hold on the run folder
        "checkpoint",
        "history.json",
        "last.safetensors",
        "model.safetensors",
    ]
    hist = read_json(out / "history.json")
    assert hist["config"]["n_train"] == 12 and len(hist["history"]) == 1  # 12 images, 2 ranks x 2 steps of 4
    model = load_model(out / "model.safetensors")
    assert model(torch.zeros(1, 3, SIZE, SIZE)).shape == (1, 1, SIZE, SIZE)


def test_torchrun_prune_step_same_widths_on_every_rank(trained, data, tmp_path):
    _, run, _ = trained
    out = tmp_path / "pruned"
    args = ["prune", "--model", str(run / "model.safetensors"), "--data", str(data), "--out", str(out)]
    args += ["--target-params", "0.9", "--step-ratio", "0.5", "--finetune-iters", "2", "--final-epochs", "1"]
    args += ["--round-to", "1", "--min-channels", "2", "--n-images", "8", "--batch", "4"]
    args += ["--latency-runs", "2", "--val-fraction", "0.25", "--quiet"]
    _, writes = _torchrun(args, tmp_path, module=False)  # the console script under torchrun

    traj = read_json(out / "trajectory.json")
    assert traj["state"] == "done" and traj["final_step"] == 1 and len(traj["steps"]) == 2
    child = load_model(out / "model.safetensors")
    widths = layer_widths(child)
    assert widths == traj["final"]["widths"] and widths != traj["steps"][0]["widths"]  # filters went
    # what each rank checked with assert_same_across_ranks: the same sequence of widths
    checks = [
        [
            json.loads(line)
            for line in (tmp_path / "checks" / f"checks_rank{r}.jsonl").read_text().splitlines()
        ]
        for r in (0, 1)
    ]
    assert [c["what"] for c in checks[0]] == [
        "layer widths at step 0",
        "layer widths after step 1",
        "layer widths of the final model",
    ]
    assert [(c["what"], c["value"]) for c in checks[0]] == [(c["what"], c["value"]) for c in checks[1]]
    assert checks[1][-1]["value"] == widths
    assert _written(writes, 1) == set() and str(out / "model.safetensors") in _written(writes, 0)
    assert str(out / "steps" / "step_001.safetensors") in _written(writes, 0)


# ------------------------------------------------------------------------- sharded importance


def _importance_setup():
    from polyprune.models import build_model

    torch.manual_seed(0)
    m = build_model("unet", base_width=4, depth=2)
    with torch.no_grad():  # non-trivial BatchNorm, as in test_pruning_importance
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.2, 1.5)
                mod.running_mean.uniform_(-0.2, 0.2)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, SIZE, SIZE, generator=g)
    y = (torch.rand(8, 1, SIZE, SIZE, generator=g) > 0.5).float()
    loader = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 8, 4)]
    layers = find_layers(m.eval(), x[:1])
    layers.pop("head")
    return m, loader, layers


CASES = {  # name: (criterion, kwargs)
    "gradnorm-loss-8": ("taylor-gradnorm", {"n_images": 8}),
    "gradnorm-loss-7": ("taylor-gradnorm", {"n_images": 7}),  # uneven shards: 4 + 3 images
    "gradnorm-random-sq": ("taylor-gradnorm", {"n_images": 8, "signal": "random", "reduce": "sq", "seed": 5}),
    "taylor": ("taylor", {"n_images": 8}),
    "l1": ("l1", {}),
    "random": ("random", {"seed": 3}),
}


def _all_cases() -> dict[str, dict[str, torch.Tensor]]:
    m, loader, layers = _importance_setup()
    return {k: compute_importance(m, c, loader, layers=layers, **kw) for k, (c, kw) in CASES.items()}


def _importance_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result: dict = {"scores": _all_cases()}
        try:
            assert_same_across_ranks({"enc0.conv1": 4, "dec1.conv2": 8 + rank}, "layer widths after step 9")
        except DistributedMismatchError as exc:
            result["mismatch"] = str(exc)
        assert_same_across_ranks({"enc0.conv1": 4}, "equal widths")  # no error
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_importance_two_ranks_equals_one_rank(tmp_path):
    """2 ranks x N/2 images, all-reduced == 1 rank x N images; both ranks hold the same scores."""
    mp.spawn(_importance_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    single = _all_cases()  # no process group here: one process scores every image
    for name in CASES:
        s0, s1, ref = ranks[0]["scores"][name], ranks[1]["scores"][name], single[name]
        assert set(s0) == set(s1) == set(ref)
        for layer in ref:
            assert torch.equal(s0[layer], s1[layer]), (name, layer)  # the all-reduced sum is the same bits
            if name != "taylor":  # taylor squares per mini-batch: its mini-batches depend on the ranks
                assert torch.allclose(
                    s0[layer], ref[layer], rtol=1e-5, atol=1e-9 * float(ref[layer].max())
                ), (
                    name,
                    layer,
                )
    assert any(
        not torch.allclose(ranks[0]["scores"]["taylor"][k], single["taylor"][k]) for k in single["taylor"]
    )
    for r in (0, 1):  # every rank raises, naming the ranks, the layer and both widths
        msg = ranks[r]["mismatch"]
        assert "layer widths after step 9 differ across ranks" in msg
        assert "rank 1 vs rank 0: dec1.conv2: 8 vs 9" in msg and "enc0.conv1" not in msg


def test_random_signal_does_not_depend_on_batching():
    m, loader, layers = _importance_setup()
    x = torch.cat([b[0] for b in loader])
    kw = {"layers": layers, "signal": "random", "n_images": 8, "seed": 2}
    by4 = compute_importance(m, "taylor-gradnorm", loader, **kw)
    by3 = compute_importance(m, "taylor-gradnorm", [x[i : i + 3] for i in range(0, 8, 3)], **kw)
    for k in by4:
        assert torch.allclose(by4[k], by3[k], rtol=1e-5)


def test_checks_pass_and_are_recorded_in_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYPRUNE_RECORD_CHECKS", str(tmp_path))
    assert_same_across_ranks({"a": 1}, "widths")
    rec = [json.loads(line) for line in (tmp_path / "checks_rank0.jsonl").read_text().splitlines()]
    assert rec == [{"what": "widths", "rank": 0, "value": {"a": 1}}]
