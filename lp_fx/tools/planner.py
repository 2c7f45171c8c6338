"""Choose which layers to pair by measured perplexity cost, and read/write plan files.

1. Each candidate pair ``(i, i+1)`` (and, if asked, each mode) is paired alone and its
   perplexity is measured on calibration text (the first half of WikiText-2 raw test).
2. Pairs are then added one at a time: among the ``refine`` cheapest candidates that do not
   share a layer with the pairs already chosen, the one whose *combined* perplexity (all chosen
   pairs together, measured) is lowest is taken, because effects do not add up exactly.
   This stops at the requested number of pairs, or before the first pair that would push the
   calibration perplexity above the budget.

A plan file records the model's layer count so that a plan made for another model is refused.
``options={"pairs": plan["pairs"]}`` and ``options={"plan": path}`` both accept it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from tqdm.auto import tqdm

from lp_fx.tools.evaluate import Pair, Pairing

log = logging.getLogger(__name__)

PLAN_VERSION = 1
MODES = ("lp", "block")


def plan_pairing(plan: dict, name: str) -> Pairing:
    """The :class:`Pairing` a plan describes."""
    modes = plan.get("modes")
    return Pairing(
        name,
        tuple((int(a), int(b)) for a, b in plan["pairs"]),
        tuple(modes) if modes is not None else None,
    )


def save_plan(plan: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(plan, indent=2) + "\n")


# ------------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Candidate:
    """One pair in one mode, with its calibration perplexity when paired alone."""

    pair: Pair
    mode: str
    ppl: float


@dataclass
class Selection:
    """The chosen candidates (in the order chosen), and the measured combined perplexity."""

    chosen: list[Candidate] = field(default_factory=list)
    ppl: float = float("nan")
    steps: list[dict] = field(default_factory=list)

    def layers(self) -> set[int]:
        return {layer for candidate in self.chosen for layer in candidate.pair}

    def pairing(self, name: str = "plan") -> Pairing:
        ordered = sorted(self.chosen, key=lambda c: c.pair)
        return Pairing(name, tuple(c.pair for c in ordered), tuple(c.mode for c in ordered))


Measure = Callable[[Pairing], float]


def cached(measure: Measure) -> Measure:
    """``measure`` remembered per set of (pair, mode), whatever the pairing's name."""
    memo: dict[tuple, float] = {}

    def wrapped(pairing: Pairing) -> float:
        key = tuple(sorted(zip(pairing.pairs, pairing.modes or ("lp",) * pairing.num_pairs)))
        if key not in memo:
            memo[key] = measure(pairing)
        return memo[key]

    return wrapped


def score_singles(
    measure: Measure, num_layers: int, modes: Sequence[str] = ("lp",), progress: bool = True
) -> list[Candidate]:
    """Every ``(i, i+1)`` in every mode, paired alone, with its measured perplexity."""
    grid = [((i, i + 1), mode) for i in range(num_layers - 1) for mode in modes]
    return [
        Candidate(pair, mode, measure(Pairing(f"{pair} {mode}", (pair,), (mode,))))
        for pair, mode in tqdm(grid, desc="single pairs", disable=not progress)
    ]


def select(
    measure: Measure,
    candidates: Sequence[Candidate],
    baseline_ppl: float,
    num_pairs: int | None = None,
    max_ppl_ratio: float | None = None,
    refine: int = 3,
    progress: bool = True,
) -> Selection:
    """Greedy choice with the combined perplexity measured at every step (see module doc)."""
    if num_pairs is None and max_ppl_ratio is None:
        raise ValueError("give a number of pairs, a perplexity budget, or both")
    budget = baseline_ppl * max_ppl_ratio if max_ppl_ratio is not None else float("inf")
    selection = Selection(ppl=baseline_ppl)
    target = num_pairs if num_pairs is not None else len(candidates)
    bar = tqdm(total=num_pairs, desc="choosing pairs", disable=not progress)
    while len(selection.chosen) < target:
        shortlist = _shortlist(candidates, selection.layers(), refine)
        if not shortlist:
            if num_pairs is not None:
                raise ValueError(
                    f"only {len(selection.chosen)} disjoint pairs fit among the candidates, "
                    f"{num_pairs} were asked for"
                )
            break
        tried = [(measure(_with(selection, c)), c) for c in shortlist]
        best_ppl, best = min(tried, key=lambda t: t[0])
        selection.steps.append(
            {"tried": [_describe(c, ppl) for ppl, c in tried], "chosen": _describe(best, best_ppl)}
        )
        if best_ppl > budget:
            log.info("stopping: adding %s would give ppl %.3f > budget %.3f", best.pair, best_ppl, budget)
            break
        selection.chosen.append(best)
        selection.ppl = best_ppl
        bar.update(1)
        log.info("chose %s %s: combined ppl %.3f", best.pair, best.mode, best_ppl)
    bar.close()
    return selection


def _shortlist(candidates: Sequence[Candidate], used: set[int], refine: int) -> list[Candidate]:
    free = [c for c in candidates if not used.intersection(c.pair)]
    return sorted(free, key=lambda c: c.ppl)[:refine]


def _with(selection: Selection, candidate: Candidate) -> Pairing:
    trial = Selection(selection.chosen + [candidate])
    return trial.pairing("trial")


def _describe(candidate: Candidate, ppl: float) -> dict:
    return {"pair": list(candidate.pair), "mode": candidate.mode, "single_ppl": candidate.ppl, "ppl": ppl}


def make_plan(
    measure: Measure,
    num_layers: int,
    model_name: str,
    num_pairs: int | None = None,
    max_ppl_ratio: float | None = None,
    modes: Sequence[str] = ("lp",),
    refine: int = 3,
    calibration: dict | None = None,
    progress: bool = True,
) -> dict:
    """Measure the baseline and every candidate, choose pairs, return the plan as a dict."""
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    measure = cached(measure)
    baseline_ppl = measure(Pairing("baseline"))
    candidates = score_singles(measure, num_layers, modes, progress)
    selection = select(measure, candidates, baseline_ppl, num_pairs, max_ppl_ratio, refine, progress)
    pairing = selection.pairing()
    return {
        "version": PLAN_VERSION,
        "model": model_name,
        "num_layers": num_layers,
        "pairs": [list(pair) for pair in pairing.pairs],
        "modes": list(pairing.modes or ()),
        "objective": {"num_pairs": num_pairs, "max_ppl_ratio": max_ppl_ratio, "refine": refine},
        "calibration": {**(calibration or {}), "baseline_ppl": baseline_ppl, "plan_ppl": selection.ppl},
        "candidates": [_describe(c, c.ppl) for c in candidates],
        "steps": selection.steps,
    }
