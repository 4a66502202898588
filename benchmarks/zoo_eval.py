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
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from polyprune.benchmark import system_info
from polyprune.counting import count_macs, count_params
from polyprune.evaluate import evaluate_model
from polyprune.export import export_onnx
from polyprune.files import write_json
from polyprune.io import load_model
from polyprune.latency import runtime_forward, time_round_robin
from polyprune.predictor import Predictor

DATA = Path(os.environ.get("POLYPRUNE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TESTS = {
    "kvasir": (DATA / "Kvasir-SEG", DATA / "splits" / "kvasir_pranet_test.txt"),
    "clinicdb": (DATA / "CVC-ClinicDB", DATA / "splits" / "clinicdb_pranet_test.txt"),
    "colondb": (DATA / "CVC-ColonDB", None),
}


def score(path: Path, threads: int) -> dict:
    out = {}
    for name, (folder, ids) in TESTS.items():
        res = evaluate_model(path, [folder], ids_file=ids, backend="auto", threads=threads, progress=False)
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
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="zoo-eval-") as tmp:
        return _run(args, Path(tmp))


def _run(args: argparse.Namespace, tmp: Path) -> int:
    rows, onnx_files = [], []
    for path in args.models:
        row: dict = {"model": str(path), "name": path.stem}
        if path.suffix == ".onnx":
            onnx_files.append(path)
        else:
            m = load_model(path)
            row.update(params=count_params(m), macs_352=count_macs(m, args.size), arch=m.config()["name"])
            onnx_files.append(export_onnx(path, tmp / f"{len(rows)}_{path.stem}.onnx", size=args.size).path)
        if not args.no_scores:
            row["test"] = score(path, args.threads)
            t = row["test"]
            print(f"{path}: Kvasir {t['kvasir']['dice']:.4f} ClinicDB {t['clinicdb']['dice']:.4f} "
                  f"ColonDB {t['colondb']['dice']:.4f}", file=sys.stderr)  # fmt: skip
        rows.append(row)
    lats = (
        interleaved_latency(onnx_files, args.size, args.threads, args.runs, args.rounds)
        if args.runs
        else None
    )
    for i, row in enumerate(rows):
        row["ort_latency_352"] = lats[i] if lats else None
        row["file_mb"] = Path(row["model"]).stat().st_size / 2**20
    write_json(args.out, {"rows": rows, "system": system_info(), "threads": args.threads, "size": args.size})
    for r in rows if lats else []:
        print(f"{r['name']}: {r['ort_latency_352']['median_ms']:.1f} ms ({r['ort_latency_352']['fps']:.1f} FPS)",
              file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
