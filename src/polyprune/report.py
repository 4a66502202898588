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

import html
import re
from pathlib import Path
from typing import Any

from polyprune.errors import ConfigError
from polyprune.files import atomic_write_text
from polyprune.report_catalog import BACKEND_LABELS, MISSING, SCORE_COLUMNS, Catalog, Model, finite
from polyprune.report_plots import plot_dice_vs, plot_overlays, plot_trajectories, plot_widths

# --------------------------------------------------------------------------------------- formatting


def _fmt(v: Any, spec: str) -> str:
    return format(v, spec) if finite(v) else MISSING


def fmt_params(v: int | None) -> str:
    return f"{v:,}" if isinstance(v, int) else MISSING


def fmt_gmacs(v: int | None) -> str:
    return _fmt(v / 1e9 if v is not None else None, ".4f")


def _frac(a: float | None, b: float | None) -> str:
    return f"{a / b:.1%}" if finite(a) and finite(b) and b else MISSING


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

    _accuracy_section(doc, cat, out)
    prunes = [m for m in cat.models if m.trajectory]
    if prunes:
        _pruning_section(doc, prunes, out)
    doc.h(2, "Sources")
    doc.ul([f"`{s}`" for s in cat.sources])
    atomic_write_text(out / "report.html", doc.html(title))
    return atomic_write_text(out / "report.md", doc.markdown())


def _accuracy_section(doc: Doc, cat: Catalog, out: Path) -> None:
    """Dice against MACs and against latency (the first backend measured), one scatter each."""
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


def _pruning_section(doc: Doc, prunes: list[Model], out: Path) -> None:
    """Trajectories, per-run step tables and widths, and the overlay grids of the pruned models."""
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
