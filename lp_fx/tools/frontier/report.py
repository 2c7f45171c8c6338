"""The frontier's Markdown table and its plot of speedup against retention (:mod:`lp_fx.tools.frontier.run`).

Retention is a point's task accuracy (``acc``) over the baseline's, per task and averaged
(:func:`lp_fx.tools.evaluation.retention.retention`), with its standard error paired over the items both
scored; a record without per-item scores (made before they were kept) gets the error propagated
from the tasks' own as if the two were independent, which overstates it, and the table marks it
"indep.". Without tasks, retention is the baseline's held-out WikiText-2 perplexity over the point's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from lp_fx.tools.evaluation.retention import retention

# The speed of the pairing's pairs pruned (depth L − Δ/2, none of a pair's extra work): the ideal as
# measured, head and per-step overhead included (lp_fx.tools.frontier.speed.paired_variants).
MEASURED_IDEAL = "ideal, measured"
VARIANT_STYLE = {"contiguous": ("C0", "o"), "planned": ("C1", "s"), "finetuned": ("C2", "^")}
# DESIGN.md §1 gives the paper's Llama results only as a range (no point per model): Llama 2 7B at
# Δ = 14 and Llama 3.2 3B at Δ = 10, 1.05–1.20× tokens/s on 2×A100 against tensor parallelism,
# keeping 95–99 % of benchmark accuracy. Drawn as that box, and only on a task-retention axis.
PAPER_RANGE = {"speedup": (1.05, 1.20), "retention": (0.95, 0.99),
               "label": "paper: Llama 2 7B Δ=14, Llama 3.2 3B Δ=10\n(2×A100 vs TP; range, DESIGN.md §1)"}


@dataclass(frozen=True)
class Row:
    """One point, as the table and the plot show it."""

    variant: str
    delta: int
    depth: int
    ideal: float
    pairs: str
    ppl: dict[str, tuple[float, float]]  # text -> (ppl, × baseline)
    mean_acc: tuple[float, float] | None  # (mean, standard error)
    retention: tuple[float, float] | None  # task retention (value, standard error), or None without tasks
    retention_paired: bool  # the error is paired over the items (else propagated as if independent)
    ppl_retention: float  # baseline / held-out WikiText-2 perplexity
    speedup: dict[str, float]  # "paired", "paired + fuse", MEASURED_IDEAL, "llama.cpp" -> × unpaired


def mean_accuracy(tasks: dict) -> tuple[float, float] | None:
    """Mean ``acc`` over the tasks and its standard error."""
    accs = [(m["acc"], m.get("acc_stderr", float("nan"))) for m in tasks.values() if "acc" in m]
    if not accs:
        return None
    mean = sum(a for a, _ in accs) / len(accs)
    return mean, math.sqrt(sum(se * se for _, se in accs)) / len(accs)


def describe_pairs(pairing: dict) -> str:
    pairs, modes = pairing["pairs"], pairing.get("modes") or ["lp"] * len(pairing["pairs"])
    if not pairs:
        return "–"
    return ",".join(f"{a}-{b}" + ("" if mode == "lp" else f" {mode}") for (a, b), mode in zip(pairs, modes))


def rows(result: dict) -> list[Row]:
    """The points, baseline first, then by Δ and variant."""
    points = sorted(result["points"], key=lambda p: (p["delta"], ("baseline", *VARIANT_STYLE).index(p["variant"])))
    base = next((p for p in points if p["variant"] == "baseline"), None)
    if base is None:
        raise ValueError("the results hold no baseline point")
    out = []
    for point in points:
        acc = mean_accuracy(point.get("tasks", {}))
        retention, paired = _task_retention(point, base)
        speed = dict(point.get("speed", {}).get("ratio", {}))
        if "ideal_measured" in point.get("speed", {}):
            speed[MEASURED_IDEAL] = point["speed"]["ideal_measured"]
        if "llamacpp" in point:
            speed["llama.cpp"] = point["llamacpp"]["ratio"]
        if point["variant"] == "baseline":
            speed = {"paired": 1.0, "paired + fuse": 1.0}
        ppl = {text: (m["ppl"], m["ppl"] / base["ppl"][text]["ppl"]) for text, m in point["ppl"].items()}
        out.append(Row(
            point["variant"], point["delta"], point["effective_depth"], point["ideal_speedup"],
            describe_pairs(point["pairing"]), ppl, acc,
            retention, paired, 1 / ppl["wikitext"][1], speed,
        ))
    return out


def _task_retention(point: dict, base: dict) -> tuple[tuple[float, float] | None, bool]:
    """A point's task retention and its standard error (None without tasks), and whether the error
    is paired over the items; the baseline's own is exactly 1."""
    kept = retention(point.get("tasks", {}), base.get("tasks", {}))
    if "mean_acc" not in kept:
        return None, False
    if point is base:
        return (1.0, 0.0), True
    return (kept["mean_acc"], kept.get("mean_acc_stderr", math.nan)), kept.get("mean_acc_stderr_paired", False)


def _ppl_cell(value: tuple[float, float]) -> str:
    return f"{value[0]:.2f} (×{value[1]:.3f})"


def _error_cell(value: tuple[float, float] | None, independent: bool = False) -> str:
    return "–" if value is None else f"{value[0]:.3f} ± {value[1]:.3f}" + " indep." * independent


def _speed_cell(speed: dict[str, float], key: str) -> str:
    return f"{speed[key]:.3f}×" if key in speed else "–"


def frontier_table(result: dict) -> str:
    """Markdown: one row per point, with the ideal speedup L / (L − Δ/2) and the ideal as measured
    (the pairs pruned: :data:`MEASURED_IDEAL`) beside the measured ones."""
    header = ["Δ", "L − Δ/2", "ideal", "variant", "pairs", "WikiText-2 held-out ppl", "LAMBADA-text ppl",
              "mean acc ± se", "retention ± se", "paired", "paired + fuse", MEASURED_IDEAL, "llama.cpp"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * 3 + "---|---|" + "---:|" * 8]
    for row in rows(result):
        cells = [str(row.delta), str(row.depth), f"{row.ideal:.3f}×", row.variant, row.pairs,
                 _ppl_cell(row.ppl["wikitext"]), _ppl_cell(row.ppl["lambada_text"]),
                 _error_cell(row.mean_acc), _error_cell(row.retention, not row.retention_paired),
                 *(_speed_cell(row.speedup, key) for key in ("paired", "paired + fuse", MEASURED_IDEAL, "llama.cpp"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_frontier(result: dict, path: str | Path, title: str = "") -> None:
    """Speedup (x) against retention (y), one curve per variant, each point labelled with its Δ;
    the baseline at (1, 1); the paper's reported range where y is task retention."""
    import matplotlib  # lazy: matplotlib's import takes seconds; only a plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib's import takes seconds; only a plot needs it

    table = rows(result)
    tasks = all(row.retention is not None for row in table[1:])
    measured = any("paired + fuse" in row.speedup for row in table if row.delta)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for variant, (color, marker) in VARIANT_STYLE.items():
        points = [row for row in table if row.variant == variant]
        if not points:
            continue
        xs = [row.speedup.get("paired + fuse", math.nan) if measured else row.ideal for row in points]
        ys = [row.retention[0] if tasks else row.ppl_retention for row in points]
        errors = [row.retention[1] for row in points] if tasks else None
        ax.errorbar(xs, ys, yerr=errors, color=color, marker=marker, label=variant, capsize=3)
        for x, y, row in zip(xs, ys, points):
            ax.annotate(f"Δ={row.delta}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
    ax.plot([1], [1], "k*", markersize=10, label="unpaired")
    if measured:  # where each budget would be if time were proportional to depth
        for delta, ideal in sorted({(row.delta, row.ideal) for row in table if row.delta}):
            ax.axvline(ideal, color="grey", linestyle=":", linewidth=0.8)
            ax.annotate(f"ideal Δ={delta}", (ideal, 0.02), xycoords=("data", "axes fraction"), rotation=90,
                        va="bottom", ha="right", fontsize=7, color="grey")
    if tasks:
        (x0, x1), (y0, y1) = PAPER_RANGE["speedup"], PAPER_RANGE["retention"]
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, color="grey", alpha=0.25, label=PAPER_RANGE["label"]))
    inner = result.get("options", {}).get("speed_inner", "inductor")
    ax.set_xlabel(f"decode speedup, one device: paired + fuse × unpaired ({inner})" if measured
                  else "ideal speedup L / (L − Δ/2)  (speed not measured)")
    ax.set_ylabel("task accuracy retention (mean acc / unpaired)" if tasks
                  else "unpaired / paired held-out WikiText-2 perplexity")
    ax.set_title(title, fontsize="medium")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
