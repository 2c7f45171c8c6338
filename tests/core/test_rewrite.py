"""Compiled pairing equals an independent eager reference of the same pairing, on many architectures."""

import pytest
import torch

from lp_fx import LayerParallel

from tests.helpers.models import VOCAB, hf_model, tiny_hand_written
from tests.helpers.reference import eager_pairing

HF_ARCHS = ["llama", "qwen2", "mistral", "gemma3", "gpt2"]
HAND_WRITTEN = ["nanogpt", "titan"]
# Two adjacent pairs from the first layer to the last (the second reads the first's sum) on every
# architecture; one pair between unpaired layers on one HF and one hand-written model.
CASES = [(arch, [(0, 1), (2, 3)]) for arch in HF_ARCHS + HAND_WRITTEN] + [(arch, [(1, 2)]) for arch in ("llama", "nanogpt")]
# AOTAutograd (what Inductor traces) behind these two; elsewhere the eager inner compiler, as the
# rewrite compared is the same whichever compiler runs it.
THROUGH_AOT = ("llama", "nanogpt")


def make(arch):
    return hf_model(arch) if arch in HF_ARCHS else tiny_hand_written(arch)


def logits(model, ids):
    out = model(ids, use_cache=False) if hasattr(model, "config") else model(ids)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("mode", ["lp", "block"])
@pytest.mark.parametrize(("arch", "pairs"), CASES, ids=str)
def test_compiled_pairing_matches_eager_reference(arch, mode, pairs):
    model = make(arch)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = logits(model, ids)
        with eager_pairing(model, pairs, mode):
            expected = logits(model, ids)
        lp = LayerParallel(pairs=pairs, mode=mode, inner="aot_eager" if arch in THROUGH_AOT else "eager")
        got = logits(torch.compile(model, backend=lp), ids)
    assert [p for p, _ in lp.reports[0].pairs_rewritten] == pairs
    assert not lp.reports[0].pairs_skipped
    assert (got - expected).abs().max().item() <= 1e-4
    # The pairing really changed the model: a no-op rewrite would also "match" a no-op reference.
    assert (expected - plain).abs().max().item() > 1e-3


def test_inductor_pairing_matches_eager_reference():
    """HF Llama here; the hand-written model goes through Inductor in tests/core/test_backward.py."""
    model = make("llama")
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with eager_pairing(model, [(2, 3)], "lp"):
            expected = logits(model, ids)
        got = logits(torch.compile(model, backend=LayerParallel(pairs=[(2, 3)])), ids)
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "gpt2", "titan"])
def test_no_pairs_equals_uncompiled_model(arch):
    model = make(arch)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = logits(model, ids)
        got = logits(torch.compile(model, backend="layer_parallel", options={"pairs": [], "inner": "aot_eager"}), ids)
    assert (got - expected).abs().max().item() <= 1e-5
