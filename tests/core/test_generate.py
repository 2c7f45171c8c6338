"""Greedy generation with a static KV cache through the compiled, paired forward."""

import pytest
import torch

from lp_fx import LayerParallel

from tests.helpers.models import VOCAB, hf_model
from tests.helpers.reference import eager_pairing
from tests.helpers.runs import NEW_TOKENS, greedy


@pytest.mark.parametrize(("arch", "mode"), [("llama", "lp"), ("llama", "block"), ("gemma3", "lp")])
def test_static_cache_generation_matches_eager_reference(arch, mode):
    model = hf_model(arch)
    pairs = [(1, 2)]
    ids = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    with eager_pairing(model, pairs, mode):
        expected = greedy(model, ids)
    plain = greedy(model, ids)
    lp = LayerParallel(pairs=pairs, mode=mode, inner="aot_eager" if (arch, mode) == ("llama", "lp") else "eager")
    model.forward = torch.compile(model.forward, backend=lp)
    got = greedy(model, ids)
    assert got.shape[1] == ids.shape[1] + NEW_TOKENS
    assert torch.equal(got, expected)
    assert not torch.equal(expected, plain), "pairing should change the tokens of a random tiny model"
    rewritten = [r for r in lp.reports if r.pairs_rewritten]
    assert len(rewritten) >= 2, [r.summary() for r in lp.reports]  # the prefill and the decode graph
    assert all(r.pairs_rewritten == [((1, 2), mode)] for r in rewritten)
