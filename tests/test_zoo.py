"""The shipped models in zoo/: each loads from a fresh clone, has its card, and still scores as its card says."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from polyprune.evaluate import evaluate_model
from polyprune.io import load_model, read_metadata
from polyprune.predictor import Predictor

ZOO = Path(__file__).resolve().parents[1] / "zoo"
MODELS = sorted(ZOO.glob("*.safetensors"))


def test_the_zoo_ships_models_and_nothing_else_large():
    assert MODELS, "zoo/ holds no model"
    others = [p for p in ZOO.iterdir() if p.suffix not in (".safetensors", ".md")]
    assert not others, f"only .safetensors models and their cards belong in zoo/: {others}"


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.stem)
def test_zoo_model_loads_runs_and_has_a_card(path):
    assert path.stat().st_size <= 20 * 2**20, "zoo models are at most 20 MB"
    card = path.with_suffix(".md")
    assert card.is_file(), f"{card} (model card) is missing"
    text = card.read_text()
    for needed in ("Kvasir", "ColonDB", "ClinicDB", "params", "MACs", "command"):
        assert needed.lower() in text.lower(), f"{card} does not mention {needed}"
    model = load_model(path)  # no weights wheel needed: the file holds every weight
    assert read_metadata(path).input.size == 352
    rgb = (np.random.default_rng(0).random((288, 384, 3)) * 255).astype(np.uint8)
    with Predictor(model, threads=1) as p:
        prob = p.predict(rgb)
    assert prob.shape == (288, 384) and np.isfinite(prob).all()


PRUNED = [p for p in MODELS if read_metadata(p).pruning]


@pytest.mark.parametrize("path", PRUNED, ids=lambda p: p.stem)
def test_a_pruned_zoo_model_names_its_shipped_parent(path):
    """The pruned files' `parent` metadata is a repository path to a parent shipped beside them, of the
    same family and decoder, and no layer of the pruned file is wider than the parent's."""
    meta = read_metadata(path)
    named = Path(meta.parent["path"])
    assert not named.is_absolute(), f"{path.name}: parent {named} is a machine path, not a zoo file"
    parent_file = ZOO.parent / named
    assert parent_file.is_file(), f"{path.name}: parent {named} is not shipped"
    parent = read_metadata(parent_file)
    assert not parent.pruning, f"{path.name}: its parent {named} is itself a pruned file"
    assert meta.arch["name"] == parent.arch["name"]
    assert meta.arch.get("decoder_widths") == parent.arch.get("decoder_widths")
    widths, parent_widths = meta.arch["widths"], parent.arch["widths"]
    assert widths.keys() == parent_widths.keys()
    assert all(widths[k] <= parent_widths[k] for k in widths), "a pruned layer is wider than the parent's"


@pytest.mark.realdata
@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.stem)
def test_zoo_model_still_scores_its_card_on_kvasir(path, shared_data, tmp_path):
    """The first 20 PraNet Kvasir test ids: Dice@0.5 within 0.05 of the card's full-split figure
    (a broken file, preprocessing or resize path would fall far below), with `--tta hflip` too where the
    card gives that figure."""
    card = json.loads(re.search(r"```json\n(.*?)\n```", path.with_suffix(".md").read_text(), re.S).group(1))
    ids = (shared_data / "splits" / "kvasir_pranet_test.txt").read_text().split()[:20]
    subset = tmp_path / "ids.txt"
    subset.write_text("\n".join(ids) + "\n")
    res = evaluate_model(path, [shared_data / "Kvasir-SEG"], ids_file=subset, threads=1, progress=False)
    dice = res["Kvasir-SEG"]["dice"]
    assert dice >= card["kvasir_dice"] - 0.05, (dice, card["kvasir_dice"])
    if "kvasir_dice_tta_hflip" in card:
        res = evaluate_model(
            path, [shared_data / "Kvasir-SEG"], ids_file=subset, threads=1, progress=False, tta="hflip"
        )
        assert res["Kvasir-SEG"]["dice"] >= card["kvasir_dice_tta_hflip"] - 0.05
