"""Choose which layers to pair by measured perplexity cost, and read/write plan files.

Every score is the calibration perplexity (first half of WikiText-2 raw test) of a whole pairing,
measured, because the costs of pairs do not add up:

1. singles: each candidate pair ``(i, i+1)``, in each mode asked for, paired alone. These only rank
   the candidates for the shortlists below, so they may be measured on fewer windows (``screen``)
   than the joint sets, which decide;
2. grow: pairs are added one at a time: of the ``refine`` cheapest candidates (alone) that share
   no layer with those chosen, the one whose perplexity *together with them* is lowest. This stops
   at the requested number of pairs, or before the first pair that would push the perplexity
   above the budget;
3. improve (local search, up to ``passes`` rounds): each chosen pair in turn is replaced by the
   best of the ``refine`` cheapest candidates that share no layer with the other chosen pairs,
   or by itself in another mode, when that lowers the measured perplexity of the whole set.
   With fewer pairs than asked (a budget), the set grows again after a round that improved it.

Trials are raced when the measure is a :class:`RacedMeasure`: the options of a step are scored on
part of the calibration windows first, and those clearly worse there than the best option (or the
set a swap must beat) are dropped before the rest of the windows. This is a heuristic: a dropped
option could have won on all the windows; the margin sets how clearly worse it must be.

:class:`lp_fx.tools.planning.scorers.GatedScorer` scores all of this with one compiled graph
(:class:`lp_fx.GatedLayerParallel`): a score sets the gates and runs the calibration windows. The
chosen pairing is then compiled plainly once (:func:`lp_fx.tools.planning.scorers.compiled_scorer`) and
its perplexity recorded next to the gated one, which must agree to ``PLAIN_TOLERANCE``.

A plan file records the model's layer count so that a plan made for another model is refused.
``options={"pairs": plan["pairs"]}`` and ``options={"plan": path}`` both accept it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from tqdm.auto import tqdm

from lp_fx.pairing import PLAN_VERSION, Pair, Pairing
from lp_fx.tools.planning.options import MODES, SearchOptions

log = logging.getLogger(__name__)

RACE_MARGIN = SearchOptions.race_margin  # a trial that far above the best on the first windows is dropped (RacedMeasure)


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


class CachedMeasure:
    """``measure`` remembered per set of (pair, mode), whatever the pairing's name."""

    def __init__(self, measure: Measure) -> None:
        self._measure = measure
        self._memo: dict[tuple, float] = {}

    def __call__(self, pairing: Pairing) -> float:
        key = _key(pairing)
        if key not in self._memo:
            self._memo[key] = self._measure(pairing)
        return self._memo[key]

    @property
    def scored(self) -> int:
        """How many different pairings were measured."""
        return len(self._memo)


class RacedMeasure(CachedMeasure):
    """Calibration perplexity over windows in two parts, ``first`` (a ``share`` of the tokens) and
    ``rest``. The whole is the token-weighted geometric mean of the parts' perplexities (every
    window predicts as many tokens), so a pairing scored on both parts has its score on all the
    windows. A set of trials is raced (:func:`_best_trial`): each is scored on ``first``, and
    only those within ``margin`` (relative) of the best there are run on ``rest``."""

    def __init__(self, first: Measure, rest: Measure, share: float, margin: float) -> None:
        if not 0 < share < 1:
            raise ValueError(f"the first part's share of the windows must be in (0, 1), got {share}")
        if not margin >= 0:
            raise ValueError(f"the race margin must be >= 0, got {margin}")
        self.first, self.rest = cached(first), cached(rest)
        self.share, self.margin = share, margin
        super().__init__(self._whole)

    def _whole(self, pairing: Pairing) -> float:
        return math.exp(self.share * math.log(self.first(pairing)) + (1 - self.share) * math.log(self.rest(pairing)))

    @property
    def scored(self) -> int:
        """How many different pairings were measured, whole or on the first part only."""
        return self.first.scored


def _key(pairing: Pairing) -> tuple:
    return tuple(sorted(zip(pairing.pairs, pairing.modes_or("lp"))))


def cached(measure: Measure) -> CachedMeasure:
    """``measure`` with a memory (itself if it already has one)."""
    return measure if isinstance(measure, CachedMeasure) else CachedMeasure(measure)


def score_singles(
    measure: Measure, num_layers: int, modes: Sequence[str] = ("lp",), progress: bool = True
) -> list[Candidate]:
    """Every ``(i, i+1)`` in every mode, paired alone, with its measured perplexity."""
    grid = [((i, i + 1), mode) for i in range(num_layers - 1) for mode in modes]
    return [
        Candidate(pair, mode, measure(Pairing(f"{pair} {mode}", (pair,), (mode,))))
        for pair, mode in tqdm(grid, desc="single pairs", disable=not progress)
    ]


@dataclass(frozen=True)
class Objective:
    """What the search aims at: ``num_pairs`` pairs, or as many as keep the calibration perplexity
    within ``max_ppl_ratio`` × baseline, or the first of the two; ``refine`` cheapest candidates
    tried at each step, ``passes`` rounds of swaps."""

    num_pairs: int | None = None
    max_ppl_ratio: float | None = None
    refine: int = SearchOptions.refine
    passes: int = SearchOptions.passes

    def __post_init__(self) -> None:
        if self.num_pairs is None and self.max_ppl_ratio is None:
            raise ValueError("give a number of pairs, a perplexity budget, or both")
        if self.refine < 1 or self.passes < 0:
            raise ValueError(f"refine must be >= 1 and passes >= 0 (got refine={self.refine}, passes={self.passes})")

    def budget(self, baseline_ppl: float) -> float:
        """The highest calibration perplexity a chosen set may have."""
        return baseline_ppl * self.max_ppl_ratio if self.max_ppl_ratio is not None else float("inf")

    def wants_more(self, chosen: int) -> bool:
        """Whether a set of ``chosen`` pairs may still grow (a budget alone: as long as it holds)."""
        return self.num_pairs is None or chosen < self.num_pairs


def select(
    measure: Measure,
    candidates: Sequence[Candidate],
    baseline_ppl: float,
    objective: Objective,
    progress: bool = True,
    start: Selection | None = None,
) -> Selection:
    """Grow ``start`` (default: nothing chosen) one pair at a time, measuring the combined
    perplexity of each trial set (see the module doc)."""
    budget = objective.budget(baseline_ppl)
    selection = _copy(start) if start is not None else Selection(ppl=baseline_ppl)
    bar = tqdm(total=objective.num_pairs, initial=len(selection.chosen), desc="choosing pairs", disable=not progress)
    while objective.wants_more(len(selection.chosen)):
        shortlist = _shortlist(candidates, selection.layers(), objective.refine)
        if not shortlist:
            if objective.num_pairs is not None:
                raise ValueError(
                    f"only {len(selection.chosen)} disjoint pairs fit among the candidates, "
                    f"{objective.num_pairs} were asked for"
                )
            break
        tried, best_ppl, best = _best_trial(measure, selection.chosen, shortlist)
        selection.steps.append(
            {"step": "add", "tried": [_describe(c, ppl) for ppl, c in tried], "chosen": _describe(best, best_ppl)}
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


def _best_trial(
    measure: Measure, kept: Sequence[Candidate], options: Sequence[Candidate], incumbent: Pairing | None = None
) -> tuple[list[tuple[float | None, Candidate]], float, Candidate | None]:
    """Each option added to ``kept``, measured: all the trials (perplexity None for one dropped in
    a race), and the lowest perplexity and its option (inf and None when every option was dropped,
    which only a set to beat, ``incumbent``, can cause).

    With a :class:`RacedMeasure` the options are first scored on its first part; one above the
    best there (of the options and ``incumbent``, the set they must beat) by more than its margin
    is dropped, and only the others are measured whole."""
    trials = [_pairing([*kept, c]) for c in options]
    running = [True] * len(trials)
    if isinstance(measure, RacedMeasure):
        partial = [measure.first(t) for t in trials]
        bar = min(partial + ([measure.first(incumbent)] if incumbent is not None else []))
        running = [p <= bar * (1 + measure.margin) for p in partial]
    tried = [(measure(t) if run else None, c) for t, c, run in zip(trials, options, running)]
    finished = [(ppl, c) for ppl, c in tried if ppl is not None]
    best_ppl, best = min(finished, key=lambda t: t[0]) if finished else (math.inf, None)
    return tried, best_ppl, best


def improve(
    measure: Measure, candidates: Sequence[Candidate], selection: Selection, refine: int = SearchOptions.refine, progress: bool = True
) -> Selection:
    """One round of local search: each chosen pair in turn is replaced by the best of its
    :func:`_alternatives` when that lowers the measured perplexity of the whole set."""
    current = _copy(selection)
    for old in tqdm(list(current.chosen), desc="swapping pairs", disable=not progress):
        others = [c for c in current.chosen if c is not old]
        alternatives = _alternatives(candidates, old, others, refine)
        if not alternatives:
            continue
        tried, best_ppl, best = _best_trial(measure, others, alternatives, incumbent=_pairing(current.chosen))
        swap = best_ppl < current.ppl
        current.steps.append({
            "step": "swap", "removed": _describe(old, current.ppl), "tried": [_describe(c, ppl) for ppl, c in tried],
            "chosen": _describe(best if swap else old, min(best_ppl, current.ppl)),
        })
        if swap:
            log.info("swapped %s %s for %s %s: combined ppl %.3f -> %.3f",
                     old.pair, old.mode, best.pair, best.mode, current.ppl, best_ppl)
            current.chosen[current.chosen.index(old)] = best
            current.ppl = best_ppl
    return current


def search(
    measure: Measure, candidates: Sequence[Candidate], baseline_ppl: float, objective: Objective, progress: bool = True
) -> Selection:
    """Grow a set (:func:`select`), then up to ``passes`` rounds of :func:`improve`, stopping after
    a round that changed nothing; a set with fewer pairs than asked grows again after a change."""
    selection = select(measure, candidates, baseline_ppl, objective, progress)
    for _ in range(objective.passes):
        before = selection.ppl
        selection = improve(measure, candidates, selection, objective.refine, progress)
        if selection.ppl >= before:
            break
        if objective.wants_more(len(selection.chosen)):
            selection = select(measure, candidates, baseline_ppl, objective, progress, start=selection)
    return selection


def _shortlist(candidates: Sequence[Candidate], used: set[int], refine: int) -> list[Candidate]:
    free = [c for c in candidates if not used.intersection(c.pair)]
    return sorted(free, key=lambda c: c.ppl)[:refine]


def _alternatives(
    candidates: Sequence[Candidate], old: Candidate, others: Sequence[Candidate], refine: int
) -> list[Candidate]:
    """What may replace ``old``: the ``refine`` cheapest candidates (alone) that share no layer
    with ``others``, and ``old``'s pair in its other modes."""
    used = {layer for c in others for layer in c.pair}
    cheapest = _shortlist([c for c in candidates if c != old], used, refine)
    flips = [c for c in candidates if c.pair == old.pair and c != old and c not in cheapest]
    return cheapest + flips


def _copy(selection: Selection) -> Selection:
    return Selection(list(selection.chosen), selection.ppl, list(selection.steps))


def _pairing(chosen: Sequence[Candidate]) -> Pairing:
    return Selection(list(chosen)).pairing("trial")


def _describe(candidate: Candidate, ppl: float | None) -> dict:
    """A candidate with its perplexity in a set (None: dropped in a race)."""
    return {"pair": list(candidate.pair), "mode": candidate.mode, "single_ppl": candidate.ppl, "ppl": ppl}


def pairings_scored(measure: CachedMeasure, screen: CachedMeasure) -> int:
    """How many pairings the two measures scored (a pairing scored on the screen's windows and on
    the calibration windows counts twice, unless the screen is the measure or its first part)."""
    shared = screen in (measure, getattr(measure, "first", None))
    return measure.scored + (0 if shared else screen.scored)


PLAIN_TOLERANCE = 1e-3  # relative: the gated graph's perplexity of the plan against the plain compile's


def make_plan(
    measure: Measure,
    num_layers: int,
    model_name: str,
    num_pairs: int | None = None,
    max_ppl_ratio: float | None = None,
    modes: Sequence[str] = SearchOptions.modes,
    refine: int = SearchOptions.refine,
    passes: int = SearchOptions.passes,
    calibration: dict | None = None,
    verify: Measure | None = None,
    screen: Measure | None = None,
    progress: bool = True,
) -> dict:
    """Measure the baseline and every candidate, choose pairs, return the plan as a dict.

    ``screen`` (default ``measure``) measures the single pairs, which only rank the candidates;
    a cheaper one (fewer windows) leaves more of the time to the joint sets.

    ``verify`` (e.g. :func:`compiled_scorer`) measures the chosen pairing once more, another way;
    its perplexity is recorded as ``calibration.plan_ppl_plain`` (see :func:`plain_disagreement`).
    """
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    objective = Objective(num_pairs, max_ppl_ratio, refine, passes)
    began = time.monotonic()
    measure = cached(measure)
    baseline_ppl = measure(Pairing("baseline"))
    screen = measure if screen is None else cached(screen)
    candidates = score_singles(screen, num_layers, modes, progress)
    selection = search(measure, candidates, baseline_ppl, objective, progress)
    pairing = selection.pairing()
    calib = {**(calibration or {}), "baseline_ppl": baseline_ppl, "plan_ppl": selection.ppl}
    search_record = {"pairings_scored": pairings_scored(measure, screen), "seconds": round(time.monotonic() - began, 1)}
    if isinstance(measure, RacedMeasure):
        dropped = sum(trial["ppl"] is None for step in selection.steps for trial in step["tried"])
        search_record.update(race_margin=measure.margin, trials_dropped=dropped)
    if verify is not None:
        calib["plan_ppl_plain"] = verify(pairing)
    return {
        "version": PLAN_VERSION,
        "model": model_name,
        "num_layers": num_layers,
        "pairs": [list(pair) for pair in pairing.pairs],
        "modes": list(pairing.modes or ()),
        "objective": asdict(objective),
        "calibration": calib,
        "search": search_record,
        "candidates": [_describe(c, c.ppl) for c in candidates],
        "steps": selection.steps,
    }


def plain_disagreement(plan: dict) -> str | None:
    """Why the plan's searched perplexity cannot be trusted (it differs from the plain compile's
    by more than ``PLAIN_TOLERANCE``), or None."""
    calib = plan["calibration"]
    plain, searched = calib.get("plan_ppl_plain"), calib["plan_ppl"]
    if plain is None or abs(searched - plain) <= PLAIN_TOLERANCE * plain:
        return None
    return (
        f"the searched perplexity of the plan, {searched:.4f}, differs from the plain compile's, {plain:.4f}, "
        f"by more than {PLAIN_TOLERANCE:.1%}"
    )
