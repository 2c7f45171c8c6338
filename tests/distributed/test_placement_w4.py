"""Placement on W = 4 CPU ranks (gloo, loopback): ranks 0-1 run branch A of each pair, ranks 2-3
branch B, each branch tensor-parallel over its 2 ranks. Spawned once, every check read from its results.

HF Llama with 8 query / 4 KV heads (TP over 4 ranks and over 2 both split whole KV groups).
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.device_mesh import DeviceMesh

from tests.helpers import dist_workers
from lp_fx.backend import LayerParallel
from lp_fx.config import LayerParallelError
from lp_fx.placement import ranks_per_branch

# Gloo ranks need every core: these run in a pytest call of their own (`pytest -n 0 -m distributed`);
# the first test of a module also spawns the module's ranks, hence the longer limit.
pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]

WORLD = 4
TOL = 1e-4
LAYERS = 4
PAIR = [(1, 2)]
# Per pair of Llama layers at W = 2k: lp fuses both sums into whole-mesh all-reduces (2);
# block needs the attention output whole inside the branch (1) plus one fused sum (1).
PAIR_COLLECTIVES = {"lp": 2, "block": 2}
CASES = [("lp", True), ("block", True), ("lp", False)]


def _llama(kv_heads: int = 4):
    return dist_workers.tiny_llama(layers=LAYERS, heads=8, kv_heads=kv_heads)


def four_rank_cases(mesh: DeviceMesh) -> dict:
    """Per rank: placed logits for each case (the test process computes the single-device ones once)."""
    results = {f"{mode}_tp{tp}": dist_workers.placed_case(mesh, _llama, PAIR, mode, tp) for mode, tp in CASES}
    placed = LayerParallel(pairs=PAIR, inner="eager", mesh=mesh)
    results["kv_heads_error"] = dist_workers.error_case(lambda: dist_workers.compiled_logits(_llama(1), placed))
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return dist_workers.spawn_ranks(four_rank_cases, WORLD, tmp_path_factory.mktemp("ranks_w4"))


@pytest.fixture(scope="module")
def single_device() -> dict[str, torch.Tensor]:
    return {mode: dist_workers.single_device_logits(_llama, tuple(PAIR), mode) for mode in ("lp", "block")}


@pytest.mark.parametrize("mode,tp", CASES)
def test_branches_tensor_parallel_equal_single_device(ranks, single_device, mode, tp):
    for rank, res in enumerate(ranks):
        case = res[f"{mode}_tp{tp}"]
        assert case["rank"] == rank
        assert (case["logits"] - single_device[mode]).abs().max().item() <= TOL
        # Non-paired layers: 2 all-reduces each with tp, none without.
        assert case["collectives"] == PAIR_COLLECTIVES[mode] + (2 * (LAYERS - 2) if tp else 0)
        assert case["param_bytes"] < case["full_bytes"]


def test_branch_weights_are_split_within_the_branch(ranks):
    """Without tp only the pair is placed: a rank holds the other layers, and half the linears of its
    branch with its norms whole."""
    layer = _llama().model.layers[PAIR[0][0]]
    norms = sum(_bytes(m) for m in (layer.input_layernorm, layer.post_attention_layernorm))
    for res in ranks:
        case = res["lp_tpFalse"]
        assert case["param_bytes"] == case["full_bytes"] - 2 * _bytes(layer) + (_bytes(layer) - norms) // 2 + norms


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def test_branch_too_small_to_split_is_refused(ranks):
    for res in ranks:
        msg = res["kv_heads_error"]
        assert "pair (1, 2) on a mesh of 4 devices runs each branch tensor-parallel over 2" in msg
        assert "only 1 key/value heads" in msg and "mesh sizes that fit this pair: 2" in msg


@pytest.mark.parametrize("world", [3, 5])
def test_odd_mesh_with_pairs_is_refused(world):
    with pytest.raises(LayerParallelError, match=f"mesh of {world} devices does not divide the pairs.*2, 4, 6"):
        ranks_per_branch(world)


def test_even_mesh_gives_branch_size():
    assert [ranks_per_branch(w) for w in (2, 4, 8)] == [1, 2, 4]
