"""What `polyprune report` reads: run folders, evaluations and benchmark JSON files, linked to models
(see `report` for the discovery and linking rules). Every number comes from these JSON / CSV files."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polyprune.errors import ConfigError

SCORE_COLUMNS = (  # (header, metrics.json key): both protocols, as in the PraNet paper tables
    ("Dice@0.5", "dice"),
    ("IoU@0.5", "iou"),
    ("mDice", "mean_dice"),
    ("mIoU", "mean_iou"),
    ("Sα", "s_measure"),
    ("wFβ", "wf_measure"),
    ("mEφ", "mean_em"),
    ("MAE", "mae"),
)
BACKEND_LABELS = {"torch": "torch", "onnxruntime": "ORT", "openvino": "OpenVINO"}
N_WORST, N_TYPICAL = 3, 3  # rows of the overlay grid
MISSING = "–"


# ------------------------------------------------------------------------------------------- model


@dataclass
class Evaluation:
    folder: Path
    run: Path  # the RUN argument it was found under: recorded paths are searched for up to there
    scores: dict[str, dict[str, Any]]  # dataset -> metrics.json entry
    meta: dict[str, Any]


@dataclass
class Model:
    """One row of the report: a model file and every number recorded about it."""

    key: Path  # identity: the model file (resolved)
    name: str
    kind: str  # trained | pruned | evaluated | benchmarked
    size: int | None = None
    params: int | None = None
    macs: int | None = None
    val_dice: float | None = None
    parent: str | None = None  # pruned: the parent's path as recorded in trajectory.json
    parent_model: Model | None = None
    trajectory: dict[str, Any] | None = None
    bench: dict[str, dict[str, Any]] = field(default_factory=dict)  # backend -> benchmark row
    evals: list[Evaluation] = field(default_factory=list)
    sources: list[Path] = field(default_factory=list)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {str(exc).splitlines()[0]}") from exc


def _need(doc: Any, keys: tuple[str, ...], path: Path) -> None:
    missing = [k for k in keys if not isinstance(doc, dict) or k not in doc]
    if missing:
        raise ConfigError(f"{path} is missing {', '.join(missing)}: not a polyprune run file")


def _tail_match(recorded: str, actual: Path) -> int:
    """How many trailing path components `recorded` shares with `actual` (resolved, 10_000: same file)."""
    p = Path(recorded)
    try:
        if p.exists() and p.resolve() == actual:
            return 10_000
    except OSError:
        pass
    a, r, n = actual.parts, p.parts, 0
    while n < min(len(a), len(r)) and a[-1 - n] == r[-1 - n]:
        n += 1
    return n


def find_path(recorded: str | None, near: Path, root: Path) -> Path | None:
    """A recorded file or folder as it exists now: the path as given, else its longest tail that exists
    under `near` or one of its ancestors up to (and including) the parent of `root`."""
    if not recorded:
        return None
    p = Path(recorded)
    if p.exists():
        return p
    parts = p.parts[1:] if p.is_absolute() else p.parts
    stop = root.resolve().parent
    for base in (near, *near.parents):
        for k in range(len(parts)):
            cand = base.joinpath(*parts[k:])
            if cand.exists():
                return cand
        if base.resolve() == stop:
            break
    return None


class Catalog:
    """Every model, evaluation, trajectory and benchmark found under the RUN arguments."""

    def __init__(self, runs: list[Path]) -> None:
        self.runs = runs
        self.models: list[Model] = []
        self.systems: list[tuple[Path, dict[str, Any]]] = []
        self.sources: list[Path] = []
        prefix = len(runs) > 1
        pending_evals: list[tuple[Path, Path, Any]] = []  # (metrics.json, its RUN, content)
        pending_bench: list[tuple[Path, dict[str, Any]]] = []
        for run in runs:
            if not run.exists():
                raise ConfigError(f"run folder not found: {run}")
            files = sorted(run.rglob("*.json")) if run.is_dir() else [run]
            found = 0
            for f in files:
                if f.name.startswith("."):  # temporary files of atomic writes
                    continue
                if f.name == "history.json":
                    self._add_train(f, self._name(run, f.parent, prefix))
                elif f.name == "trajectory.json":
                    self._add_prune(f, self._name(run, f.parent, prefix))
                elif f.name == "metrics.json":
                    pending_evals.append((f, run, _read_json(f)))
                elif f.name.startswith("benchmark") or not run.is_dir():
                    doc = _read_json(f)
                    _need(doc, ("rows",), f)
                    pending_bench.append((f, doc))
                    self.systems.append((f, doc.get("system") or {}))
                else:
                    continue
                found += 1
                self.sources.append(f)
            if not found:
                raise ConfigError(
                    f"no run files under {run}: expected history.json, trajectory.json, metrics.json "
                    "or benchmark*.json"
                )
        for m in self.models:  # a pruned model's parent, if it is in the report
            if m.parent:
                m.parent_model = self.match(m.parent)
        for f, run, doc in pending_evals:
            self._add_eval(f, run, doc, prefix)
        for f, doc in pending_bench:
            self._add_bench(f, doc)

    def _name(self, run: Path, folder: Path, prefix: bool) -> str:
        rel = folder.relative_to(run).as_posix() if run.is_dir() else folder.name
        name = run.resolve().name if rel == "." else rel
        if prefix and rel != ".":
            name = f"{run.resolve().name}/{rel}"
        names = {m.name for m in self.models}
        base, i = name, 2
        while name in names:
            name, i = f"{base}_{i}", i + 1
        return name

    def match(self, recorded: str | None) -> Model | None:
        """The discovered model a recorded path names (see the module docstring), or None."""
        if not recorded:
            return None
        p = Path(recorded)
        if p.suffix.lower() == ".onnx":
            p = p.with_suffix(".safetensors")
        scores = [(_tail_match(str(p), m.key), i) for i, m in enumerate(self.models)]
        best = max((s for s, _ in scores), default=0)
        hits = [i for s, i in scores if s == best]
        if best < 2 or len(hits) != 1:  # folder + file name at least, and not ambiguous
            return None
        return self.models[hits[0]]

    # ---------------------------------------------------------------------------------- runs

    def _add_train(self, f: Path, name: str) -> None:
        doc = _read_json(f)
        _need(doc, ("history",), f)
        s, cfg = doc.get("summary") or {}, doc.get("config") or {}
        vals = [r["val_dice"] for r in doc["history"] if finite(r.get("val_dice"))]
        m = Model(
            key=(f.parent / "model.safetensors").resolve(),
            name=name,
            kind="trained",
            size=s.get("size", cfg.get("size")),
            params=s.get("params"),
            macs=s.get("macs"),
            val_dice=s.get("best_val_dice", max(vals) if vals else None),
            sources=[f],
        )
        self.models.append(m)

    def _add_prune(self, f: Path, name: str) -> None:
        doc = _read_json(f)
        _need(doc, ("parent", "steps", "config"), f)
        _need(doc["parent"], ("params", "macs"), f.with_name(f"{f.name}[parent]"))
        for s in doc["steps"]:
            _need(s, ("step", "params", "macs"), f.with_name(f"{f.name}[steps]"))
        final = doc.get("final")
        m = Model(
            key=(f.parent / "model.safetensors").resolve(),
            name=name,
            kind="pruned",
            parent=doc["parent"].get("path"),
            trajectory=doc,
            sources=[f],
        )
        if final:
            m.size, m.params, m.macs = final.get("size"), final.get("params"), final.get("macs")
            m.val_dice = final.get("val_dice")
        self.models.append(m)

    def _add_eval(self, f: Path, run: Path, doc: Any, prefix: bool) -> None:
        if not isinstance(doc, dict):
            raise ConfigError(f"{f} is not a metrics.json of polyprune evaluate")
        scores = {k: v for k, v in doc.items() if not k.startswith("_") and isinstance(v, dict)}
        if not scores:
            raise ConfigError(f"{f} holds no dataset scores: not a metrics.json of polyprune evaluate")
        for name, s in scores.items():
            _need(s, (*(k for _, k in SCORE_COLUMNS), "n_images"), f.with_name(f"{f.name}[{name}]"))
        meta = doc.get("_meta") or {}
        m = self.match(meta.get("model"))
        if m is None:  # scored saved maps, or a model outside the report: a row of its own
            m = Model(key=f.parent.resolve(), name=self._name(run, f.parent, prefix), kind="evaluated")
            self.models.append(m)
        m.evals.append(Evaluation(folder=f.parent, run=run, scores=scores, meta=meta))
        m.sources.append(f)

    def _add_bench(self, f: Path, doc: dict[str, Any]) -> None:
        for row in doc["rows"]:
            _need(row, ("model", "backend", "size", "median_ms", "fps"), f)
            m = self.match(row["model"])
            if m is None:
                key = Path(row["model"]).resolve()
                m = next((x for x in self.models if x.key == key), None)
                if m is None:
                    m = Model(
                        key=key,
                        name=row.get("name") or Path(row["model"]).stem,
                        kind="benchmarked",
                        size=row["size"],
                        params=row.get("params"),
                        macs=row.get("macs"),
                    )
                    self.models.append(m)
            old = m.bench.get(row["backend"])
            # keep the row at the model's own input size (that is what its MACs are counted at)
            if old is None or (old["size"] != m.size and row["size"] == m.size):
                m.bench[row["backend"]] = {**row, "_source": f}
            if f not in m.sources:
                m.sources.append(f)
        for m in self.models:  # params / MACs of a model known only from the benchmark
            for row in m.bench.values():
                if m.params is None and row.get("params") is not None:
                    m.params = row["params"]
                if m.macs is None and row.get("macs") is not None and (m.size in (None, row["size"])):
                    m.macs, m.size = row["macs"], row["size"]

    def backends(self) -> list[str]:
        present = {b for m in self.models for b in m.bench}
        return ["torch", "onnxruntime", *sorted(present - {"torch", "onnxruntime"})]

    def datasets(self) -> list[str]:
        return sorted({d for m in self.models for e in m.evals for d in e.scores})


def finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"
