"""options={"plan": path} takes a planner's JSON: its pairs and per-pair modes; a foreign plan is refused.
options={"modes": [...]} gives the pairs of 'pairs' their modes the same way."""

import json

import pytest
import torch

from lp_fx import LayerParallel, LayerParallelError
from lp_fx.checkpoint import finetuned_options

from tests.helpers.models import VOCAB, hf_model
from tests.helpers.reference import eager_pairing


def write_plan(tmp_path, num_layers, pairs, modes=None):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"pairs": pairs, "num_layers": num_layers, **({"modes": modes} if modes else {})}))
    return str(path)


def assert_block_then_lp(lp):
    """``lp`` pairs (0, 1) in block mode and (2, 3) in lp mode, as the eager reference does."""
    model = hf_model("llama")
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = torch.compile(model, backend=lp)(ids, use_cache=False).logits
        with eager_pairing(model, [(0, 1)], "block"), eager_pairing(model, [(2, 3)], "lp"):
            expected = model(ids, use_cache=False).logits
    assert lp.reports[0].pairs_rewritten == [((0, 1), "block"), ((2, 3), "lp")]
    assert (got - expected).abs().max().item() <= 1e-4


def test_plan_file_pairs_and_modes_are_applied(tmp_path):
    assert_block_then_lp(LayerParallel(plan=write_plan(tmp_path, 4, [[0, 1], [2, 3]], ["block", "lp"]), inner="eager"))


def test_modes_option_gives_each_pair_its_mode_as_a_plan_does():
    assert_block_then_lp(LayerParallel(pairs=[(2, 3), (0, 1)], modes=["lp", "block"], inner="eager"))


def test_a_checkpoint_with_pairs_in_two_modes_is_served_through_modes():
    pairing = {"model": {"stack": "model.layers"}, "pairs": [[0, 1], [2, 3]], "modes": ["block", "lp"]}
    options = finetuned_options(pairing)
    assert "plan" not in options
    assert_block_then_lp(LayerParallel(options, inner="eager"))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"modes": ["lp"]}, "give 'pairs' with it"),
        ({"start": 0, "end": 2, "modes": ["lp"]}, "give 'pairs' with it"),
        ({"pairs": [(0, 1), (2, 3)], "modes": ["lp"]}, r"one mode per pair \(2 pairs\)"),
        ({"pairs": [(0, 1)], "modes": "lp"}, "one mode per pair"),
        ({"pairs": [(0, 1)], "modes": ["sum"]}, r"mode of pair \(0, 1\)='sum' is not valid; choose one of 'lp'"),
    ],
)
def test_modes_option_without_one_mode_per_pair_is_refused(options, message):
    with pytest.raises(LayerParallelError, match=message):
        LayerParallel(options)


def test_plan_for_another_model_is_refused(tmp_path):
    model = hf_model("llama")  # 4 layers
    lp = LayerParallel(plan=write_plan(tmp_path, 30, [[0, 1]]), inner="eager")
    with pytest.raises(Exception, match="plan was made for a model with 30 layers, but model.layers has 4"):
        torch.compile(model, backend=lp)(torch.zeros(1, 4, dtype=torch.long), use_cache=False)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"modes": 5}, r"'modes' must be a list of one mode per pair \(1 pairs\), each one of 'lp', 'block'.*; got 5"),
        ({"modes": "block"}, "'modes' must be a list of one mode per pair"),
        ({"mode": "block"}, r"unknown key\(s\) 'mode'; a plan's keys are version, model, num_layers, pairs, modes, "),
        ({"num_layers": True}, "missing 'num_layers'"),
    ],
    ids=["modes-int", "modes-str", "unknown-key", "num-layers-bool"],
)
def test_a_malformed_plan_file_is_refused_naming_what_is_valid(tmp_path, extra, message):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"pairs": [[0, 1]], "num_layers": 4, **extra}))
    with pytest.raises(LayerParallelError, match=message):
        LayerParallel(plan=str(path))
