"""Depth sweep bookkeeping (no model): ranges, default points, shuffle seeds, rows, table, plot."""

from __future__ import annotations

from pathlib import Path

import pytest

from lp_fx.tools.evaluation import sweep
from lp_fx.pairing import Pairing, Shuffle
from lp_fx.tools.evaluation.sweep import Point


def test_default_starts_spread_over_first_half() -> None:
    assert sweep.default_starts(30) == [2, 6, 10, 14]
    assert sweep.default_starts(6) == [2]


def test_ranges_cover_every_even_delta_that_fits() -> None:
    assert sweep.sweep_ranges(10, [2, 6]) == [(2, 2), (2, 4), (2, 6), (2, 8), (6, 2), (6, 4)]
    assert sweep.sweep_ranges(10, [2], deltas=[4]) == [(2, 4)]
    assert sweep.sweep_ranges(10, [2], deltas=[4], step=4) == [(2, 4)]  # given Δ are not thinned


def test_no_fitting_range_is_an_error_that_says_what_fits() -> None:
    with pytest.raises(ValueError, match=r"Δ must be even and at least 2, with start \+ Δ <= 10"):
        sweep.sweep_ranges(10, [2], deltas=[3, 10])


def test_one_pairing_transform_keeps_the_lp_sweep_defaults() -> None:
    starts, step = sweep.default_layout(30, ["lp"])
    assert (starts, step) == ([2, 6, 10, 14], 2)
    assert len(sweep.sweep_ranges(30, starts, step=step)) == 44


def test_several_transforms_default_to_one_middle_start_and_every_second_delta() -> None:
    starts, step = sweep.default_layout(30, sweep.TRANSFORMS)
    ranges = sweep.sweep_ranges(30, starts, step=step)
    assert ranges == [(14, 2), (14, 6), (14, 10), (14, 14)]
    points = sweep.sweep_points(30, sweep.TRANSFORMS, ranges, seeds=3)
    assert len(points) == 4 * 4 + (1 + 3 * 3)  # a shuffle of 2 layers has one other order
    assert sweep.default_layout(30, ["shuffle"]) == ([14], 4)


def test_shuffle_seeds_give_distinct_orders_other_than_the_original() -> None:
    (seed,) = sweep.shuffle_seeds(4, 6, 3)
    assert Shuffle(4, 6, seed).order == (5, 4)
    seeds = sweep.shuffle_seeds(2, 8, 3)
    orders = {Shuffle(2, 8, seed).order for seed in seeds}
    assert len(seeds) == len(orders) == 3 and tuple(range(2, 8)) not in orders


def test_points_give_the_backend_pairs_with_their_mode_or_a_shuffle() -> None:
    prune, *shuffles = sweep.sweep_points(10, ["prune", "shuffle"], [(2, 4)], seeds=2)
    assert prune.pairing().pairs == ((2, 3), (4, 5)) and prune.pairing().modes == ("prune", "prune")
    assert prune.effective_depth(10) == 8
    assert [p.pairing().shuffle for p in shuffles] == [Shuffle(2, 6, p.seed) for p in shuffles]
    assert len(shuffles) == 2 and shuffles[0].effective_depth(10) == 10


def test_transforms_are_checked_against_the_valid_ones() -> None:
    assert sweep.parse_transforms("lp, shuffle,lp") == ("lp", "shuffle")
    with pytest.raises(ValueError, match="'foo'.*valid transforms: lp, block, prune, merge, shuffle"):
        sweep.parse_transforms("lp,foo")


def _fake_sweep(points: list[Point], precisions: tuple[str, ...] = ("fp32",)) -> tuple[dict, list[str]]:
    """A sweep whose 'perplexity' is 10 + pairs (+ 100 + 10 × seed for a shuffle) (+ 1 once int8)."""
    calls: list[str] = []

    def use(precision: str) -> None:
        calls.append(f"use {precision}")

    def fake(pairing: Pairing) -> dict:
        calls.append(pairing.name)
        shuffled = 0 if pairing.shuffle is None else 100 + 10 * pairing.shuffle.seed
        int8 = "use int8" in calls
        return {"wikitext": {"ppl": 10.0 + len(pairing.pairs) + shuffled + int8}}

    return sweep.run_sweep(fake, 10, points, precisions, use, progress=False), calls


def test_run_sweep_rows_carry_transform_range_depth_and_precision() -> None:
    points = sweep.sweep_points(10, ["lp", "merge", "shuffle"], [(2, 4)], seeds=2)
    result, calls = _fake_sweep(points, ("fp32", "int8"))
    assert calls[0] == "use fp32" and calls[1] == "baseline" and calls.index("use int8") == 1 + 1 + len(points)
    assert result["skipped"] == [{"transform": "merge", "quantize": "int8", "why": sweep.UNSUPPORTED["merge", "int8"]}]
    assert result["baselines"] == {"fp32": {"wikitext": {"ppl": 10.0}}, "int8": {"wikitext": {"ppl": 11.0}}}
    rows = [(r["transform"], r["quantize"], r["end"], r["effective_depth"]) for r in result["rows"]]
    assert rows[:2] == [("lp", "fp32", 6, 8), ("merge", "fp32", 6, 8)]
    assert ("merge", "int8", 6, 8) not in rows and ("lp", "int8", 6, 8) in rows
    shuffles = [r for r in result["rows"] if r["transform"] == "shuffle" and r["quantize"] == "fp32"]
    assert [(r["start"], r["end"], r["seed"]) for r in shuffles] == [(2, 6, s) for s in sweep.shuffle_seeds(2, 6, 2)]
    assert all(r["order"] == list(Shuffle(2, 6, r["seed"]).order) for r in shuffles)


def test_table_has_a_column_per_transform_and_the_shuffle_spread() -> None:
    points = [Point("lp", 2, 2), Point("lp", 2, 4), Point("shuffle", 2, 4, 0), Point("shuffle", 2, 4, 1)]
    result, _ = _fake_sweep(points, ("fp32", "int8"))
    lines = sweep.sweep_table(result).splitlines()
    assert lines[0] == "| start | Δ | L − Δ/2 | lp | shuffle | lp int8 | shuffle int8 |"
    assert lines[2] == "| baseline | 0 | 10 | 10 | 10 | 11 | 11 |"
    assert lines[3] == "| 2 | 2 | 9 | 11 | – | 12 | – |"
    assert lines[4] == "| 2 | 4 | 8 | 12 | 115 [110–120] | 13 | 116 [111–121] |"


def test_plot_is_a_png(tmp_path: Path) -> None:
    points = [Point("prune", 2, 2), Point("prune", 2, 4), Point("shuffle", 2, 4, 0), Point("shuffle", 2, 4, 1)]
    result, _ = _fake_sweep(points)
    sweep.plot_sweep(result, tmp_path / "sweep.png", "fake")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
