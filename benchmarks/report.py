"""Results of a benchmark run: results.json, results.md (table + findings), and three PNG plots.

Seeds are aggregated per (method, target): mean, and the sample standard deviation where there are
two or more seeds ("0.812 ± 0.004"). Speed-up = parent latency / model latency at the same input
size; MACs reduction = parent MACs / model MACs. The findings are generated from the numbers only.
"""

from __future__ import annotations

import datetime as dt
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from grid import METHODS, Grid
from polyprune.files import atomic_path, atomic_write_text, write_json

TESTS = (("kvasir", "Kvasir"), ("clinicdb", "ClinicDB"), ("colondb", "ColonDB"))


# ------------------------------------------------------------------------------------- aggregation


def _get(rec: dict[str, Any], path: str) -> float | None:
    v: Any = rec
    for part in path.split("."):
        if not isinstance(v, dict) or part not in v:
            return None
        v = v[part]
    return float(v) if v is not None else None


def metrics(
    rec: dict[str, Any], parent: dict[str, Any] | None, sizes: tuple[int, ...]
) -> dict[str, float | None]:
    """The numbers of one record that the table, the plots and the findings use."""
    out: dict[str, float | None] = {
        "params": _get(rec, "params"),
        "macs": _get(rec, "macs"),
        "val_dice": _get(rec, "val_dice"),
    }
    for key, _ in TESTS:
        out[f"{key}_dice"] = _get(rec, f"test.{key}.dice")
        out[f"{key}_mdice"] = _get(rec, f"test.{key}.mean_dice")
    for s in sizes:
        ms = _get(rec, f"latency.{s}.median_ms")
        out[f"ms_{s}"] = ms
        out[f"fps_{s}"] = 1000.0 / ms if ms else None
        p_ms = _get(parent, f"latency.{s}.median_ms") if parent else None
        out[f"speedup_{s}"] = p_ms / ms if p_ms and ms else None
    s = sizes[-1]
    for kind in ("int8", "openvino"):
        ms = _get(rec, f"latency.{kind}_{s}.median_ms")
        out[f"ms_{kind}_{s}"] = ms
        out[f"fps_{kind}_{s}"] = 1000.0 / ms if ms else None
    p_macs = _get(parent, "macs") if parent else None
    out["macs_fraction"] = out["macs"] / p_macs if p_macs and out["macs"] else None
    out["macs_reduction"] = p_macs / out["macs"] if p_macs and out["macs"] else None
    return out


def aggregate(
    records: list[dict[str, Any]], parent: dict[str, Any] | None, grid: Grid
) -> list[dict[str, Any]]:
    """One row per (method, target) in grid order: mean / sd / n of every metric over its finished seeds."""
    rows = []
    for target in grid.targets:
        for method in grid.methods:
            if not any(grid.has_cell(method, target, seed) for seed in grid.seeds):
                continue  # a cell the grid cut
            recs = [r for r in records if r["method"] == method and r["target"] == target]
            ok = [r for r in recs if r.get("status") == "ok"]
            row: dict[str, Any] = {
                "method": method,
                "target": target,
                "seeds": [r["seed"] for r in ok],
                "status": "ok" if ok else (recs[0]["status"] if recs else "missing"),
                "errors": sorted({r.get("error", "") for r in recs if r.get("status") != "ok"}),
                "mean": {},
                "sd": {},
            }
            per = [metrics(r, parent, grid.latency_sizes) for r in ok]
            for key in per[0] if per else []:
                vals = [p[key] for p in per if p[key] is not None]
                row["mean"][key] = statistics.fmean(vals) if vals else None
                row["sd"][key] = statistics.stdev(vals) if len(vals) > 1 else None
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------- table


def _fmt(row: dict[str, Any], key: str, fmt: str, scale: float = 1.0) -> str:
    m, sd = row["mean"].get(key), row["sd"].get(key)
    if m is None:
        return "–"
    text = format(m * scale, fmt)
    return f"{text} ± {format(sd * scale, fmt)}" if sd is not None else text


def table(rows: list[dict[str, Any]], parent_row: dict[str, Any] | None, grid: Grid, size: int) -> str:
    s_lo, s_hi = grid.latency_sizes[0], grid.latency_sizes[-1]
    head = [
        "method",
        "target MACs",
        "seeds",
        "params (M)",
        f"GMACs @{size}",
        "MACs",
        "val Dice",
        "Kvasir Dice",
        "Kvasir mDice",
        "ClinicDB Dice",
        "ClinicDB mDice",
        "ColonDB Dice",
        "ColonDB mDice",
        f"ORT ms @{s_lo}",
        f"ORT ms @{s_hi}",
        f"FPS @{s_hi}",
        f"speed-up @{s_hi}",
        f"INT8 ms @{s_hi}",
        f"OpenVINO ms @{s_hi}",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row in ([parent_row] if parent_row else []) + rows:
        target = "parent" if row["method"] == "parent" else f"{row['target']:.0%}"
        if row["status"] != "ok":
            cells = [row["method"], target, "–", row["status"]] + ["–"] * (len(head) - 4)
        else:
            cells = [
                f"**{row['method']}**" if row["method"] == "parent" else row["method"],
                target,
                str(len(row["seeds"])) if row["method"] != "parent" else "–",
                _fmt(row, "params", ".3f", 1e-6),
                _fmt(row, "macs", ".3f", 1e-9),
                _fmt(row, "macs_fraction", ".1%"),
                _fmt(row, "val_dice", ".3f"),
                _fmt(row, "kvasir_dice", ".3f"),
                _fmt(row, "kvasir_mdice", ".3f"),
                _fmt(row, "clinicdb_dice", ".3f"),
                _fmt(row, "clinicdb_mdice", ".3f"),
                _fmt(row, "colondb_dice", ".3f"),
                _fmt(row, "colondb_mdice", ".3f"),
                _fmt(row, f"ms_{s_lo}", ".1f"),
                _fmt(row, f"ms_{s_hi}", ".1f"),
                _fmt(row, f"fps_{s_hi}", ".1f"),
                _fmt(row, f"speedup_{s_hi}", ".2f"),
                _fmt(row, f"ms_int8_{s_hi}", ".1f"),
                _fmt(row, f"ms_openvino_{s_hi}", ".1f"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def drops_table(rows: list[dict[str, Any]], parent_row: dict[str, Any] | None) -> str:
    """Test Dice@0.5 points lost against the parent, per (method, target) and test set: mean over seeds
    (± sd), and ColonDB's drop over Kvasir's (how much worse the unseen set fares)."""
    if not parent_row or parent_row["status"] != "ok":
        return "_(no parent record)_"
    head = ["method", "target MACs", "seeds", *(f"{label} drop" for _, label in TESTS), "ColonDB / Kvasir"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row in (r for r in rows if r["status"] == "ok"):
        cells = [row["method"], f"{row['target']:.0%}", str(len(row["seeds"]))]
        drops = {}
        for key, _ in TESTS:
            m, p = row["mean"].get(f"{key}_dice"), parent_row["mean"].get(f"{key}_dice")
            sd = row["sd"].get(f"{key}_dice")
            drops[key] = None if m is None or p is None else 100 * (p - m)
            cells.append(
                "–" if drops[key] is None else f"{drops[key]:.1f}" + (f" ± {100 * sd:.1f}" if sd else "")
            )
        k, c = drops.get("kvasir"), drops.get("colondb")
        cells.append(f"{c / k:.1f}x" if k and c is not None and k > 0.05 else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def oneshot_table(curves: dict[str, Any]) -> str:
    if not curves:
        return "_(no one-shot curves)_"
    ratios = sorted({p["ratio"] for c in curves.values() for p in c["points"]})
    lines = [
        "| criterion | " + " | ".join(f"r={r:g}" for r in ratios) + " |",
        "|---|" + "---:|" * len(ratios),
    ]
    for name, c in curves.items():
        by = {p["ratio"]: p for p in c["points"]}
        cells = [
            f"{by[r]['val_dice']:.3f} ({by[r]['filters_removed']:.0%}, {by[r]['macs_fraction']:.0%} MACs)"
            if r in by
            else "–"
            for r in ratios
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- findings


def _rank(rows: list[dict[str, Any]], key: str) -> list[tuple[str, float]]:
    scored = [(r["method"], r["mean"].get(key)) for r in rows if r["status"] == "ok"]
    return sorted(((m, v) for m, v in scored if v is not None), key=lambda t: -t[1])


def equal_latency_findings(rows: list[dict[str, Any]], size: int) -> list[str]:
    """The uniform model against the best pruned model at least as fast (measured FPS at `size`), on Kvasir:
    a comparison at equal latency, whatever MACs each needs to get there."""
    fps, dice = f"fps_{size}", "kvasir_dice"
    ok = [r for r in rows if r["status"] == "ok" and r["mean"].get(fps) and r["mean"].get(dice) is not None]
    out = []
    for s in (r for r in ok if r["method"] == "scratch"):
        faster = [r for r in ok if r["method"] != "scratch" and r["mean"][fps] >= s["mean"][fps]]
        if not faster:
            out.append(
                f"At equal latency: no pruned model is as fast as the uniform model at {s['target']:.0%} MACs."
            )
            continue
        best = max(faster, key=lambda r: r["mean"][dice])
        verdict = "beats" if best["mean"][dice] > s["mean"][dice] else "does not beat"
        out.append(
            f"At equal latency: the best pruned model at least as fast as the uniform model at {s['target']:.0%} MACs "
            f"({s['mean'][fps]:.1f} FPS, Kvasir Dice {s['mean'][dice]:.3f}) is {best['method']} at {best['target']:.0%} "
            f"MACs ({best['mean'][fps]:.1f} FPS, {best['mean'][dice]:.3f}): it {verdict} it."
        )
    return out


def findings(
    rows: list[dict[str, Any]], parent_row: dict[str, Any] | None, curves: dict[str, Any], grid: Grid
) -> list[str]:
    out: list[str] = []
    size = grid.latency_sizes[-1]
    ours = [m for m in grid.methods if m.startswith("tgn-")]
    mean_rank: dict[str, list[float]] = {}
    # 1. ranking per target
    for target in grid.targets:
        trows = [r for r in rows if r["target"] == target]
        for key, label in TESTS:
            ranked = _rank(trows, f"{key}_dice")
            if not ranked:
                continue
            for i, (m, _) in enumerate(ranked, 1):
                mean_rank.setdefault(m, []).append(i)
            out.append(
                f"At {target:.0%} MACs, {label} test Dice@0.5 ranks: "
                + " > ".join(f"{m} {v:.3f}" for m, v in ranked)
                + "."
            )
        unreachable = [r["method"] for r in trows if r["status"] == "unreachable"]
        if unreachable:
            out.append(
                f"At {target:.0%} MACs, out of reach within the width limits: {', '.join(unreachable)}."
            )
    if mean_rank:
        order = sorted(mean_rank, key=lambda m: statistics.fmean(mean_rank[m]))
        out.append(
            "Mean rank over targets and the test sets (1 = best): "
            + ", ".join(f"{m} {statistics.fmean(mean_rank[m]):.1f}" for m in order)
            + "."
        )
    # 2. where taylor-gradnorm loses
    for target in grid.targets:
        trows = {r["method"]: r for r in rows if r["target"] == target and r["status"] == "ok"}
        for key, label in TESTS:
            k = f"{key}_dice"
            tgn = [
                (m, trows[m]["mean"][k]) for m in ours if m in trows and trows[m]["mean"].get(k) is not None
            ]
            if not tgn:
                continue
            best_m, best_v = max(tgn, key=lambda t: t[1])
            sd = trows[best_m]["sd"].get(k)
            beaters = [
                (m, r["mean"][k])
                for m, r in trows.items()
                if m not in ours and r["mean"].get(k) is not None and r["mean"][k] > best_v
            ]
            if beaters:
                noise = (
                    f" (seed sd of {best_m}: {sd:.3f})"
                    if sd is not None
                    else " (one seed: no spread measured)"
                )
                out.append(
                    f"taylor-gradnorm loses at {target:.0%} MACs on {label}: its best variant {best_m} ({best_v:.3f}) is beaten by "
                    + ", ".join(
                        f"{m} ({v:.3f}, +{v - best_v:.3f})" for m, v in sorted(beaters, key=lambda t: -t[1])
                    )
                    + noise
                    + "."
                )
            elif len(trows) > len(tgn):
                out.append(
                    f"At {target:.0%} MACs on {label}, {best_m} ({best_v:.3f}) is ahead of every other method."
                )
    # 3. pruning vs training small from scratch
    for target in grid.targets:
        trows = {r["method"]: r for r in rows if r["target"] == target and r["status"] == "ok"}
        if "scratch" in trows and len(trows) > 1:
            s = trows["scratch"]["mean"].get("kvasir_dice")
            better = [
                m
                for m, r in trows.items()
                if m != "scratch" and (r["mean"].get("kvasir_dice") or 0) > (s or 0)
            ]
            out.append(
                f"At {target:.0%} MACs the uniform UNet trained from scratch scores Kvasir Dice {s:.3f}; "
                + (
                    f"{len(better)} of {len(trows) - 1} pruning methods beat it ({', '.join(better)})."
                    if better
                    else "no pruning method beats it."
                )
            )
    out += equal_latency_findings(rows, size)
    # 4. best pruned model within 1 Dice point of the parent
    if parent_row and parent_row["status"] == "ok":
        p = parent_row["mean"]["kvasir_dice"]
        fps_key = f"fps_{size}"
        within = [
            r
            for r in rows
            if r["status"] == "ok"
            and r["method"] != "scratch"
            and r["mean"].get("kvasir_dice") is not None
            and r["mean"]["kvasir_dice"] >= p - 0.01
            and r["mean"].get(fps_key)
        ]
        if within:
            best = max(within, key=lambda r: r["mean"][fps_key])
            m = best["mean"]
            out.append(
                f"Headline: the fastest pruned model within 1 Dice point of its parent (Kvasir test Dice {p:.3f}) is "
                f"{best['method']} at {best['target']:.0%} MACs: Kvasir Dice {m['kvasir_dice']:.3f}, ClinicDB Dice "
                f"{m['clinicdb_dice']:.3f}, {m[fps_key]:.1f} FPS at {size} px (ONNX Runtime, {grid.latency_threads} threads; "
                f"parent {parent_row['mean'][fps_key]:.1f} FPS, speed-up {m[f'speedup_{size}']:.2f}x for {m['macs_reduction']:.2f}x fewer MACs)."
            )
        else:
            pruned = [
                r
                for r in rows
                if r["status"] == "ok"
                and r["method"] != "scratch"
                and r["mean"].get("kvasir_dice") is not None
            ]
            if pruned:
                best = max(pruned, key=lambda r: r["mean"]["kvasir_dice"])
                out.append(
                    f"Headline: no pruned model stays within 1 Dice point of its parent (Kvasir test Dice {p:.3f}); the closest is "
                    f"{best['method']} at {best['target']:.0%} MACs with {best['mean']['kvasir_dice']:.3f} "
                    f"({best['mean'].get(fps_key) or float('nan'):.1f} FPS at {size} px)."
                )
    # 5. the physical limit
    for target in grid.targets:
        trows = [r for r in rows if r["target"] == target and r["status"] == "ok"]
        pairs = [
            (r["mean"].get("macs_reduction"), r["mean"].get(f"speedup_{s}"))
            for r in trows
            for s in grid.latency_sizes
        ]
        red = [r["mean"]["macs_reduction"] for r in trows if r["mean"].get("macs_reduction")]
        if red and all(b is not None for _, b in pairs):
            by_size = {
                s: statistics.median(r["mean"][f"speedup_{s}"] for r in trows) for s in grid.latency_sizes
            }
            out.append(
                f"Physical limit at {target:.0%} MACs: {statistics.median(red):.2f}x fewer MACs give a median ONNX Runtime speed-up of "
                + ", ".join(f"{v:.2f}x at {s} px" for s, v in by_size.items())
                + "."
            )
    # 6. one-shot
    if curves:
        ratios = sorted({p["ratio"] for c in curves.values() for p in c["points"] if p["ratio"] > 0})
        if ratios:
            mid = ratios[len(ratios) // 2]
            ranked = sorted(
                ((n, p["val_dice"]) for n, c in curves.items() for p in c["points"] if p["ratio"] == mid),
                key=lambda t: -t[1],
            )
            out.append(
                f"One-shot (no fine-tuning) at {mid:.0%} of the filters removed, val Dice ranks: "
                + " > ".join(f"{n} {v:.3f}" for n, v in ranked)
                + "."
            )
    return out


# -------------------------------------------------------------------------------------------- plots


def _colors(names: list[str]) -> dict[str, Any]:
    """Distinct colours: the dark half of tab20 first, then the light half."""
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab20")
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))
    return {n: cmap(order[i % 20]) for i, n in enumerate(names)}


def _log_axis(axis: Any, ticks: list[float], fmt: str) -> None:
    """Plain tick labels on a log axis (no 2x10^-1 minor labels)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda v, _: format(v, fmt)))
    axis.set_minor_formatter(NullFormatter())


def plot_dice_vs_macs(
    path: Path, rows: list[dict[str, Any]], parent_row: dict[str, Any] | None, grid: Grid
) -> None:
    import matplotlib.pyplot as plt

    colors = _colors(list(grid.methods))
    fig, axes = plt.subplots(1, len(TESTS), figsize=(6 * len(TESTS), 4.8), sharex=True)
    for ax, (key, label) in zip(axes, TESTS, strict=True):
        for method in grid.methods:
            pts = [
                r
                for r in rows
                if r["method"] == method and r["status"] == "ok" and r["mean"].get("macs_fraction")
            ]
            if not pts:
                continue
            pts.sort(key=lambda r: r["mean"]["macs_fraction"])
            x = [r["mean"]["macs_fraction"] for r in pts]
            y = [r["mean"][f"{key}_dice"] for r in pts]
            e = [r["sd"].get(f"{key}_dice") or 0.0 for r in pts]
            style = "--" if method == "scratch" else "-"
            ax.errorbar(x, y, yerr=e, marker="o", ls=style, color=colors[method], label=method, capsize=3)
        if parent_row and parent_row["status"] == "ok":
            pd = parent_row["mean"][f"{key}_dice"]
            ax.plot([1.0], [pd], marker="*", ms=14, color="black", ls="none", label="parent")
            ax.axhline(pd - 0.01, color="grey", lw=0.8, ls=":", label="parent - 1 point")
        ax.set_xscale("log")
        _log_axis(ax.xaxis, [0.1, 0.25, 0.5, 1.0], ".0%")
        ax.set_xlim(0.07, 1.3)
        ax.set_xlabel("MACs (fraction of the parent)")
        ax.set_ylabel(f"{label} test Dice@0.5")
        ax.set_title(f"{label} test (fine-tuned)")
        ax.grid(alpha=0.3)
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


# Published Kvasir-SEG test mDice on the PraNet split (PraNet toolbox protocol: the 256-threshold mean
# Dice, as our "mDice"), as reported, with the hardware their FPS was measured on: not this CPU, so they
# are drawn as reference levels, never placed on our FPS axis. ../shared/research/polyp_anchors.md.
PUBLISHED_KVASIR_MDICE = (
    ("UNet", 0.818, "PraNet paper, Table 1; ~11 FPS as cited by Jha et al."),
    ("PraNet", 0.898, "Fan et al., MICCAI 2020; ~50 FPS on an RTX TITAN"),
    ("HarDNet-MSEG", 0.912, "Huang et al. 2021 README; 88 FPS on an RTX 2080 Ti"),
    ("Polyp-PVT", 0.917, "Dong et al. 2023; FPS not reported"),
)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points that no other point beats in both x (FPS) and y (Dice), in increasing x."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return sorted(front)


def plot_dice_vs_fps(
    path: Path, rows: list[dict[str, Any]], parent_row: dict[str, Any] | None, grid: Grid
) -> None:
    """Kvasir mDice vs measured FPS at the largest latency size: every (method, target), the Pareto front,
    the parent, 25 FPS (video rate) and the published models' levels."""
    import matplotlib.pyplot as plt

    size = grid.latency_sizes[-1]
    colors = _colors(list(grid.methods))
    fig, ax = plt.subplots(figsize=(11, 5.5))
    points: list[tuple[float, float]] = []
    for method in grid.methods:
        pts = [r for r in rows if r["method"] == method and r["status"] == "ok"]
        pts = [(r["mean"].get(f"fps_{size}"), r["mean"].get("kvasir_mdice")) for r in pts]
        pts = [(x, y) for x, y in pts if x and y is not None]
        if pts:
            ax.scatter(*zip(*pts, strict=True), color=colors[method], label=method, zorder=3)
            points += pts
    if parent_row and parent_row["status"] == "ok":
        xy = (parent_row["mean"].get(f"fps_{size}"), parent_row["mean"].get("kvasir_mdice"))
        if xy[0] and xy[1] is not None:
            ax.plot(*xy, marker="*", ms=15, color="black", ls="none", label="parent", zorder=4)
            points.append(xy)
    if len(points) > 1:
        front = pareto_front(points)
        ax.plot(*zip(*front, strict=True), color="black", lw=1, ls="--", label="Pareto front", zorder=2)
    for i, (name, dice, source) in enumerate(PUBLISHED_KVASIR_MDICE):  # labels alternate sides: close levels
        ax.axhline(dice, color="tab:gray", lw=0.8, ls=":")
        ax.annotate(f"{name} {dice:.3f} ({source})", (0.99 if i % 2 else 0.01, dice), fontsize=6.5,
                    xycoords=("axes fraction", "data"), va="bottom", ha="right" if i % 2 else "left", color="dimgray")  # fmt: skip
    ax.axvline(25, color="tab:red", lw=0.8, ls="--", label="25 FPS (video rate)")
    ax.set_xlabel(f"FPS on this CPU (ONNX Runtime fp32, {size} px, {grid.latency_threads} threads, batch 1)")
    ax.set_ylabel("Kvasir-SEG test mDice (PraNet toolbox)")
    ax.set_title("accuracy vs speed; published levels are as reported, on their own GPUs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def plot_oneshot(path: Path, curves: dict[str, Any]) -> None:
    import matplotlib.pyplot as plt

    colors = _colors(list(curves))
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for name, c in curves.items():
        pts = sorted(c["points"], key=lambda p: p["filters_removed"])
        ax.plot(
            [p["filters_removed"] for p in pts],
            [p["val_dice"] for p in pts],
            marker="o",
            color=colors[name],
            label=name,
        )
    ax.set_xlabel("fraction of filters removed (measured)")
    ax.set_ylabel("val Dice@0.5 (no fine-tuning)")
    ax.set_title("one-shot pruning of the parent")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def plot_speedup(
    path: Path, records: list[dict[str, Any]], parent: dict[str, Any] | None, grid: Grid
) -> None:
    import matplotlib.pyplot as plt

    colors = _colors(list(grid.methods))
    markers = ["o", "s", "^", "D"]
    fig, ax = plt.subplots(figsize=(7, 5.5))
    top = 1.0
    for method in grid.methods:
        for j, s in enumerate(grid.latency_sizes):
            pts = [
                metrics(r, parent, grid.latency_sizes)
                for r in records
                if r["method"] == method and r.get("status") == "ok"
            ]
            pts = [p for p in pts if p["macs_reduction"] and p[f"speedup_{s}"]]
            if not pts:
                continue
            x = [p["macs_reduction"] for p in pts]
            y = [p[f"speedup_{s}"] for p in pts]
            top = max(top, *x, *y)
            ax.scatter(
                x,
                y,
                marker=markers[j % len(markers)],
                facecolors=colors[method] if j else "none",
                edgecolors=colors[method],
                label=f"{method} @{s}",
            )
    ax.plot([1, top * 1.1], [1, top * 1.1], color="black", ls="--", lw=1, label="y = x (latency tracks MACs)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = [t for t in (1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32) if t <= top * 1.1]
    _log_axis(ax.xaxis, ticks, "g")
    _log_axis(ax.yaxis, ticks, "g")
    ax.set_xlabel("MACs reduction (parent / model)")
    ax.set_ylabel(f"ONNX Runtime speed-up ({grid.latency_threads} threads, batch 1)")
    ax.set_title("physical limit: every pruned model (each seed)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------------------------- write


def write_report(
    out: Path,
    *,
    grid: Grid,
    parent: dict[str, Any] | None,
    parent_info: dict[str, Any],
    records: list[dict[str, Any]],
    oneshot: dict[str, Any],
    machine: dict[str, Any],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate(records, parent, grid)
    parent_row = None
    if parent:
        pm = metrics(parent, parent, grid.latency_sizes)
        parent_row = {"method": "parent", "target": 1.0, "seeds": [], "status": "ok", "mean": pm, "sd": {}}
    facts = findings(rows, parent_row, oneshot, grid)
    now = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    write_json(
        out / "results.json",
        {
            "generated": now,
            "grid": asdict(grid),
            "methods": {m: asdict(METHODS[m]) for m in grid.methods},
            "machine": machine,
            "parent": {**parent_info, "record": parent},
            "cells": records,
            "aggregate": rows,
            "oneshot": oneshot,
            "findings": facts,
        },
    )
    plot_dice_vs_macs(out / "dice_vs_macs.png", rows, parent_row, grid)
    plot_dice_vs_fps(out / "dice_vs_fps.png", rows, parent_row, grid)
    if oneshot:
        plot_oneshot(out / "oneshot_curves.png", oneshot)
    plot_speedup(out / "speedup_vs_macs.png", records, parent, grid)
    size = int(parent_info.get("input", {}).get("size", 0))
    atomic_write_text(
        out / "results.md",
        markdown(grid, parent, parent_info, rows, parent_row, oneshot, machine, facts, size, now),
    )


def markdown(
    grid: Grid,
    parent: dict[str, Any] | None,
    info: dict[str, Any],
    rows: list[dict[str, Any]],
    parent_row: dict[str, Any] | None,
    oneshot: dict[str, Any],
    machine: dict[str, Any],
    facts: list[str],
    size: int,
    now: str,
) -> str:
    tm = info.get("train", {})
    split = info.get("split", {})
    data = ", ".join(Path(d).name for d in split.get("data", []))
    n_cells = sum(len(r["seeds"]) for r in rows)
    lines = [
        f"# polyprune benchmark: grid `{grid.name}`",
        "",
        f"Generated {now} by `{info.get('command') or 'benchmarks/run.py' + ('' if grid.name == 'full' else ' --' + grid.name)}`; {n_cells} finished cells.",
        f"Machine: {machine.get('cpu')}, {machine.get('cores')} cores; torch {machine.get('torch')}, "
        f"onnxruntime {machine.get('onnxruntime')}, Python {machine.get('python')}.",
        "",
        "## Setup",
        "",
        f"- **Parent**: {info.get('arch', 'UNet')}, input {size} px, "
        f"{info.get('params', 0) / 1e6:.2f} M params, {info.get('macs', 0) / 1e9:.2f} GMACs; trained "
        f"{tm.get('epochs', '?')} epochs ({info.get('train_steps')} steps, batch {tm.get('batch', '?')}, lr {tm.get('lr', '?')}, "
        f"{tm.get('precision', '?')}) on {data} ({tm.get('n_train', '?')} training images, {tm.get('n_val', '?')} validation "
        f"images carved from the train split with seed {split.get('seed')}; PraNet test ids excluded). File `{info.get('path')}`.",
        f"- **Pruning** (every method alike, torch-pruning's included): `polyprune prune` itself "
        f"(`polyprune.pruning.prune_run`), `--target-macs T --steps {grid.prune_steps}` (geometric steps ending at the "
        f"target), `--finetune-iters {grid.finetune_iters // grid.prune_steps}` after each step (AdamW lr {grid.finetune_lr:g}, "
        f"cosine, batch {grid.batch}, the parent's loss and {info.get('precision')} precision; each step keeps the better of "
        f"pruned / fine-tuned by val Dice). Data-driven scores use {grid.n_images} unaugmented training images, re-scored "
        "every step. Global ranking, widths multiples of 8 (`round_to=8`, the nearest allowed width), head never pruned.",
        "- **torch-pruning** (criteria `tp-taylor`, `tp-magnitude`, polyprune/pruning/metapruner.py): "
        "`MetaPruner(global_pruning=True, pruning_ratio=1.0, iterative_steps=200, round_to=1 (its default None), "
        "ignored_layers=[head])`, `step()` until the step's MACs target (its reproduce/main.py progressive "
        "pruning); GroupTaylorImportance reads the gradient of the training loss over the same calibration "
        "images; MagnitudeImportance is L2. round_to is torch-pruning's default: it rounds kept widths down, "
        "so with 8 one step halved the parent's 16-wide layers (cells run so: val Dice 0.000).",
        f"- **scratch**: every parent width times one factor (integer widths, MACs within ~1 % of the target), "
        f"trained from scratch for the parent's {info.get('train_steps')} steps + {grid.finetune_iters} (the same total "
        "training budget as parent + fine-tuning), the parent's lr and batch.",
        f"- **Scores**: Kvasir-SEG test (PraNet split, {(parent or {}).get('test', {}).get('kvasir', {}).get('n_images', '?')} images) "
        f"CVC-ClinicDB test (PraNet split, {(parent or {}).get('test', {}).get('clinicdb', {}).get('n_images', '?')} images) and "
        f"CVC-ColonDB (unseen, {(parent or {}).get('test', {}).get('colondb', {}).get('n_images', '?')} images) at GT "
        "resolution: **Dice** = Dice@0.5 per image (Jha protocol), **mDice** = PraNet toolbox mean Dice over 256 "
        "thresholds. val Dice = Dice@0.5 on the parent's validation split.",
        f"- **Latency**: ONNX Runtime (CPU EP), static export at each size, batch 1, {grid.latency_threads} intra-op "
        f"threads, {grid.latency_warmup} warm-up runs then the median of {grid.latency_runs} runs. FPS = 1000 / median "
        f"ms; speed-up = parent ms / model ms. INT8 = the static INT8 model (ONNX Runtime's quantizer, MinMax on 16 "
        f"training images) on ONNX Runtime; OpenVINO = the fp32 model on OpenVINO's CPU default, both at {grid.latency_sizes[-1]} px. "
        + (
            "Every model was timed again in one back-to-back pass after the last cell finished, so all rows "
            "share the same machine load (`latency_first` in results.json keeps each cell's first timing)."
            if (parent or {}).get("latency_pass") == "final"
            else "The machine is shared: latency is noisy where other jobs ran."
        ),
        "- **Seeds**: "
        + ", ".join(str(s) for s in grid.seeds)
        + " (one shared parent); `a ± b` = mean ± sd over seeds.",
        "",
        "## Results",
        "",
        table(rows, parent_row, grid, size),
        "",
        "Dice@0.5 points lost against the parent (a negative drop is a gain):",
        "",
        drops_table(rows, parent_row),
        "",
        "## Findings",
        "",
        *([f"- {f}" for f in facts] or ["_(no finished cells yet)_"]),
        "",
        "## Plots",
        "",
        "![Dice vs FPS](dice_vs_fps.png)",
        "",
        "![Dice vs MACs](dice_vs_macs.png)",
        "",
        "![one-shot curves](oneshot_curves.png)" if oneshot else "",
        "",
        "![speed-up vs MACs reduction](speedup_vs_macs.png)",
        "",
        "## One-shot curves (val Dice, no fine-tuning; in brackets: filters removed, MACs left)",
        "",
        oneshot_table(oneshot),
        "",
        "## Methods",
        "",
        *[f"- `{m}`: {METHODS[m].description}" for m in grid.methods],
        "",
    ]
    return "\n".join(lines)
