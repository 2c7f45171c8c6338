"""Planner: greedy choice with measured combined cost, plan files, refusal of foreign plans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lp_fx.config import PlanError, check_plan, load_plan
from lp_fx.tools import evaluate, planner
from lp_fx.tools.evaluate import Pairing
from .models import VOCAB, hf_model

# Single-pair costs (as log-ppl increments) for a 10-layer model; pairs starting at 3 and 5 look
# cheapest alone but interact badly together, which only a measured combination reveals.
SINGLE = {0: 5.0, 1: 2.0, 2: 0.9, 3: 0.1, 4: 0.3, 5: 0.1, 6: 0.4, 7: 0.6, 8: 3.0}
CLASH = {frozenset({3, 5}): 2.0}
BASE_PPL = 10.0


def fake_measure(pairing: Pairing) -> float:
    starts = {a for a, _ in pairing.pairs}
    cost = sum(SINGLE[a] for a in starts)
    cost += sum(extra for clash, extra in CLASH.items() if clash <= starts)
    return BASE_PPL * (1 + cost)


def test_select_checks_combined_cost_and_avoids_clash() -> None:
    measure = planner.cached(fake_measure)
    candidates = planner.score_singles(measure, 10, progress=False)
    assert [c.pair for c in candidates] == [(i, i + 1) for i in range(9)]
    selection = planner.select(measure, candidates, BASE_PPL, num_pairs=2, progress=False)
    # (3,4) first; then (5,6) is cheapest alone but clashes: measured, (6,7) wins.
    assert [c.pair for c in selection.chosen] == [(3, 4), (6, 7)]
    assert selection.ppl == pytest.approx(fake_measure(selection.pairing()))
    naive = Pairing("naive", ((3, 4), (5, 6)))
    assert selection.ppl < fake_measure(naive)


def test_select_pairs_are_disjoint() -> None:
    measure = planner.cached(fake_measure)
    candidates = planner.score_singles(measure, 10, progress=False)
    selection = planner.select(measure, candidates, BASE_PPL, num_pairs=4, refine=2, progress=False)
    layers = [layer for c in selection.chosen for layer in c.pair]
    assert len(layers) == len(set(layers)) == 8


def test_select_stops_at_budget() -> None:
    measure = planner.cached(fake_measure)
    candidates = planner.score_singles(measure, 10, progress=False)
    selection = planner.select(measure, candidates, BASE_PPL, max_ppl_ratio=1.5, progress=False)
    assert selection.ppl <= 1.5 * BASE_PPL
    assert [c.pair for c in selection.chosen] == [(3, 4), (6, 7)]  # a third would cost >= 2


def test_too_many_pairs_is_an_error() -> None:
    measure = planner.cached(fake_measure)
    candidates = planner.score_singles(measure, 10, progress=False)
    with pytest.raises(ValueError, match="disjoint pairs"):
        planner.select(measure, candidates, BASE_PPL, num_pairs=6, progress=False)


def test_measure_is_cached_per_pair_set() -> None:
    calls = []
    measure = planner.cached(lambda p: calls.append(p) or 1.0)
    measure(Pairing("a", ((1, 2),)))
    measure(Pairing("b", ((1, 2),), ("lp",)))
    assert len(calls) == 1


def test_plan_round_trip_and_foreign_plan_refused(tmp_path: Path) -> None:
    plan = planner.make_plan(fake_measure, 10, "fake", num_pairs=3, progress=False)
    path = tmp_path / "plan.json"
    planner.save_plan(plan, path)
    loaded = load_plan(path)
    assert loaded["num_layers"] == 10 and len(loaded["pairs"]) == 3
    check_plan(loaded, 10, path)
    with pytest.raises(PlanError, match="10 layers.*this model has 30"):
        check_plan(loaded, 30, path)
    pairing = planner.plan_pairing(loaded, "p")
    assert [list(p) for p in pairing.pairs] == loaded["pairs"]


def test_bad_plan_files(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="not found"):
        load_plan(tmp_path / "missing.json")
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"pairs": [[1, 2]]}))
    with pytest.raises(PlanError, match="num_layers"):
        load_plan(path)


def test_plan_on_tiny_model_through_backend(tmp_path: Path) -> None:
    """The real path: every measurement compiles the tiny model with the layer_parallel backend."""
    model = hf_model("llama", layers=4)
    torch.manual_seed(0)
    windows = evaluate.make_windows(torch.randint(0, VOCAB, (4 * 32,)), 32)

    def measure(pairing: Pairing) -> float:
        logits = evaluate.compile_pairing(model, pairing, inner="eager")
        return evaluate.perplexity(logits, windows, progress=False).ppl

    plan = planner.make_plan(
        measure, 4, "tiny", num_pairs=2, modes=("lp", "block"), refine=2, progress=False
    )
    assert plan["pairs"] == [[0, 1], [2, 3]] and len(plan["candidates"]) == 6
    base = evaluate.perplexity(evaluate.eager_logits(model), windows, progress=False).ppl
    assert plan["calibration"]["baseline_ppl"] == pytest.approx(base, rel=1e-5)
    pairing = planner.plan_pairing(plan, "plan")
    again = measure(pairing)
    assert again == pytest.approx(plan["calibration"]["plan_ppl"], rel=1e-5)
