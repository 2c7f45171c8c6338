"""Plan files and pairing specs (:mod:`lp_fx.pairing`): what the tools and ``options={"plan": ...}`` read."""

from __future__ import annotations

import json

import pytest

from lp_fx import LayerParallel
from lp_fx.pairing import BASELINE, PLAN_VERSION, Pairing, PlanError, load_plan, save_plan


def _plan(path, **fields):
    path.write_text(json.dumps({"pairs": [[1, 2]], "modes": ["block"], "num_layers": 4, **fields}))
    return path


def test_a_plan_file_of_an_unknown_version_is_refused_in_one_line(tmp_path):
    path = _plan(tmp_path / "plan.json", version=PLAN_VERSION + 1)
    with pytest.raises(PlanError, match=rf"version {PLAN_VERSION + 1}; this lp_fx reads version {PLAN_VERSION}") as info:
        load_plan(path)
    assert "\n" not in str(info.value)
    with pytest.raises(PlanError, match="version"):
        LayerParallel(plan=str(path))


def test_a_plan_file_without_a_version_reads_as_version_1_and_save_plan_stamps_it(tmp_path):
    assert load_plan(_plan(tmp_path / "old.json"))["pairs"] == [[1, 2]]
    save_plan({"pairs": [[1, 2]], "num_layers": 4}, tmp_path / "new.json")
    assert json.loads((tmp_path / "new.json").read_text())["version"] == PLAN_VERSION


@pytest.mark.parametrize(
    ("spec", "pairs", "modes"),
    [("baseline", (), None), ("2:6", ((2, 3), (4, 5)), None), ("0-1,4-5", ((0, 1), (4, 5)), None)],
)
def test_a_spec_names_its_pairs(spec, pairs, modes):
    pairing = Pairing.parse(spec, num_layers=8)
    assert (pairing.pairs, pairing.modes) == (pairs, modes)


def test_a_plan_spec_is_checked_against_the_layer_count_and_keeps_its_modes(tmp_path):
    path = _plan(tmp_path / "p.json")
    assert Pairing.parse(str(path), 4) == Pairing("p", ((1, 2),), ("block",))
    with pytest.raises(PlanError, match="made for a model with 4 layers"):
        Pairing.parse(str(path), 6)


def test_to_options_is_what_the_backend_takes_for_the_pairing():
    pairing = Pairing("p", ((0, 1), (2, 3)), ("lp", "block"))
    config = LayerParallel(pairing.to_options(mode="lp", inner="eager")).config
    assert config.pairs == ((0, 1), (2, 3)) and config.mode_of((2, 3)) == "block" and config.inner == "eager"
    assert BASELINE.to_options() == {"pairs": []}
