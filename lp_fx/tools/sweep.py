"""Δ sweep: contiguous pair ranges of every even Δ from several start layers (paper, Figure 1).

Each point pairs layers ``start .. start+Δ-1`` as ``(start, start+1), …``; its effective depth is
``L - Δ/2``. Results go to JSON rows and a PNG of perplexity against effective depth, one line
per start layer, with the baseline at depth ``L``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

from tqdm.auto import tqdm

from lp_fx.config import pairs_from_range
from lp_fx.tools.evaluate import BASELINE, Pairing

log = logging.getLogger(__name__)

Evaluate = Callable[[Pairing], dict]


def default_starts(num_layers: int, count: int = 4) -> list[int]:
    """``count`` even start layers spread over the first half of the stack, from layer 2."""
    last = max(2, (num_layers // 2) // 2 * 2)
    step = max(2, (last - 2) // max(count - 1, 1) // 2 * 2)
    return list(range(2, last + 1, step))[:count]


def sweep_points(
    num_layers: int, starts: Sequence[int], deltas: Sequence[int] | None = None
) -> list[tuple[int, int]]:
    """``(start, Δ)`` for every requested start and every even Δ whose range fits the model."""
    points = []
    for start in starts:
        fitting = range(2, num_layers - start + 1, 2)
        points += [(start, delta) for delta in fitting if deltas is None or delta in deltas]
    return points


def run_sweep(
    evaluate: Evaluate, num_layers: int, points: Sequence[tuple[int, int]], progress: bool = True
) -> dict:
    """The baseline and every point through ``evaluate``; rows carry start, end, Δ and depth."""
    rows = []
    for start, delta in tqdm(points, desc="sweep", disable=not progress):
        pairing = Pairing(f"{start}:{start + delta}", pairs_from_range(start, start + delta))
        rows.append(
            {
                "start": start,
                "end": start + delta,
                "delta": delta,
                "effective_depth": num_layers - delta // 2,
                "results": evaluate(pairing),
            }
        )
        log.info("sweep %s: %s", pairing.name, rows[-1]["results"])
    return {"num_layers": num_layers, "baseline": evaluate(BASELINE), "rows": rows}


def plot_sweep(sweep: dict, path: str | Path, title: str = "") -> None:
    """Perplexity (log scale) against effective depth, one line per start layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for start in sorted({row["start"] for row in sweep["rows"]}):
        rows = sorted((r for r in sweep["rows"] if r["start"] == start), key=lambda r: r["delta"])
        ax.plot(
            [r["effective_depth"] for r in rows],
            [r["results"]["wikitext"]["ppl"] for r in rows],
            marker="o",
            markersize=3,
            label=f"start = {start}",
        )
    ax.scatter(
        [sweep["num_layers"]], [sweep["baseline"]["wikitext"]["ppl"]], color="black", zorder=3,
        label="baseline",
    )
    ax.set_yscale("log")
    ax.set_xlabel("effective depth  L − Δ/2")
    ax.set_ylabel("WikiText-2 perplexity (512-token windows)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
