"""Placement on 2 CPU ranks (gloo, loopback): spawned once, every check read from its results.

Compares, on each rank, the placed graph with the single-device backend on the same pairing:
HF Llama with GQA and a hand-written model, lp and block, tp on and off, TP only, greedy
generation with a static cache, gradients; plus the collective counts and the bad-input messages.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import dist_workers
from lp_fx.backend import LayerParallel
from lp_fx.config import LayerParallelError

# Gloo ranks need every core: these run in a pytest call of their own (`pytest -n 0 -m distributed`);
# the first test of a module also spawns the module's ranks, hence the longer limit.
pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]

WORLD = 2
TOL = 1e-4
LLAMA_LAYERS, GPT_LAYERS = dist_workers.LLAMA_LAYERS, 4


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return dist_workers.spawn_ranks(dist_workers.two_rank_cases, WORLD, tmp_path_factory.mktemp("ranks"))


def _expected_collectives(layers: int, mode: str, tp: bool, pairs: int = 1) -> int:
    per_pair = 2 if mode == "lp" else 1
    return pairs * per_pair + (2 * (layers - 2 * pairs) if tp else 0)


CASES = [("llama", LLAMA_LAYERS, mode, tp) for mode in ("lp", "block") for tp in (False, True)]
CASES += [("gpt", GPT_LAYERS, mode, tp) for mode, tp in dist_workers.GPT_CASES]


@pytest.mark.parametrize("model,layers,mode,tp", CASES)
def test_placed_logits_equal_single_device(ranks, model, layers, mode, tp):
    for rank, res in enumerate(ranks):
        case = res[f"{model}_{mode}_tp{tp}"]
        assert case["rank"] == rank
        assert case["diff"] <= TOL
        assert case["collectives"] == _expected_collectives(layers, mode, tp)
        assert case["param_bytes"] < case["full_bytes"]


def test_placed_graph_through_inductor_equals_single_device(ranks):
    """DTensor placement (TP + an LP pair) lowered by Inductor, against the single-device eager pairing."""
    for rank, res in enumerate(ranks):
        case = res["llama_lp_tpTrue_inductor"]
        assert case["rank"] == rank and case["diff"] <= TOL
        assert case["collectives"] == _expected_collectives(LLAMA_LAYERS, "lp", True)


@pytest.mark.parametrize("model,layers", [("llama", LLAMA_LAYERS), ("gpt", GPT_LAYERS)])
def test_tensor_parallel_only_equals_unpaired_model(ranks, model, layers):
    for res in ranks:
        case = res[f"{model}_tp_only"]
        assert case["diff"] <= TOL
        assert case["collectives"] == 2 * layers
        # Every layer's linears are split in two; embedding, norms and head stay whole.
        assert case["param_bytes"] < 0.6 * case["full_bytes"]


def test_lp_ranks_hold_different_branches(ranks):
    """With tp=False each rank holds one layer of the pair, not both."""
    bytes_ = [res["llama_lp_tpFalse"]["param_bytes"] for res in ranks]
    full = ranks[0]["llama_lp_tpFalse"]["full_bytes"]
    assert all(b < full for b in bytes_)


def test_greedy_generation_with_static_cache(ranks):
    for res in ranks:
        case = res["generate"]
        assert case["placed"] == case["single"]
        # prefill and decode graphs: 1 LP pair (2 all-reduces) + 2 TP layers (2 each)
        assert case["collectives"] == [6, 6]


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_free_weights_keeps_only_the_weights_a_rank_computes_with(ranks, weights):
    """fp32, and torchao int8 weight-only (tensor-subclass weights: int8 data and scales released alike)."""
    for res in ranks:
        case = res["free_weights" if weights == "fp32" else "free_weights_int8"]
        assert case["placed"] == case["single"]
        # What stays in memory is exactly what the rank's graphs read: about half of the model.
        assert case["resident"] == case["param_bytes"][0] == case["param_bytes"][1]
        assert case["resident"] < 0.6 * case["full_bytes"]
        assert case["released"][0] > 0 and case["released"][1] == 0  # the decode graph finds them released
        assert "free_weights=True is for inference" in case["grad_error"]


def test_free_weights_gives_each_model_of_one_class_its_own_slices(ranks):
    """Dynamo reuses the first model's graph for the second: the slices passed are made from the
    parameters of the model called, and the second model's unread weights are released too."""
    for res in ranks:
        case = res["free_weights_two_models"]
        assert max(case["diffs"]) <= TOL, case["diffs"]
        assert all(r < 0.6 * case["full_bytes"] for r in case["resident"]), case


@pytest.mark.parametrize("tp", [True, False])
def test_gradients_equal_single_device(ranks, tp):
    for res in ranks:
        assert res[f"grad_{'tp' if tp else 'lp'}"] <= TOL


def test_mesh_of_one_device_falls_back(ranks):
    for res in ranks:
        case = res["mesh_of_one"]
        assert case["diff"] <= TOL and case["collectives"] is None


def test_mesh_larger_than_kv_heads_is_refused(ranks):
    for res in ranks:
        assert "cannot split layer" in res["kv_heads_error"] and "1 key/value heads" in res["kv_heads_error"]


def test_auto_mesh_needs_a_process_group():
    model = dist_workers.tiny_llama(layers=2)
    backend = LayerParallel(mesh="auto", inner="eager")
    with pytest.raises(Exception, match="needs an initialised default process group"):
        torch.compile(model, backend=backend)(dist_workers.PROMPT, use_cache=False)


def test_mesh_must_be_a_device_mesh():
    model = dist_workers.tiny_llama(layers=2)
    with pytest.raises(Exception, match="mesh must be a 1-D"):
        torch.compile(model, backend=LayerParallel(mesh=2, inner="eager"))(dist_workers.PROMPT, use_cache=False)


def test_config_rejects_nothing_new():
    """mesh/tp are plain options of the existing config."""
    assert LayerParallel(mesh="auto", tp=False).config.tp is False
    with pytest.raises(LayerParallelError):
        LayerParallel(tp="no")


def test_free_weights_needs_a_mesh():
    with pytest.raises(LayerParallelError, match="free_weights=True needs a mesh"):
        LayerParallel(free_weights=True)
