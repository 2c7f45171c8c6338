"""What the planner measures with: calibration perplexity of any pairing from one gated compiled
graph (:class:`GatedScorer`), of one pairing compiled plainly (:func:`compiled_scorer`), and the
calibration windows split for racing (:func:`calibration_measures`)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from lp_fx.gates import OFF
from lp_fx.pairing import Pairing
from lp_fx.tools.evaluation import scoring
from lp_fx.tools.evaluation.compiled import LogitsFn, compile_pairing
from lp_fx.tools.planning.lazy_gates import LazyGatedGraph
from lp_fx.tools.planning.search import CachedMeasure, Measure, RacedMeasure, cached
from lp_fx.backend import GatedLayerParallel


class GatedScorer:
    """Calibration perplexity of any pairing from one compiled graph: a score sets the gates of
    :class:`lp_fx.GatedLayerParallel` and runs the windows; nothing is compiled again.

    With the ``eager`` inner compiler the graph runs lazily (:class:`LazyGatedGraph`): only what
    the pairing selects, from the first layer where it differs from a pairing scored before on the
    same window. The values kept are those of the pairings the search goes on from (see
    :meth:`_keep_values`). Any other ``inner`` runs the whole gated graph for every score.
    """

    def __init__(
        self, model: torch.nn.Module, windows: torch.Tensor, modes: Sequence[str], inner: str | Callable
    ) -> None:
        torch._dynamo.reset()
        self.graphs: list[LazyGatedGraph] = []
        self.backend = GatedLayerParallel(model.config.num_hidden_layers, modes, self._lazy if inner == "eager" else inner)
        compiled = torch.compile(model, backend=self.backend)
        self._logits: LogitsFn = lambda ids: compiled(input_ids=ids, use_cache=False).logits
        self.windows = windows
        self._best: dict[tuple[int, int], tuple[float, tuple[int, ...]]] = {}

    def _lazy(self, gm: torch.fx.GraphModule, example_inputs: Sequence[object]) -> LazyGatedGraph:
        graph = LazyGatedGraph(gm)
        self.graphs.append(graph)
        return graph

    def _select(self, pairing: Pairing) -> None:
        """Set the gates to ``pairing`` (pairs without a mode are ``lp``)."""
        self.backend.set_pairing(pairing.pairs, pairing.modes or ("lp",) * pairing.num_pairs)

    def __call__(self, pairing: Pairing) -> float:
        return self.score(pairing, self.windows)

    def score(self, pairing: Pairing, windows: torch.Tensor) -> float:
        """The perplexity of ``pairing`` on ``windows`` (same shape as the compiled ones)."""
        self._select(pairing)
        ppl = scoring.perplexity(self._logits, windows, pairing.name, progress=False).ppl
        if self.graphs:
            self._keep_values(pairing.num_pairs, ppl, windows)
        return ppl

    def _keep_values(self, num_pairs: int, ppl: float, windows: torch.Tensor) -> None:
        """Keep the values of the unpaired model and of the best pairing scored so far with each
        of the two largest numbers of pairs scored on a set of windows, for every set of windows
        scored (the calibration windows may be scored in parts, see :func:`calibration_measures`);
        drop the others.

        The search goes on from those: growing adds a pair to the best set of its size, a swap
        replaces a pair of the best set of its size (the current one), and singles and the first
        pair start from the unpaired model."""
        best = self._best.get((id(windows), num_pairs))
        if best is None or ppl < best[0]:
            self._best[(id(windows), num_pairs)] = (ppl, tuple(self.backend.gates.tolist()))
        keep = []
        for scored in {w for w, _ in self._best}:
            sizes = sorted(n for w, n in self._best if w == scored)[-2:]
            keep += [self._best[(scored, n)][1] for n in sizes]
        self._retain_with_unpaired(keep)

    def _retain_with_unpaired(self, settings: list[tuple[int, ...]]) -> None:
        """Keep only the values of the unpaired model and of these gate settings."""
        for graph in self.graphs:
            graph.retain([(OFF,) * len(self.backend.gates), *settings])

    def window_nll(self, pairing: Pairing, window: torch.Tensor) -> float:
        """The summed next-token NLL of ``pairing`` on one window. Unlike :meth:`score` it keeps
        every value computed, whatever the planner would keep: :meth:`keep_only` and :meth:`forget`
        choose."""
        self._select(pairing)
        return scoring.perplexity(self._logits, window[None], pairing.name, progress=False).nll

    def keep_only(self, pairings: Sequence[Pairing]) -> None:
        """Keep only the values of the unpaired model and of ``pairings`` (those a later pairing
        may start from), on every set of windows."""
        keep = []
        for pairing in pairings:
            self._select(pairing)
            keep.append(tuple(self.backend.gates.tolist()))
        self._retain_with_unpaired(keep)

    def forget(self) -> None:
        """Drop every value kept."""
        for graph in self.graphs:
            graph.retain([])

    def on(self, windows: torch.Tensor) -> Measure:
        """This scorer measuring on other windows of the same length, from the same graph."""
        return lambda pairing: self.score(pairing, windows)

    @property
    def compiles(self) -> int:
        """How many graphs the backend compiled."""
        return len(self.backend.reports)

    def share_run(self) -> float | None:
        """The share of the gated graph's nodes run per score (lazily), or None when run whole."""
        if not self.graphs:
            return None
        return sum(g.share_run() for g in self.graphs) / len(self.graphs)


def compiled_scorer(model: torch.nn.Module, windows: torch.Tensor, inner: str) -> Measure:
    """Calibration perplexity of a pairing compiled plainly (one compile per call)."""

    def score(pairing: Pairing) -> float:
        logits_fn = compile_pairing(model, pairing, "lp", inner)
        return scoring.perplexity(logits_fn, windows, pairing.name, progress=False).ppl

    return score


def race_parts(calib: torch.Tensor, screen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration windows in two parts, first part first: the screen's windows when they are
    some but not all of the calibration windows (single pairs, scored on the screen, then cost
    nothing more), else the first half."""
    in_screen = torch.tensor([any(torch.equal(row, s) for s in screen) for row in calib])
    if 0 < int(in_screen.sum()) == screen.shape[0] < calib.shape[0]:
        return screen, calib[~in_screen]
    half = calib.shape[0] // 2
    return calib[:half], calib[half:]


def calibration_measures(
    scorer: GatedScorer, calib: torch.Tensor, screen: torch.Tensor, race_margin: float | None
) -> tuple[CachedMeasure, CachedMeasure]:
    """``(measure, screen measure)`` for :func:`lp_fx.tools.planning.search.make_plan` from one scorer.

    With ``race_margin`` (and at least 2 calibration windows) the measure is a
    :class:`~lp_fx.tools.planning.search.RacedMeasure` over :func:`race_parts`: trial sets clearly worse
    on the first part are not run on the rest."""
    if race_margin is None or calib.shape[0] < 2:
        return cached(scorer.on(calib)), cached(scorer.on(screen))
    first, rest = race_parts(calib, screen)
    measure = RacedMeasure(scorer.on(first), scorer.on(rest), first.shape[0] / calib.shape[0], race_margin)
    return measure, (measure.first if first is screen else cached(scorer.on(screen)))
