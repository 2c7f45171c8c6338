"""Fine-tuning on 2 gloo ranks (TP + LP): each rank trains the branch it computes, and the trained
weights equal the single-process run."""

from __future__ import annotations

import os

import pytest

from lp_fx.checkpoint import load_finetuned
from lp_fx.tools.training.finetune import finetune

from tests.helpers import dist_workers

# Gloo ranks need every core: these run in a pytest call of their own (`pytest -n 0 -m distributed`);
# the first test of a module also spawns the module's ranks, hence the longer limit.
pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[list[dict], object]:
    ckpt = tmp_path_factory.mktemp("ckpt")
    os.environ["LP_FX_CKPT"] = str(ckpt)
    try:
        results = dist_workers.spawn_ranks(dist_workers.finetune_cases, 2, tmp_path_factory.mktemp("ranks"))
    finally:
        del os.environ["LP_FX_CKPT"]
    return results, ckpt


@pytest.mark.parametrize("train", ["paired", "all"])
def test_two_rank_fine_tuning_equals_single_process(ranks, tmp_path, train):
    # Weights after AdamW: an entry whose gradient is near AdamW's eps (1e-8) turns a rounding
    # difference of the cross-rank sum into a step difference of up to a fraction of lr, so the
    # run uses lr 1e-4; the gradients are compared at full precision in the next test.
    results, ckpt = ranks
    model = dist_workers.tiny_llama()
    finetune(model, dist_workers.finetune_tokens(), dist_workers.finetune_config(train), tmp_path, progress=False)
    expected = dict(model.named_parameters())
    start = dict(dist_workers.tiny_llama().named_parameters())
    assert max((expected[n] - start[n]).abs().max().item() for n in expected) > 5e-5  # the run trained something
    # Rank 0's checkpoint holds the whole result, including the branch rank 1 computed.
    saved = dist_workers.tiny_llama()
    load_finetuned(saved, ckpt / train)
    for name, tensor in saved.named_parameters():
        assert (tensor - expected[name]).abs().max().item() <= 1e-5, name
    # Before the checkpoint each trained tensor is sent from a rank that trains it: every rank ends
    # with the whole result.
    for rank, res in enumerate(results):
        for name, tensor in res[train].items():
            assert (tensor - expected[name]).abs().max().item() <= 1e-5, (rank, name)


@pytest.mark.parametrize("train", ["paired", "all"])
def test_two_rank_gradients_equal_single_process(ranks, train):
    """AdamW's step hides a wrong gradient scale; the gradients themselves are compared here."""
    results, _ = ranks
    expected = dist_workers.finetune_gradients(train)
    for rank, res in enumerate(results):
        grads = res[f"grads_{train}"]
        assert grads.keys() == expected.keys()
        for name, grad in grads.items():
            scale = expected[name].abs().max().item()
            assert scale > 0, name
            assert (grad - expected[name]).abs().max().item() <= 1e-5 * max(1.0, scale), (rank, name)
