"""Δ sweep bookkeeping (no model): start positions, ranges that fit, effective depth."""

from __future__ import annotations

from lp_fx.tools import sweep
from lp_fx.tools.evaluate import Pairing


def test_default_starts_spread_over_first_half() -> None:
    assert sweep.default_starts(30) == [2, 6, 10, 14]
    assert sweep.default_starts(6) == [2]


def test_points_cover_every_even_delta_that_fits() -> None:
    points = sweep.sweep_points(10, [2, 6])
    assert points == [(2, 2), (2, 4), (2, 6), (2, 8), (6, 2), (6, 4)]
    assert sweep.sweep_points(10, [2], deltas=[4]) == [(2, 4)]


def test_run_sweep_rows() -> None:
    seen: list[Pairing] = []

    def fake(pairing: Pairing) -> dict:
        seen.append(pairing)
        return {"wikitext": {"ppl": 10.0 + len(pairing.pairs)}}

    result = sweep.run_sweep(fake, 10, [(2, 4)], progress=False)
    assert seen[0].pairs == ((2, 3), (4, 5)) and seen[-1].pairs == ()
    row = result["rows"][0]
    assert (row["end"], row["effective_depth"], row["results"]["wikitext"]["ppl"]) == (6, 8, 12.0)
