"""options={"plan": path} takes a planner's JSON: its pairs and per-pair modes; a foreign plan is refused."""

import json

import pytest
import torch

from lp_fx import LayerParallel

from .models import VOCAB, hf_model
from .reference import eager_pairing


def write_plan(tmp_path, num_layers, pairs, modes=None):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"pairs": pairs, "num_layers": num_layers, **({"modes": modes} if modes else {})}))
    return str(path)


def test_plan_file_pairs_and_modes_are_applied(tmp_path):
    model = hf_model("llama")
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(6))
    lp = LayerParallel(plan=write_plan(tmp_path, 4, [[0, 1], [2, 3]], ["block", "lp"]), inner="eager")
    with torch.no_grad():
        got = torch.compile(model, backend=lp)(ids, use_cache=False).logits
        with eager_pairing(model, [(0, 1)], "block"), eager_pairing(model, [(2, 3)], "lp"):
            expected = model(ids, use_cache=False).logits
    assert lp.reports[0].pairs_rewritten == [((0, 1), "block"), ((2, 3), "lp")]
    assert (got - expected).abs().max().item() <= 1e-4


def test_plan_for_another_model_is_refused(tmp_path):
    model = hf_model("llama")  # 4 layers
    lp = LayerParallel(plan=write_plan(tmp_path, 30, [[0, 1]]), inner="eager")
    with pytest.raises(Exception, match="plan was made for a model with 30 layers, but model.layers has 4"):
        torch.compile(model, backend=lp)(torch.zeros(1, 4, dtype=torch.long), use_cache=False)
