"""Depth sweep: perplexity as more layers are transformed (paper, Figure 1).

A point applies one transform to the contiguous layers ``start .. start + Δ - 1``: ``lp``, ``block``,
``prune`` or ``merge`` as the pairs ``(start, start+1), (start+2, start+3), …`` (Δ even, effective
depth ``L - Δ/2``), or ``shuffle``, those layers run in a seeded random order (depth ``L``), once
per seed. Each point is measured on the model compiled with the layer_parallel backend, at each
precision asked for. Results go to JSON rows, a Markdown table (rows Δ, columns transforms) and a
PNG of perplexity against Δ, one line per transform, the baseline as a horizontal line.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from tqdm.auto import tqdm

from lp_fx.config import MODES
from lp_fx.pairing import BASELINE, Pairing, Shuffle, pairs_from_range

log = logging.getLogger(__name__)

Evaluate = Callable[[Pairing], dict]
TRANSFORMS = (*MODES, "shuffle")
# (transform, precision) pairs that cannot be measured, and why; the sweep leaves them out.
UNSUPPORTED = {("merge", "int8"): "torchao's int8 weights cannot be averaged"}
METRIC = ("wikitext", "ppl")  # what the table and the plot show


@dataclass(frozen=True)
class Point:
    """One transform of the layers ``start .. start + delta - 1`` (a shuffle with its ``seed``)."""

    transform: str
    start: int
    delta: int
    seed: int | None = None

    @property
    def end(self) -> int:
        return self.start + self.delta

    def effective_depth(self, num_layers: int) -> int:
        """``L - Δ/2`` when Δ/2 layers are paired, pruned or merged away; a shuffle keeps them all."""
        return num_layers if self.transform == "shuffle" else num_layers - self.delta // 2

    def pairing(self) -> Pairing:
        """What the backend is given for this point."""
        name = f"{self.transform} {self.start}:{self.end}"
        if self.transform == "shuffle":
            return Pairing(f"{name} seed {self.seed}", shuffle=Shuffle(self.start, self.end, self.seed))
        pairs = pairs_from_range(self.start, self.end)
        return Pairing(name, pairs, (self.transform,) * len(pairs))

    def to_json(self, num_layers: int) -> dict:
        out = {
            "transform": self.transform,
            "start": self.start,
            "end": self.end,
            "delta": self.delta,
            "effective_depth": self.effective_depth(num_layers),
        }
        if self.transform == "shuffle":
            out.update(seed=self.seed, order=list(Shuffle(self.start, self.end, self.seed).order))
        return out


def parse_transforms(spec: str) -> tuple[str, ...]:
    """``"lp,prune,shuffle"`` -> the transforms, checked against :data:`TRANSFORMS`."""
    names = tuple(dict.fromkeys(name.strip() for name in spec.split(",") if name.strip()))
    unknown = [name for name in names if name not in TRANSFORMS]
    if unknown or not names:
        raise ValueError(
            f"--transforms {spec!r}: unknown {', '.join(map(repr, unknown)) or 'empty list'}; "
            f"valid transforms: {', '.join(TRANSFORMS)}"
        )
    return names


def default_starts(num_layers: int, count: int = 4) -> list[int]:
    """``count`` even start layers spread over the first half of the stack, from layer 2."""
    last = max(2, (num_layers // 2) // 2 * 2)
    step = max(2, (last - 2) // max(count - 1, 1) // 2 * 2)
    return list(range(2, last + 1, step))[:count]


def default_layout(num_layers: int, transforms: Sequence[str]) -> tuple[list[int], int]:
    """Default start layers and step between Δ values.

    One pairing transform (``lp`` alone, as the sweep always did): :func:`default_starts` and every
    even Δ. Several transforms, or a shuffle (one point per seed): the last of those starts (the
    middle of the stack) and every second even Δ (2, 6, 10, …), 26 points for all five on a
    30-layer model.
    """
    starts = default_starts(num_layers)
    if len(transforms) == 1 and transforms[0] != "shuffle":
        return starts, 2
    return starts[-1:], 4


def sweep_ranges(
    num_layers: int, starts: Sequence[int], deltas: Sequence[int] | None = None, step: int = 2
) -> list[tuple[int, int]]:
    """``(start, Δ)`` for every requested start and every ``step``-th even Δ whose range fits the model
    (with ``deltas``: those of them that fit)."""
    ranges = []
    for start in starts:
        fitting = range(2, num_layers - start + 1, 2 if deltas else step)
        ranges += [(start, delta) for delta in fitting if deltas is None or delta in deltas]
    if not ranges:
        raise ValueError(
            f"no range fits a {num_layers}-layer model: starts {list(starts)}, Δ {deltas or 'default'}; "
            f"Δ must be even and at least 2, with start + Δ <= {num_layers}"
        )
    return ranges


def shuffle_seeds(start: int, end: int, count: int) -> list[int]:
    """The first ``count`` seeds from 0 whose orders differ from the original and from each other
    (a range of n layers has n! - 1 such orders: one for two layers)."""
    wanted = min(count, math.factorial(end - start) - 1)
    seen = {tuple(range(start, end))}
    seeds: list[int] = []
    seed = 0
    while len(seeds) < wanted:
        order = Shuffle(start, end, seed).order
        if order not in seen:
            seen.add(order)
            seeds.append(seed)
        seed += 1
    return seeds


def sweep_points(
    num_layers: int, transforms: Sequence[str], ranges: Sequence[tuple[int, int]], seeds: int = 3
) -> list[Point]:
    """Every transform on every range; a shuffle once per seed from :func:`shuffle_seeds`."""
    points = []
    for transform in transforms:
        for start, delta in ranges:
            if transform == "shuffle":
                points += [Point(transform, start, delta, seed) for seed in shuffle_seeds(start, start + delta, seeds)]
            else:
                points.append(Point(transform, start, delta))
    return points


def unsupported(transforms: Sequence[str], precisions: Sequence[str]) -> list[dict]:
    """The combinations the sweep leaves out, each with the reason."""
    return [
        {"transform": t, "quantize": p, "why": UNSUPPORTED[(t, p)]}
        for p in precisions
        for t in transforms
        if (t, p) in UNSUPPORTED
    ]


def run_sweep(
    evaluate: Evaluate,
    num_layers: int,
    points: Sequence[Point],
    precisions: Sequence[str] = ("fp32",),
    use_precision: Callable[[str], None] = lambda precision: None,
    progress: bool = True,
) -> dict:
    """For each precision in turn (``use_precision`` puts the model in it): the baseline and every
    point through ``evaluate``. Rows carry the transform, range, Δ, effective depth and precision,
    and a shuffle's seed and order."""
    transforms = list(dict.fromkeys(point.transform for point in points))
    result: dict = {
        "num_layers": num_layers,
        "quantize": list(precisions),
        "baselines": {},
        "rows": [],
        "skipped": unsupported(transforms, precisions),
    }
    for precision in precisions:
        use_precision(precision)
        result["baselines"][precision] = evaluate(BASELINE)
        todo = [point for point in points if (point.transform, precision) not in UNSUPPORTED]
        for point in tqdm(todo, desc=f"sweep {precision}", disable=not progress):
            pairing = point.pairing()
            row = {**point.to_json(num_layers), "quantize": precision, "results": evaluate(pairing)}
            result["rows"].append(row)
            log.info("sweep %s %s: %s", pairing.name, precision, row["results"])
    return result


# ------------------------------------------------------------------------------ table and plot

Series = dict[tuple[str, str, int], dict[int, list[float]]]  # (transform, precision, start) -> Δ -> values


def metric_series(result: dict) -> Series:
    """The table's and plot's values: per transform, precision and start, Δ -> the perplexity of
    each point (several for a shuffle, one per seed)."""
    task, metric = METRIC
    series: Series = defaultdict(lambda: defaultdict(list))
    for row in result["rows"]:
        series[row["transform"], row["quantize"], row["start"]][row["delta"]].append(row["results"][task][metric])
    return series


def _column(transform: str, precision: str) -> str:
    return transform if precision == "fp32" else f"{transform} {precision}"


def _number(value: float) -> str:
    return f"{value:.4g}" if value < 1e4 else f"{value:.0f}"


def _cell(values: Sequence[float] | None) -> str:
    """One value, or the mean and [min–max] of a shuffle's seeds."""
    if not values:
        return "–"
    if len(values) == 1:
        return _number(values[0])
    return f"{_number(statistics.mean(values))} [{_number(min(values))}–{_number(max(values))}]"


def sweep_table(result: dict) -> str:
    """Markdown table: the baseline, then one row per range (start, Δ, ``L - Δ/2``), one column
    per transform and precision; a shuffle's cell is the mean [min–max] over its seeds."""
    series = metric_series(result)
    columns = list(dict.fromkeys((t, p) for t, p, _ in series))
    ranges = sorted({(start, delta) for (_, _, start), by_delta in series.items() for delta in by_delta})
    num_layers = result["num_layers"]
    task, metric = METRIC
    header = ["start", "Δ", "L − Δ/2", *(_column(t, p) for t, p in columns)]
    baseline = [_number(result["baselines"][p][task][metric]) for _, p in columns]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---:|" * len(header),
        "| baseline | 0 | " + " | ".join([str(num_layers), *baseline]) + " |",
    ]
    for start, delta in ranges:
        cells = [_cell(series.get((t, p, start), {}).get(delta)) for t, p in columns]
        lines.append("| " + " | ".join([str(start), str(delta), str(num_layers - delta // 2), *cells]) + " |")
    return "\n".join(lines)


LINE_STYLES = {"fp32": "-", "int8": "--"}
MARKERS = "os^Dv<>"


def plot_sweep(result: dict, path: str | Path, title: str = "") -> None:
    """Perplexity (log scale) against Δ, one line per transform (per start and precision when there
    are several); a shuffle's line is the mean over seeds, its band the min–max; the baselines as
    horizontal lines. The top axis gives the effective depth of the pairing transforms."""
    import matplotlib  # lazy: matplotlib's import takes seconds; only a plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib's import takes seconds; only a plot needs it

    series = metric_series(result)
    starts = sorted({start for _, _, start in series})
    num_layers = result["num_layers"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for (transform, precision, start), by_delta in series.items():
        deltas = sorted(by_delta)
        label = _column(transform, precision) + (f", start {start}" if len(starts) > 1 else "")
        style = dict(
            color=f"C{TRANSFORMS.index(transform)}", linestyle=LINE_STYLES[precision],
            marker=MARKERS[starts.index(start) % len(MARKERS)], markersize=4,
        )
        ax.plot(deltas, [statistics.mean(by_delta[d]) for d in deltas], label=label, **style)
        if any(len(by_delta[d]) > 1 for d in deltas):
            lows, highs = [min(by_delta[d]) for d in deltas], [max(by_delta[d]) for d in deltas]
            ax.fill_between(deltas, lows, highs, color=style["color"], alpha=0.2, linewidth=0)
    task, metric = METRIC
    for precision, baseline in result["baselines"].items():
        ax.axhline(
            baseline[task][metric], color="black", linestyle=LINE_STYLES[precision], linewidth=1,
            label=_column("baseline", precision),
        )
    deltas = sorted({delta for by_delta in series.values() for delta in by_delta})
    ax.set_xticks(deltas)
    top = ax.secondary_xaxis("top", functions=(lambda d: num_layers - d / 2, lambda e: 2 * (num_layers - e)))
    top.set_xticks([num_layers - delta // 2 for delta in deltas])
    top.set_xlabel("effective depth  L − Δ/2  (lp, block, prune, merge)")
    ax.set_yscale("log")
    ax.set_xlabel("layers transformed  Δ  (layers start … start + Δ − 1)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", ncol=2 if len(series) > 6 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
