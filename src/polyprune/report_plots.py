"""The pictures of `polyprune report`: Dice vs MACs / latency, pruning trajectories, per-layer widths, and
overlay grids (image, ground truth, parent, pruned) of the worst and typical cases."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from polyprune.files import atomic_path
from polyprune.report_catalog import (
    N_TYPICAL,
    N_WORST,
    Catalog,
    Evaluation,
    Model,
    find_path,
    finite,
    safe_name,
)

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
    val = [(m, m.val_dice) for m in cat.models if finite(m.val_dice)]
    if val:
        series.append(("validation Dice", val))
    return series


def plot_dice_vs(cat: Catalog, out: Path, x_of: Any, xlabel: str, file: str) -> Path | None:
    """Scatter of every model's Dice (each dataset, and validation) against x_of(model); None if empty."""
    fig = _figure()
    ax = fig.subplots()
    markers, n, named = "os^Dv<>p", 0, set()
    for k, (label, pts) in enumerate(_dice_series(cat)):
        pts = [(x_of(m), d, m.name) for m, d in pts if finite(x_of(m)) and finite(d)]
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
        ys = [s["val_dice"] if finite(s.get("val_dice")) else np.nan for s in t["steps"]]
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
    return _save(fig, out / f"widths_{safe_name(m.name)}.png")


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
    preds = find_path(e.meta.get("save_preds"), e.folder, e.run)
    if preds is not None and (preds / dataset).is_dir():
        preds = preds / dataset
    data = find_path((e.meta.get("data") or {}).get(dataset), e.folder, e.run)
    return (csv_path if csv_path.is_file() else None), preds, data


def plot_overlays(m: Model, out: Path) -> tuple[Path | None, str]:
    """Grid image | ground truth | parent | pruned for the pruned model's worst and typical images.

    Returns (PNG or None, a one-line note saying what was shown or why nothing could be).
    """
    from polyprune.data import find_samples
    from polyprune.evaluate import read_prediction
    from polyprune.images import read_image, read_mask
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
            path = _save(fig, out / f"overlays_{safe_name(m.name)}.png")
            worst = ", ".join(f"{i} ({dice[i]:.3f})" for i, why in cases if why.startswith("worst"))
            return path, (
                f"{dataset}: {m.name} vs {parent.name} (its parent); worst by {m.name}'s Dice@0.5 "
                f"(`{c_csv.name}`): {worst}; then typical images spread over the rest"
            )
    return None, (
        f"{m.name}: no dataset evaluated for both it and {parent.name} with per-image CSV, saved "
        "predictions (--save-preds) and the dataset folder still present"
    )
