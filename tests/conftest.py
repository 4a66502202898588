"""Shared fixtures. Real-data tests read ../shared/data: under CI they fail when it is missing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from cli_helpers import N_PAIRS
from polyprune.io import InputSpec, save_model
from polyprune.models import build_model

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("POLYPRUNE_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _one_thread():
    # two pytest workers share two cores: one torch thread each avoids oversubscription
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data; skipped with a reason outside CI, a failure under CI."""
    if not (SHARED_DATA / "Kvasir-SEG" / "images").is_dir():
        msg = f"real data not found at {SHARED_DATA}"
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI is set: real-data tests must not skip)")
        pytest.skip(msg)
    return SHARED_DATA


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small synthetic polyp dataset in the Kvasir-SEG layout (images/*.jpg, masks/*.png), 64 px."""
    from polyprune.synth import make_synthetic_dataset

    out = tmp_path_factory.mktemp("synth")
    return make_synthetic_dataset(out, n=24, size=64, seed=0)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """An untrained width-4 UNet at 32 px: enough for every command that reads a model."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    return save_model(path, build_model("unet", base_width=4), input_spec=InputSpec(size=32))


@pytest.fixture(scope="module")
def onnx_file(model_file, tmp_path_factory) -> Path:
    """`model_file` exported to ONNX (static, 32 px)."""
    from polyprune.export import export_onnx

    return export_onnx(model_file, tmp_path_factory.mktemp("onnx") / "model.onnx").path


@pytest.fixture
def data(tmp_path, synth_dir) -> Path:
    """N_PAIRS synthetic pairs (64 px, images/*.jpg + masks/*.png) in a folder of this test's own."""
    root = tmp_path / "ds"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
        for p in sorted((synth_dir / sub).iterdir())[:N_PAIRS]:
            shutil.copy(p, root / sub / p.name)
    return root


def parse_table(md: str, heading: str) -> dict[str, dict[str, str]]:
    """The Markdown table under `## heading` as {first cell: {column: cell}} (first row wins)."""
    lines = md.split(f"## {heading}\n", 1)[1].lstrip("\n").split("\n\n", 1)[0].splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    out: dict[str, dict[str, str]] = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        out.setdefault(cells[0], dict(zip(header, cells, strict=True)))
    return out
