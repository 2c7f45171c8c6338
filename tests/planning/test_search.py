"""Planner: greedy choice with measured combined cost, plan files, refusal of foreign plans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lp_fx import GatedLayerParallel
from lp_fx.config import config_from_options
from lp_fx.pairing import Pairing, PlanError, check_plan, load_plan, save_plan
from lp_fx.gates import OFF
from lp_fx.tools.evaluation import scoring as evaluate
from lp_fx.tools.evaluation.compiled import eager_logits
from lp_fx.tools.planning import scorers as plan_scorers
from lp_fx.tools.planning import search as planner
from lp_fx.tools.planning.lazy_gates import LazyGatedGraph
from tests.helpers.models import VOCAB, hf_model, tiny_hand_written

BASE_PPL = 10.0
REPO = Path(__file__).resolve().parent.parent


def additive(single: dict, clash: dict) -> planner.Measure:
    """Perplexity ``BASE_PPL * (1 + cost)``: the single costs of the chosen ``(start, mode)``s, plus
    an extra cost for each clashing group among them (the interactions only measuring reveals)."""

    def measure(pairing: Pairing) -> float:
        chosen = {(a, mode) for (a, _), mode in zip(pairing.pairs, pairing.modes or ("lp",) * pairing.num_pairs)}
        cost = sum(single[c] for c in chosen) + sum(extra for group, extra in clash.items() if group <= chosen)
        return BASE_PPL * (1 + cost)

    return measure


# Single-pair costs for a 10-layer model; pairs starting at 3 and 5 look cheapest alone but
# interact badly together.
SINGLE = {0: 5.0, 1: 2.0, 2: 0.9, 3: 0.1, 4: 0.3, 5: 0.1, 6: 0.4, 7: 0.6, 8: 3.0}
fake_measure = additive({(a, "lp"): cost for a, cost in SINGLE.items()}, {frozenset({(3, "lp"), (5, "lp")}): 2.0})


def test_select_checks_combined_cost_and_avoids_clash() -> None:
    measure = planner.cached(fake_measure)
    candidates = planner.score_singles(measure, 10, progress=False)
    assert [c.pair for c in candidates] == [(i, i + 1) for i in range(9)]
    selection = planner.select(measure, candidates, BASE_PPL, planner.Objective(num_pairs=2), progress=False)
    # (3,4) first; then (5,6) is cheapest alone but clashes: measured, (6,7) wins.
    assert [c.pair for c in selection.chosen] == [(3, 4), (6, 7)]
    assert selection.ppl == pytest.approx(fake_measure(selection.pairing()))
    naive = Pairing("naive", ((3, 4), (5, 6)))
    assert selection.ppl < fake_measure(naive)


def test_select_pairs_are_disjoint() -> None:
    measure = planner.cached(fake_measure)
    candidates = planner.score_singles(measure, 10, progress=False)
    selection = planner.select(measure, candidates, BASE_PPL, planner.Objective(num_pairs=4, refine=2), progress=False)
    layers = [layer for c in selection.chosen for layer in c.pair]
    assert len(layers) == len(set(layers)) == 8


def test_select_stops_at_budget() -> None:
    measure = planner.cached(fake_measure)
    candidates = planner.score_singles(measure, 10, progress=False)
    selection = planner.select(measure, candidates, BASE_PPL, planner.Objective(max_ppl_ratio=1.5), progress=False)
    assert selection.ppl <= 1.5 * BASE_PPL
    assert [c.pair for c in selection.chosen] == [(3, 4), (6, 7)]  # a third would cost >= 2


def test_too_many_pairs_is_an_error() -> None:
    measure = planner.cached(fake_measure)
    candidates = planner.score_singles(measure, 10, progress=False)
    with pytest.raises(ValueError, match="disjoint pairs"):
        planner.select(measure, candidates, BASE_PPL, planner.Objective(num_pairs=6), progress=False)


def test_measure_is_cached_per_pair_set() -> None:
    calls = []
    measure = planner.cached(lambda p: calls.append(p) or 1.0)
    measure(Pairing("a", ((1, 2),)))
    measure(Pairing("b", ((1, 2),), ("lp",)))
    assert len(calls) == 1


def test_single_pairs_are_ranked_by_the_screen_and_sets_decided_by_the_measure() -> None:
    """The screen (fewer windows) scores only the single pairs; every set is measured in full."""
    screened, measured = [], []
    screen = lambda pairing: screened.append(pairing.pairs) or fake_measure(pairing)  # noqa: E731
    measure = lambda pairing: measured.append(pairing.pairs) or fake_measure(pairing)  # noqa: E731
    plan = planner.make_plan(measure, 10, "fake", num_pairs=3, modes=("lp",), screen=screen, progress=False)
    assert sorted(screened) == [((i, i + 1),) for i in range(9)]
    assert all(len(pairs) != 1 or pairs in {((3, 4),), ((5, 6),), ((4, 5),)} for pairs in measured if pairs)
    assert len(plan["pairs"]) == 3
    assert plan["search"]["pairings_scored"] == len(screened) + len(measured)


def parts(measure: planner.Measure, first_scale: dict | None = None) -> tuple[list, list, planner.Measure, planner.Measure]:
    """``measure`` as two window parts that record what they score; the first part's perplexity is
    scaled per pairing by ``first_scale`` (what the first windows alone may say), the rest's set so
    that the whole is ``measure``'s."""
    first_calls, rest_calls, scale = [], [], first_scale or {}

    def first(pairing: Pairing) -> float:
        first_calls.append(pairing.pairs)
        return measure(pairing) * scale.get(pairing.pairs, 1.0)

    def rest(pairing: Pairing) -> float:
        rest_calls.append(pairing.pairs)
        return measure(pairing) / scale.get(pairing.pairs, 1.0)

    return first_calls, rest_calls, first, rest


def test_a_race_drops_trials_clearly_worse_on_the_first_windows_and_keeps_the_plan() -> None:
    """Growing from nothing, the options are (3,4) and (5,6) at ppl 11 and (4,5) at 13: (4,5) is
    18 % above the best on the first part and never runs on the rest; the chosen sets are those of
    the unraced search, with the same perplexities."""
    first_calls, rest_calls, first, rest = parts(fake_measure)
    raced = planner.RacedMeasure(first, rest, share=0.5, margin=0.02)
    candidates = planner.score_singles(raced.first, 10, progress=False)
    selection = planner.select(raced, candidates, BASE_PPL, planner.Objective(num_pairs=2), progress=False)
    plain = planner.select(planner.cached(fake_measure), candidates, BASE_PPL, planner.Objective(num_pairs=2), progress=False)
    assert [c.pair for c in selection.chosen] == [c.pair for c in plain.chosen] == [(3, 4), (6, 7)]
    assert selection.ppl == pytest.approx(plain.ppl, rel=1e-12)
    first_step = {tuple(t["pair"]): t["ppl"] for t in selection.steps[0]["tried"]}
    assert first_step[(4, 5)] is None and first_step[(3, 4)] == pytest.approx(11.0)
    assert ((4, 5),) not in rest_calls and len(rest_calls) < len(set(first_calls))


def test_a_swap_race_is_run_against_the_set_it_must_beat() -> None:
    """Every alternative is > 2 % worse than the chosen set on the first windows (though one is
    better on all of them): none runs on the rest, and nothing is swapped — the margin is what
    such a miss costs, which the plan records."""
    pairings = {((3, 4), (6, 7)), ((1, 2), (6, 7)), ((4, 5), (6, 7)), ((5, 6), (3, 4)), ((3, 4), (5, 6))}
    scale = {pairs: 1.5 for pairs in pairings if pairs != ((3, 4), (6, 7))}
    first_calls, rest_calls, first, rest = parts(fake_measure, scale)
    raced = planner.RacedMeasure(first, rest, share=0.5, margin=0.02)
    candidates = planner.score_singles(planner.cached(fake_measure), 10, progress=False)
    chosen = [c for c in candidates if c.pair in ((3, 4), (6, 7))]
    current = planner.Selection(chosen, raced(planner.Selection(chosen).pairing()))
    rest_before = len(rest_calls)
    after = planner.improve(raced, candidates, current, refine=2, progress=False)
    assert [c.pair for c in after.chosen] == [c.pair for c in current.chosen] and after.ppl == current.ppl
    assert len(rest_calls) == rest_before
    assert all(t["ppl"] is None for step in after.steps for t in step["tried"])


def test_raced_measure_refuses_a_bad_share_or_margin() -> None:
    with pytest.raises(ValueError, match="share"):
        planner.RacedMeasure(fake_measure, fake_measure, share=1.0, margin=0.02)
    with pytest.raises(ValueError, match="margin"):
        planner.RacedMeasure(fake_measure, fake_measure, share=0.5, margin=-0.1)


def test_plan_round_trip_and_foreign_plan_refused(tmp_path: Path) -> None:
    plan = planner.make_plan(fake_measure, 10, "fake", num_pairs=3, modes=("lp",), progress=False)
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    loaded = load_plan(path)
    assert loaded["num_layers"] == 10 and len(loaded["pairs"]) == 3
    check_plan(loaded, 10, path)
    with pytest.raises(PlanError, match="10 layers.*this model has 30"):
        check_plan(loaded, 30, path)
    pairing = Pairing.from_plan(loaded, "p")
    assert [list(p) for p in pairing.pairs] == loaded["pairs"]


COMMITTED_PLANS = sorted((REPO / "docs" / "results").glob("plan_*.json")) + sorted(
    (REPO / "docs" / "results").glob("*_plans/*.json"))


@pytest.mark.parametrize("path", COMMITTED_PLANS, ids=lambda path: path.name)
def test_every_committed_plan_still_loads_with_its_pairs_and_modes(path: Path) -> None:
    """The plans ``lp-fx plan`` and ``lp-fx frontier`` wrote (the first version had no 'search')."""
    plan = load_plan(path)
    config = config_from_options(plan=str(path))
    assert config.plan_num_layers == plan["num_layers"] and plan["modes"]
    assert config.modes == {tuple(pair): mode for pair, mode in zip(plan["pairs"], plan["modes"])}


def test_bad_plan_files(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="not found"):
        load_plan(tmp_path / "missing.json")
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"pairs": [[1, 2]]}))
    with pytest.raises(PlanError, match="num_layers"):
        load_plan(path)


def test_swapping_leaves_the_greedy_trap():
    """(2,3) is cheapest alone but clashes with both next-cheapest pairs; growing keeps it, a swap
    round replaces it and the two others go together."""
    single = {(a, "lp"): cost for a, cost in {0: 5, 1: 3, 2: 0.1, 3: 2, 4: 0.2, 5: 2, 6: 0.2, 7: 2, 8: 5}.items()}
    clash = {frozenset({(2, "lp"), (4, "lp")}): 1.0, frozenset({(2, "lp"), (6, "lp")}): 1.0}
    measure = planner.cached(additive(single, clash))
    candidates = planner.score_singles(measure, 10, progress=False)
    grown = planner.select(measure, candidates, BASE_PPL, planner.Objective(num_pairs=2, refine=2), progress=False)
    assert [c.pair for c in grown.chosen] == [(2, 3), (4, 5)]
    best = planner.search(measure, candidates, BASE_PPL, planner.Objective(num_pairs=2, refine=2, passes=2), progress=False)
    assert sorted(c.pair for c in best.chosen) == [(4, 5), (6, 7)]
    assert best.ppl == pytest.approx(BASE_PPL * 1.4) and best.ppl < grown.ppl
    assert [s["step"] for s in best.steps].count("swap") >= 2


def test_swapping_tries_a_pair_in_its_other_mode():
    """(2,3) in lp clashes with (5,6) in lp; in block it does not. Refine=1 shortlists only (0,1),
    which clashes too: the mode flip is tried anyway, and wins."""
    single = {(0, "lp"): 0.2, (0, "block"): 3.0, (2, "lp"): 0.1, (2, "block"): 0.5, (5, "lp"): 0.1, (5, "block"): 3.0}
    clash = {frozenset({(2, "lp"), (5, "lp")}): 1.0, frozenset({(0, "lp"), (5, "lp")}): 2.0}
    measure = planner.cached(additive(single, clash))
    candidates = [
        planner.Candidate((a, a + 1), mode, measure(Pairing("one", ((a, a + 1),), (mode,)))) for a, mode in single
    ]
    start = [c for c in candidates if c.mode == "lp" and c.pair != (0, 1)]
    selection = planner.Selection(start, measure(planner.Selection(start).pairing()))
    better = planner.improve(measure, candidates, selection, refine=1, progress=False)
    assert sorted((c.pair, c.mode) for c in better.chosen) == [((2, 3), "block"), ((5, 6), "lp")]
    assert better.ppl == pytest.approx(BASE_PPL * 1.6)


def test_budget_set_grows_again_after_a_swap():
    """With a budget and no pair count: growing takes (2,3), then (4,5), which clash a little, and
    stops; swapping (2,3) for (6,7) lowers the perplexity, which leaves room for (8,9)."""
    single = {(a, "lp"): cost for a, cost in {0: 5, 1: 3, 2: 0.1, 3: 2, 4: 0.2, 5: 2, 6: 0.2, 7: 2, 8: 0.25}.items()}
    clash = {frozenset({(2, "lp"), (4, "lp")}): 0.15, frozenset({(2, "lp"), (6, "lp")}): 1.0,
             frozenset({(2, "lp"), (8, "lp")}): 1.0}
    measure = planner.cached(additive(single, clash))
    candidates = planner.score_singles(measure, 10, progress=False)
    grown = planner.select(measure, candidates, BASE_PPL, planner.Objective(max_ppl_ratio=1.7, refine=2), progress=False)
    assert [c.pair for c in grown.chosen] == [(2, 3), (4, 5)]
    best = planner.search(measure, candidates, BASE_PPL, planner.Objective(max_ppl_ratio=1.7, refine=2, passes=2), progress=False)
    assert sorted(c.pair for c in best.chosen) == [(4, 5), (6, 7), (8, 9)]
    assert best.ppl == pytest.approx(BASE_PPL * 1.65)


def test_plain_disagreement_names_both_numbers():
    plan = {"calibration": {"plan_ppl": 30.0, "plan_ppl_plain": 30.0 * (1 + 1e-4)}}
    assert planner.plain_disagreement(plan) is None
    plan["calibration"]["plan_ppl_plain"] = 30.6
    assert "30.0000" in planner.plain_disagreement(plan) and "30.6000" in planner.plain_disagreement(plan)


def test_plan_on_tiny_model_scores_every_pairing_with_one_compile():
    """The real path: each pairing is scored by setting the gates of one compiled graph; the plan's
    score equals the plain compile of the chosen pairing, and single scores equal theirs."""
    model = hf_model("llama", layers=6)
    torch.manual_seed(0)
    windows = evaluate.make_windows(torch.randint(0, VOCAB, (4 * 32,)), 32)
    scorer = plan_scorers.GatedScorer(model, windows, ("lp", "block"), "eager")
    plain = plan_scorers.compiled_scorer(model, windows, "eager")
    plan = planner.make_plan(
        scorer, 6, "tiny", num_pairs=2, modes=("lp", "block"), refine=2, passes=1, verify=plain, progress=False
    )
    assert scorer.compiles == 1 and plan["search"]["pairings_scored"] > len(plan["candidates"]) == 10
    layers = [layer for pair in plan["pairs"] for layer in pair]
    assert len(plan["pairs"]) == 2 and len(set(layers)) == 4 and all(b == a + 1 for a, b in plan["pairs"])
    calib = plan["calibration"]
    assert calib["plan_ppl"] == pytest.approx(calib["plan_ppl_plain"], rel=1e-5)
    assert planner.plain_disagreement(plan) is None
    base = evaluate.perplexity(eager_logits(model), windows, progress=False).ppl
    assert calib["baseline_ppl"] == pytest.approx(base, rel=1e-6)
    for single in sorted(plan["candidates"], key=lambda c: c["ppl"])[::9]:  # the cheapest and the dearest
        pairing = Pairing("single", (tuple(single["pair"]),), (single["mode"],))
        assert single["ppl"] == pytest.approx(plain(pairing), rel=1e-5)
    assert calib["plan_ppl"] != pytest.approx(base, rel=1e-3)  # the plan changed the model


# ------------------------------------------------------------------ the lazily run gated graph


class BothWays:
    """An inner compiler that runs the gated graph lazily and whole on every call, recording
    whether the outputs are equal bit for bit."""

    def __init__(self) -> None:
        self.lazy: LazyGatedGraph | None = None
        self.equal: list[bool] = []

    def __call__(self, gm, example_inputs):
        self.lazy = LazyGatedGraph(gm)

        def run(*args):
            got, expected = self.lazy(*args), gm.forward(*args)
            self.equal.append(all(torch.equal(a, b) for a, b in zip(got, expected)))
            return got

        return run


SETTINGS = [  # later pairings share layers, and kept values, with earlier ones
    ((), ()), (((2, 3),), ("lp",)), (((0, 1), (2, 3)), ("block", "lp")), (((2, 3),), ("block",)),
    (((0, 1),), ("lp",)), (((0, 1), (2, 3)), ("lp", "lp")), (((1, 2),), ("block",)), ((), ()),
]


@pytest.mark.parametrize("arch", ["llama", "nanogpt"])
def test_lazy_run_equals_the_whole_gated_graph(arch):
    model = hf_model("llama", layers=4) if arch == "llama" else tiny_hand_written("nanogpt")
    inner = BothWays()
    backend = GatedLayerParallel(4, ("lp", "block"), inner)
    compiled = torch.compile(model, backend=backend)
    windows = torch.randint(0, VOCAB, (2, 1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for pairs, modes in SETTINGS:
            backend.set_pairing(pairs, modes)
            for ids in windows:
                compiled(ids, use_cache=False) if arch == "llama" else compiled(ids)
            inner.lazy.retain([(OFF,) * 3, tuple(backend.gates.tolist())])
    assert len(inner.equal) == len(SETTINGS) * len(windows) and all(inner.equal)
    assert 0 < inner.lazy.share_run() < 1
    with pytest.raises(ValueError, match="no_grad"):
        compiled(windows[0], use_cache=False) if arch == "llama" else compiled(windows[0])


def test_a_graph_that_writes_in_place_is_refused():
    graph = torch.fx.Graph()
    x, gates = graph.placeholder("x"), graph.placeholder("gates")
    graph.output(graph.call_method("add_", (x, gates)))
    with pytest.raises(ValueError, match="in place"):
        LazyGatedGraph(torch.fx.GraphModule(torch.nn.Module(), graph))


def scorer_and_windows(layers: int = 6, inner="eager"):
    model = hf_model("llama", layers=layers)
    windows = evaluate.make_windows(torch.randint(0, VOCAB, (4 * 32,), generator=torch.Generator().manual_seed(0)), 32)
    return plan_scorers.GatedScorer(model, windows, ("lp", "block"), inner), windows


def test_a_pairing_runs_the_graph_from_its_first_pair_on():
    """After the unpaired model, a pair late in the stack runs fewer nodes than one early in it."""
    scorer, _ = scorer_and_windows()
    scorer(Pairing("baseline"))
    graph = scorer.graphs[0]
    runs = []
    for pair in [(4, 5), (0, 1)]:
        before = graph.computed
        scorer(Pairing("single", (pair,), ("lp",)))
        runs.append(graph.computed - before)
    assert 0 < runs[0] < runs[1]


def test_only_the_values_the_search_goes_on_from_are_kept():
    """Kept: the unpaired model's and the best set of each of the two largest sizes scored."""
    scorer, _ = scorer_and_windows()
    scorer(Pairing("baseline"))
    singles = {(a, mode): scorer(Pairing("one", ((a, a + 1),), (mode,))) for a in range(5) for mode in ("lp", "block")}
    twos = {(a, mode): scorer(Pairing("two", ((0, 1), (a, a + 1)), ("lp", mode))) for a in (2, 3) for mode in ("lp",)}
    best_one = min(singles, key=singles.get)
    best_two = min(twos, key=twos.get)
    gates = [OFF] * 5, [OFF] * 5, [OFF] * 5
    gates[1][best_one[0]] = 1 if best_one[1] == "lp" else 2
    gates[2][0], gates[2][best_two[0]] = 1, 1
    graph = scorer.graphs[0]
    kept = {(entry[1], entry[2]) for entry in graph.known}
    allowed = {(node, graph._gate_key(node, tuple(g))) for node in graph.kept_nodes for g in gates}
    assert kept and kept <= allowed
    assert any(key == graph._gate_key(node, tuple(gates[2])) and key != graph._gate_key(node, tuple(gates[0]))
               for node, key in kept)


def test_calibration_in_two_parts_scores_what_all_the_windows_score():
    """The screen's windows are the first part (its single scores are the first part's), the rest
    the others; a pairing's raced score equals its score on all the windows."""
    scorer, windows = scorer_and_windows()
    screen = windows[[0, 3]]
    first, rest = plan_scorers.race_parts(windows, screen)
    assert first is screen and torch.equal(rest, windows[[1, 2]])
    halves = plan_scorers.race_parts(windows, windows[:0] + 1)  # not calibration windows: halves
    assert torch.equal(halves[0], windows[:2]) and torch.equal(halves[1], windows[2:])
    measure, screen_measure = plan_scorers.calibration_measures(scorer, windows, screen, race_margin=0.02)
    assert isinstance(measure, planner.RacedMeasure) and screen_measure is measure.first
    pairing = Pairing("two", ((0, 1), (3, 4)), ("lp", "block"))
    assert measure(pairing) == pytest.approx(scorer(pairing), rel=1e-12)
    unraced, _ = plan_scorers.calibration_measures(scorer, windows, screen, race_margin=None)
    assert not isinstance(unraced, planner.RacedMeasure) and unraced(pairing) == scorer(pairing)


def test_lazy_planner_makes_the_plan_of_the_whole_gated_graph():
    """The same plan, every trial's perplexity equal, from the lazy run as from the whole graph
    (the straightforward reference), with fewer nodes run."""
    plans = []
    for inner in ("eager", lambda gm, example_inputs: gm.forward):
        scorer, windows = scorer_and_windows(layers=8, inner=inner)
        plan = planner.make_plan(scorer, 8, "tiny", num_pairs=3, modes=("lp", "block"), refine=2, passes=2,
                                 screen=scorer.on(windows[:2]), progress=False)
        plans.append((plan, scorer.share_run()))
    (lazy, share), (whole, no_share) = plans
    for key in ("pairs", "modes", "calibration", "candidates", "steps"):
        assert lazy[key] == whole[key], key
    assert len(lazy["steps"]) >= 3 + 3  # grown, then swaps tried
    assert no_share is None and 0 < share < 1
