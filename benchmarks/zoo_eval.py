"""Score model files on the PraNet protocol's three test sets and time them: the numbers of zoo/ cards.

    python benchmarks/zoo_eval.py MODEL [MODEL ...] --out benchmarks/results/zoo/parents.json

Test sets (../shared/data): Kvasir-SEG (the 100 PraNet test ids), CVC-ClinicDB (the 62 PraNet test
ids), CVC-ColonDB (all 380: never trained on). Both protocols per set (polyprune.evaluate), with the
false alarms on polyp-free frames. Params and MACs at 352 px; ONNX Runtime latency at 352 px, batch 1,
`--threads` intra-op threads, all models timed in one interleaved pass (round-robin, `--rounds`
rounds of `--runs` runs each, after a 0.5 s pause and 2 untimed runs at every switch: ONNX Runtime's
idle pools spin, and 6 sessions of 2 threads on 2 cores slowed each other by up to 1.6x without it; the
median over every timed run), so they share the machine's state.
Works for .safetensors and .onnx files (an INT8 .onnx is scored and timed as it is deployed).
`--tta MODE` scores with test-time augmentation (polyprune.tta; latency stays one plain forward pass).
`--ensemble` adds a row for the mean logits of all the models given (what `train --teacher A --teacher B`
distills from; with `--tta`, over its views too).
`--split val` scores the validation split instead (Kvasir-SEG and CVC-ClinicDB: the 10 % that `train`
carves with `--seed`, test ids excluded): choose a setting such as `--tta` there, never on the tests.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from polyprune.benchmark import system_info
from polyprune.counting import count_macs, count_params
from polyprune.evaluate import evaluate_model
from polyprune.export import export_onnx
from polyprune.files import atomic_write_text, write_json
from polyprune.io import load_model
from polyprune.latency import runtime_forward, time_round_robin
from polyprune.predictor import Predictor
from polyprune.train import split_folders

DATA = Path(os.environ.get("POLYPRUNE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TESTS = {
    "kvasir": (DATA / "Kvasir-SEG", DATA / "splits" / "kvasir_pranet_test.txt"),
    "clinicdb": (DATA / "CVC-ClinicDB", DATA / "splits" / "clinicdb_pranet_test.txt"),
    "colondb": (DATA / "CVC-ColonDB", None),
}


def val_sets(tmp: Path, seed: int, val_fraction: float = 0.1) -> dict[str, tuple[Path, Path]]:
    """The validation ids `train` carves (polyprune.train.split_folders: the test ids excluded, then
    `val_fraction` per folder with `seed`), written as id files."""
    named = {name: test for name, test in TESTS.items() if test[1] is not None}  # ColonDB: never trained on
    splits = split_folders(
        [folder for folder, _ in named.values()],
        exclude_ids_file=[ids for _, ids in named.values()],
        val_fraction=val_fraction,
        seed=seed,
    )
    out = {}
    for name, (folder, _) in named.items():
        ids_file = tmp / f"{name}_val_ids.txt"
        atomic_write_text(ids_file, "".join(f"{s.id}\n" for s in splits[folder].val))
        out[f"{name}_val"] = (folder, ids_file)
    return out


class MeanLogits:
    """Predictor-like: each model's probabilities, averaged as logits (as polyprune.teacher does)."""

    def __init__(self, paths: list[Path], threads: int, tta: str) -> None:
        self.predictors = [Predictor(p, backend="auto", threads=threads, tta=tta) for p in paths]

    def predict(self, rgb: np.ndarray) -> np.ndarray:
        probs = [np.clip(p.predict(rgb), 1e-7, 1 - 1e-7).astype(np.float64) for p in self.predictors]
        logit = np.mean([np.log(q / (1 - q)) for q in probs], axis=0)
        return (1 / (1 + np.exp(-logit))).astype(np.float32)


def score(path: Path | MeanLogits, threads: int, sets: dict | None = None, tta: str = "none") -> dict:
    out = {}
    for name, (folder, ids) in (sets or TESTS).items():
        kw = {} if isinstance(path, MeanLogits) else dict(backend="auto", threads=threads, tta=tta)
        res = evaluate_model(path, [folder], ids_file=ids, progress=False, **kw)
        (out[name],) = (v for k, v in res.items() if not k.startswith("_"))
    return out


def interleaved_latency(
    onnx_files: list[Path], size: int, threads: int, runs: int, rounds: int
) -> list[dict]:
    """Round-robin timing (polyprune.latency.time_round_robin): every model gets `runs` runs per round,
    `rounds` rounds, a 0.5 s pause and 2 untimed runs before each turn; median ms."""
    calls = [runtime_forward(Predictor(p, backend="onnxruntime", threads=threads), size) for p in onnx_files]
    lats = time_round_robin(calls, runs=runs * rounds, warmup=5, rounds=rounds, pause_s=0.5, rewarm=2)
    return [{**lat.to_dict(), "n_runs": lat.runs} for lat in lats]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", type=int, default=352)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=10, help="timed runs per round; 0: no latency (scores only)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-scores", action="store_true", help="latency only")
    ap.add_argument("--tta", default="none", help="test-time augmentation: none | hflip | flips | d4")
    ap.add_argument("--ensemble", action="store_true", help="also score the models' mean logits as one")
    ap.add_argument("--split", choices=("test", "val"), default="test")
    ap.add_argument("--seed", type=int, default=0, help="--split val: the training run's seed")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="zoo-eval-") as tmp:
        return _run(args, Path(tmp))


def _run(args: argparse.Namespace, tmp: Path) -> int:
    rows, onnx_files = [], []
    sets = val_sets(tmp, args.seed) if args.split == "val" else TESTS
    for path in args.models:
        row: dict = {"model": str(path), "name": path.stem}
        if path.suffix == ".onnx":
            onnx_files.append(path)
        else:
            m = load_model(path)
            row.update(params=count_params(m), macs_352=count_macs(m, args.size), arch=m.config()["name"])
            onnx_files.append(export_onnx(path, tmp / f"{len(rows)}_{path.stem}.onnx", size=args.size).path)
        if not args.no_scores:
            row[args.split] = t = score(path, args.threads, sets, args.tta)
            print(f"{path}:", *(f"{k} {v['dice']:.4f}" for k, v in t.items()), file=sys.stderr)
        rows.append(row)
    if args.ensemble and not args.no_scores:
        t = score(MeanLogits(args.models, args.threads, args.tta), args.threads, sets)
        print("ensemble:", *(f"{k} {v['dice']:.4f}" for k, v in t.items()), file=sys.stderr)
        ensemble = {"models": [str(p) for p in args.models], "logits": "mean", args.split: t}
    else:
        ensemble = None
    lats = (
        interleaved_latency(onnx_files, args.size, args.threads, args.runs, args.rounds)
        if args.runs
        else None
    )
    for i, row in enumerate(rows):
        row["ort_latency_352"] = lats[i] if lats else None
        row["file_mb"] = Path(row["model"]).stat().st_size / 2**20
    meta = {"system": system_info(), "threads": args.threads, "size": args.size, "tta": args.tta}
    write_json(args.out, {"rows": rows, "ensemble": ensemble, **meta, "split": args.split, "seed": args.seed})
    for r in rows if lats else []:
        print(f"{r['name']}: {r['ort_latency_352']['median_ms']:.1f} ms ({r['ort_latency_352']['fps']:.1f} FPS)",
              file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
