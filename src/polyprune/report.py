"""`polyprune report RUN [RUN ...] --out DIR`: one Markdown + HTML page built from the runs' JSON files.

Discovery. Each RUN is a folder (searched recursively) or a benchmark JSON file. Under a folder:

    train run    a folder holding history.json                 -> a model (FOLDER/model.safetensors)
    prune run    a folder holding trajectory.json (state done) -> a model; its parent is trajectory.parent.path
    evaluation   metrics.json (+ <dataset>_per_image.csv and the prediction PNGs of --save-preds)
                 -> scores of the model named in its _meta.model
    benchmark    benchmark*.json written by `polyprune benchmark --json` ({"rows": [...], "system": {...}})
                 -> latency / FPS of the models named in its rows

Linking. A path recorded in a JSON file names a discovered model when it resolves to the same file, or
else when the model's path ends with the recorded path's last components (at least folder + file name),
so a run folder that was moved, or a report made from another working directory, still links. An .onnx
file counts as the .safetensors file of the same folder and stem. Evaluations and benchmark rows that
name no discovered model get rows of their own.

Numbers. Every number in the report is read from these JSON / CSV files (model files are never
loaded): params, MACs and validation Dice from history.json (summary) / trajectory.json (final),
latency and FPS from the benchmark rows (at the model's own input size where measured there), test
scores from metrics.json, per-image Dice in the overlay grid from <dataset>_per_image.csv.

Output: OUT/report.md, OUT/report.html (same content; images by relative path) and the PNGs beside them:
dice_vs_macs.png, dice_vs_latency.png, trajectories.png (every prune run on one chart),
widths_<model>.png (per-layer widths, parent vs pruned) and overlays_<model>.png (image, ground truth,
parent, pruned for the pruned model's worst images by Dice@0.5 and a few typical ones).
"""

from __future__ import annotations

import csv
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from polyprune.errors import ConfigError
from polyprune.io import atomic_path, atomic_write_text

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


def _find(recorded: str | None, near: Path, root: Path) -> Path | None:
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
        vals = [r["val_dice"] for r in doc["history"] if _finite(r.get("val_dice"))]
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


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


# --------------------------------------------------------------------------------------- formatting


def _fmt(v: Any, spec: str) -> str:
    return format(v, spec) if _finite(v) else MISSING


def fmt_params(v: int | None) -> str:
    return f"{v:,}" if isinstance(v, int) else MISSING


def fmt_gmacs(v: int | None) -> str:
    return _fmt(v / 1e9 if v is not None else None, ".4f")


def _frac(a: float | None, b: float | None) -> str:
    return f"{a / b:.1%}" if _finite(a) and _finite(b) and b else MISSING


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


class Doc:
    """A report as blocks, rendered to Markdown and to HTML (the same content)."""

    def __init__(self) -> None:
        self.blocks: list[tuple[str, Any]] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def ul(self, items: list[str]) -> None:
        self.blocks.append(("ul", items))

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("table", (header, rows)))

    def img(self, file: str, alt: str) -> None:
        self.blocks.append(("img", (file, alt)))

    def markdown(self) -> str:
        out: list[str] = []
        for kind, b in self.blocks:
            if kind == "h":
                out.append("#" * b[0] + " " + b[1])
            elif kind == "p":
                out.append(b)
            elif kind == "ul":
                out.append("\n".join(f"- {x}" for x in b))
            elif kind == "table":
                header, rows = b
                cell = lambda s: str(s).replace("|", "\\|")  # noqa: E731
                lines = ["| " + " | ".join(cell(c) for c in header) + " |"]
                lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
                lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
                out.append("\n".join(lines))
            elif kind == "img":
                out.append(f"![{b[1]}]({b[0]})")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        e = html.escape
        out = [
            "<!doctype html>",
            '<html><head><meta charset="utf-8">',
            f"<title>{e(title)}</title>",
            "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;padding:3px 6px}"
            "td{text-align:right}td:first-child{text-align:left}img{max-width:100%}</style>",
            "</head><body>",
        ]
        for kind, b in self.blocks:
            if kind == "h":
                out.append(f"<h{b[0]}>{e(b[1])}</h{b[0]}>")
            elif kind == "p":
                out.append(f"<p>{_inline_html(b)}</p>")
            elif kind == "ul":
                out.append("<ul>" + "".join(f"<li>{_inline_html(x)}</li>" for x in b) + "</ul>")
            elif kind == "table":
                header, rows = b
                out.append("<table><tr>" + "".join(f"<th>{e(str(c))}</th>" for c in header) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows]
                out.append("</table>")
            elif kind == "img":
                out.append(f'<p><img src="{e(b[0])}" alt="{e(b[1])}"></p>')
        out.append("</body></html>")
        return "\n".join(out) + "\n"


def _inline_html(text: str) -> str:
    """Escape, then `code` spans (the only inline Markdown the report writes)."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


# -------------------------------------------------------------------------------------------- plots


def _figure(w: float = 6.4, h: float = 4.4) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg canvas on save

    return Figure(figsize=(w, h), dpi=110, layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return path


def _dice_series(cat: Catalog) -> list[tuple[str, list[tuple[Model, float]]]]:
    """(label, [(model, Dice)]) per evaluated dataset (Dice@0.5) plus validation Dice."""
    series = []
    for d in cat.datasets():
        pts = [(m, e.scores[d]["dice"]) for m in cat.models for e in m.evals[:1] if d in e.scores]
        series.append((f"{d}: Dice@0.5", pts))
    val = [(m, m.val_dice) for m in cat.models if _finite(m.val_dice)]
    if val:
        series.append(("validation Dice", val))
    return series


def plot_dice_vs(cat: Catalog, out: Path, x_of: Any, xlabel: str, file: str) -> Path | None:
    """Scatter of every model's Dice (each dataset, and validation) against x_of(model); None if empty."""
    fig = _figure()
    ax = fig.subplots()
    markers, n, named = "os^Dv<>p", 0, set()
    for k, (label, pts) in enumerate(_dice_series(cat)):
        pts = [(x_of(m), d, m.name) for m, d in pts if _finite(x_of(m)) and _finite(d)]
        if not pts:
            continue
        n += len(pts)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=markers[k % len(markers)], label=label)
        for x, y, name in pts:
            if name not in named:  # one label per model: its series share the x and often the y
                named.add(name)
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if not n:
        return None
    ax.set_xlabel(xlabel)
    ax.set_ylabel("Dice")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / file)


def plot_trajectories(prunes: list[Model], out: Path) -> Path:
    """Validation Dice against the MACs fraction of the parent, per step, every prune run on one chart."""
    fig = _figure()
    ax = fig.subplots()
    for m in prunes:
        t = m.trajectory or {}
        p_macs = t["parent"]["macs"]
        xs = [s["macs"] / p_macs for s in t["steps"]]
        ys = [s["val_dice"] if _finite(s.get("val_dice")) else np.nan for s in t["steps"]]
        crit = t.get("config", {}).get("criterion", "?")
        (line,) = ax.plot(xs, ys, marker="o", ms=3, label=f"{m.name} ({crit})")
        if t.get("final"):
            ax.plot(
                [t["final"]["macs"] / p_macs],
                [t["final"]["val_dice"]],
                marker="*",
                ms=12,
                color=line.get_color(),
            )
    ax.invert_xaxis()  # pruning goes left to right
    ax.set_xlabel("MACs / parent MACs")
    ax.set_ylabel("validation Dice@0.5")
    ax.set_title("pruning trajectories (star: final model)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / "trajectories.png")


def plot_widths(m: Model, out: Path) -> Path | None:
    """Per-layer widths of the parent (trajectory step 0) and the pruned model (final)."""
    t = m.trajectory or {}
    parent_w = t["steps"][0].get("widths") or {}
    child_w = (t.get("final") or {}).get("widths") or {}
    if not parent_w or not child_w:
        return None
    names = list(parent_w)
    x = np.arange(len(names))
    fig = _figure(max(6.4, 0.32 * len(names) + 1.5), 4.2)
    ax = fig.subplots()
    ax.bar(x - 0.2, [parent_w[n] for n in names], 0.4, label="parent")
    ax.bar(x + 0.2, [child_w.get(n, 0) for n in names], 0.4, label=m.name)
    ax.set_xticks(x, names, rotation=90, fontsize=7)
    ax.set_ylabel("output channels")
    ax.set_title(f"per-layer widths: parent vs {m.name}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out / f"widths_{_safe(m.name)}.png")


# ------------------------------------------------------------------------------------------ overlays


def read_per_image(path: Path) -> dict[str, dict[str, float]]:
    """`<dataset>_per_image.csv` of evaluate: id -> {metric: value}."""
    with open(path, newline="") as fh:
        return {r["id"]: {k: float(v) for k, v in r.items() if k != "id"} for r in csv.DictReader(fh)}


def pick_cases(
    dice: dict[str, float], n_worst: int = N_WORST, n_typical: int = N_TYPICAL
) -> list[tuple[str, str]]:
    """(id, why): the n_worst lowest Dice (ties by id), then n_typical spread evenly over the rest."""
    order = sorted(dice, key=lambda i: (dice[i], i))
    worst, rest = order[:n_worst], order[n_worst:]
    if len(rest) > n_typical:
        rest = [rest[round(q)] for q in np.linspace(0, len(rest) - 1, n_typical + 2)[1:-1]]
    return [(i, f"worst {k + 1}") for k, i in enumerate(worst)] + [(i, "typical") for i in rest]


def _eval_files(e: Evaluation, dataset: str) -> tuple[Path | None, Path | None, Path | None]:
    """(per-image CSV, prediction folder, dataset folder) of one evaluation, as they exist now."""
    csv_path = e.folder / f"{dataset}_per_image.csv"
    preds = _find(e.meta.get("save_preds"), e.folder, e.run)
    if preds is not None and (preds / dataset).is_dir():
        preds = preds / dataset
    data = _find((e.meta.get("data") or {}).get(dataset), e.folder, e.run)
    return (csv_path if csv_path.is_file() else None), preds, data


def plot_overlays(m: Model, out: Path) -> tuple[Path | None, str]:
    """Grid image | ground truth | parent | pruned for the pruned model's worst and typical images.

    Returns (PNG or None, a one-line note saying what was shown or why nothing could be).
    """
    from polyprune.data import find_samples, read_image, read_mask
    from polyprune.evaluate import read_prediction
    from polyprune.predictor import overlay

    parent = m.parent_model
    if parent is None:
        return None, f"{m.name}: its parent ({m.parent}) is not in this report"
    for e in m.evals:
        for dataset in e.scores:
            pe = next((x for x in parent.evals if dataset in x.scores), None)
            if pe is None:
                continue
            c_csv, c_preds, data = _eval_files(e, dataset)
            p_csv, p_preds, _ = _eval_files(pe, dataset)
            if not (c_csv and p_csv and c_preds and p_preds and data):
                continue
            child_rows, parent_rows = read_per_image(c_csv), read_per_image(p_csv)
            samples = {s.id: s for s in find_samples(data)}
            dice = {i: r["dice"] for i, r in child_rows.items() if i in samples and i in parent_rows}
            cases = [
                (i, why)
                for i, why in pick_cases(dice)
                if (c_preds / f"{i}.png").is_file() and (p_preds / f"{i}.png").is_file()
            ]
            if not cases:
                continue
            fig = _figure(4 * 2.2, len(cases) * 2.3)
            axes = fig.subplots(len(cases), 4, squeeze=False)
            for row, (i, why) in zip(axes, cases, strict=True):
                image, gt = read_image(samples[i].image), read_mask(samples[i].mask)
                panels = [
                    (image, f"{why}: {i}"),
                    (overlay(image, gt, color=(255, 255, 0)), "ground truth"),
                    (
                        overlay(image, read_prediction(p_preds / f"{i}.png") / 255.0, color=(0, 255, 0)),
                        f"{parent.name}: Dice {parent_rows[i]['dice']:.3f}",
                    ),
                    (
                        overlay(image, read_prediction(c_preds / f"{i}.png") / 255.0, color=(0, 200, 255)),
                        f"{m.name}: Dice {child_rows[i]['dice']:.3f}",
                    ),
                ]
                for ax, (img, title) in zip(row, panels, strict=True):
                    ax.imshow(img)
                    ax.set_title(title, fontsize=8)
                    ax.axis("off")
            path = _save(fig, out / f"overlays_{_safe(m.name)}.png")
            worst = ", ".join(f"{i} ({dice[i]:.3f})" for i, why in cases if why.startswith("worst"))
            return path, (
                f"{dataset}: {m.name} vs {parent.name} (its parent); worst by {m.name}'s Dice@0.5 "
                f"(`{c_csv.name}`): {worst}; then typical images spread over the rest"
            )
    return None, (
        f"{m.name}: no dataset evaluated for both it and {parent.name} with per-image CSV, saved "
        "predictions (--save-preds) and the dataset folder still present"
    )


# -------------------------------------------------------------------------------------------- report


def _bench_cell(m: Model, backend: str, key: str, spec: str) -> str:
    row = m.bench.get(backend)
    if row is None:
        return MISSING
    text = _fmt(row[key], spec)
    return text if row["size"] == m.size or m.size is None else f"{text} @{row['size']}px"


def models_table(cat: Catalog) -> tuple[list[str], list[list[str]]]:
    backends = cat.backends()
    header = ["model", "kind", "px", "params", "GMACs", "params %", "MACs %", "val Dice"]
    header += [f"{BACKEND_LABELS.get(b, b)} ms" for b in backends]
    header += [f"{BACKEND_LABELS.get(b, b)} FPS" for b in backends]
    rows = []
    for m in cat.models:
        pp = (m.trajectory or {}).get("parent") or {}
        row = [
            m.name,
            m.kind,
            str(m.size) if m.size else MISSING,
            fmt_params(m.params),
            fmt_gmacs(m.macs),
            _frac(m.params, pp.get("params")),
            _frac(m.macs, pp.get("macs")),
            _fmt(m.val_dice, ".4f"),
        ]
        row += [_bench_cell(m, b, "median_ms", ".2f") for b in backends]
        row += [_bench_cell(m, b, "fps", ".1f") for b in backends]
        rows.append(row)
    return header, rows


def scores_table(cat: Catalog) -> tuple[list[str], list[list[str]]]:
    header = ["model", "dataset", "n", "backend", *(h for h, _ in SCORE_COLUMNS)]
    rows = []
    for m in cat.models:
        for e in m.evals:
            for d, s in e.scores.items():
                backend = e.meta.get("backend") or e.meta.get("mode") or MISSING
                rows.append(
                    [m.name, d, str(s["n_images"]), backend, *(_fmt(s[k], ".4f") for _, k in SCORE_COLUMNS)]
                )
    return header, rows


def trajectory_table(m: Model) -> tuple[list[str], list[list[str]]]:
    t = m.trajectory or {}
    p = t["parent"]
    backend = t["steps"][-1].get("backend") or "?"
    header = [
        "step",
        "filters removed",
        "params %",
        "MACs %",
        f"{BACKEND_LABELS.get(backend, backend)} ms",
        "val Dice pruned",
        "val Dice fine-tuned",
        "kept",
    ]
    rows = [
        [
            str(s["step"]),
            str(s.get("filters_removed", 0)),
            _frac(s["params"], p["params"]),
            _frac(s["macs"], p["macs"]),
            _fmt(s.get("latency_ms"), ".2f"),
            _fmt(s.get("val_dice_before_finetune"), ".4f"),
            _fmt(s.get("val_dice_after_finetune"), ".4f"),
            s.get("kept") or MISSING,
        ]
        for s in t["steps"]
    ]
    if t.get("final"):
        f = t["final"]
        rows.append(
            [f"final ({f['step']})", "", _frac(f["params"], p["params"]), _frac(f["macs"], p["macs"]),
             _fmt(f.get("latency_ms"), ".2f"), "", _fmt(f.get("val_dice"), ".4f"), "model.safetensors"]
        )  # fmt: skip
    return header, rows


def write_report(runs: list[Path], out: Path, *, title: str | None = None) -> Path:
    """Write OUT/report.md, OUT/report.html and the PNGs from the JSON files under `runs`; return report.md.

    ConfigError (one line, naming it) for a RUN that does not exist, holds no run files, or holds a
    JSON file that cannot be read or lacks the keys the report needs.
    """
    if not runs:
        raise ConfigError("report needs at least one RUN folder")
    runs = [Path(r) for r in runs]
    out = Path(out)
    cat = Catalog(runs)
    title = title or "polyprune report"
    doc = Doc()
    doc.h(1, title)
    doc.p(
        "Runs: "
        + ", ".join(f"`{r}`" for r in runs)
        + ". Every number below is read from the JSON / CSV files listed under Sources."
    )
    for f, sysinfo in cat.systems[:1]:
        if sysinfo:
            doc.p(
                f"Benchmark machine (`{f.name}`): {sysinfo.get('cpu', '?')}, {sysinfo.get('cores', '?')} cores; "
                f"torch {sysinfo.get('torch', '?')}, onnxruntime {sysinfo.get('onnxruntime') or MISSING}."
            )

    doc.h(2, "Models")
    doc.table(*models_table(cat))
    threads = sorted({r.get("threads") for m in cat.models for r in m.bench.values() if r.get("threads")})
    doc.p(
        "params and MACs (multiply-accumulates at batch 1) at the model's input size `px`; params % / MACs % "
        "relative to the pruned model's parent; val Dice: validation Dice@0.5 of the kept weights "
        "(history.json / trajectory.json); latency: median ms at batch 1"
        + (f", {', '.join(map(str, threads))} thread(s)" if threads else "")
        + " from the benchmark JSON (`@N px` where it was measured at another size), FPS = 1000 / median."
    )
    header, rows = scores_table(cat)
    if rows:
        doc.h(2, "Test scores")
        doc.table(header, rows)
        doc.p(
            "Dice@0.5 / IoU@0.5: Jha protocol (mean over images at probability >= 0.5); mDice, mIoU, Sα, "
            "wFβ, mEφ, MAE: PraNet toolbox protocol (metrics.json)."
        )

    doc.h(2, "Accuracy against cost")
    plots = [
        plot_dice_vs(
            cat, out, lambda m: m.macs / 1e9 if m.macs else None, "GMACs (batch 1)", "dice_vs_macs.png"
        ),
    ]
    lat_backend = next(
        (b for b in ("onnxruntime", "torch", *cat.backends()) if any(b in m.bench for m in cat.models)), None
    )
    if lat_backend:
        plots.append(
            plot_dice_vs(
                cat,
                out,
                lambda m: m.bench[lat_backend]["median_ms"] if lat_backend in m.bench else None,
                f"latency, ms ({lat_backend}, batch 1)",
                "dice_vs_latency.png",
            )
        )
    else:
        doc.p("No benchmark JSON found: no latency plot.")
    for p in plots:
        if p is not None:
            doc.img(p.name, p.stem.replace("_", " "))

    prunes = [m for m in cat.models if m.trajectory]
    if prunes:
        doc.h(2, "Pruning")
        doc.img(plot_trajectories(prunes, out).name, "pruning trajectories")
        for m in prunes:
            t = m.trajectory or {}
            cfg = t.get("config", {})
            target = next(
                (
                    f"{k.replace('_', ' ')} {cfg[k]:g}"
                    for k in ("target_params", "target_macs", "target_fps", "max_dice_drop")
                    if cfg.get(k) is not None
                ),
                "?",
            )
            doc.h(3, f"{m.name}: {cfg.get('criterion', '?')}, {target}")
            if t.get("state") != "done":
                doc.p(f"state `{t.get('state')}`: the run has not finished.")
            doc.table(*trajectory_table(m))
            w = plot_widths(m, out)
            if w is not None:
                doc.img(w.name, f"widths {m.name}")

        doc.h(2, "Sample overlays")
        missing = []
        for m in prunes:
            png, note = plot_overlays(m, out)
            if png is None:
                missing.append(note)
                continue
            doc.p(f"Columns: image, ground truth (yellow), parent (green), pruned (blue). {note}.")
            doc.img(png.name, f"overlays {m.name}")
        if missing:
            doc.ul([f"no overlays for {n}" for n in missing])

    doc.h(2, "Sources")
    doc.ul([f"`{s}`" for s in cat.sources])
    atomic_write_text(out / "report.html", doc.html(title))
    return atomic_write_text(out / "report.md", doc.markdown())
