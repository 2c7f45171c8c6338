"""The gated graph (GatedLayerParallel): one compile in which every pair (i, i+1) is switched off,
lp or block at run time. Off equals the uncompiled model; on equals the eager reference of the pairing."""

import pytest
import torch

from lp_fx import GatedLayerParallel, LayerParallelError

from tests.helpers.models import VOCAB, hf_model, tiny_hand_written
from tests.helpers.reference import eager_pairing

ARCHS = ["llama", "nanogpt"]


def make(arch, layers=4):
    return hf_model(arch, layers=layers) if arch == "llama" else tiny_hand_written(arch)


def logits(model, ids):
    out = model(ids, use_cache=False) if hasattr(model, "config") else model(ids)
    return out.logits if hasattr(out, "logits") else out


def ids(seed=1):
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def gated_logits(model, settings, inner="aot_eager", modes=("lp", "block")):
    """Logits under each (pairs, modes) setting, all from one compiled graph; and the backend."""
    backend = GatedLayerParallel(4, modes=modes, inner=inner)
    compiled = torch.compile(model, backend=backend)
    out = []
    with torch.no_grad():
        for pairs, pair_modes in settings:
            backend.set_pairing(pairs, pair_modes)
            out.append(logits(compiled, ids()))
    return out, backend


def reference_logits(model, pairs, modes):
    """The pairing run eagerly (:func:`eager_pairing`, no FX): what each gate setting must equal."""
    with torch.no_grad(), eager_pairing(model, pairs, modes):
        return logits(model, ids())


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_all_gates_off_equal_the_uncompiled_model(arch, inner):
    model = make(arch)
    with torch.no_grad():
        expected = logits(model, ids())
    (got,), _ = gated_logits(model, [((), ())], inner)
    if inner == "eager":  # the same operations on the same values: bit for bit
        assert torch.equal(got, expected)
    else:
        assert (got - expected).abs().max().item() <= 1e-6


@pytest.mark.parametrize("mode", ["lp", "block"])
@pytest.mark.parametrize("arch", ARCHS)
def test_each_single_gate_equals_the_eager_reference_of_its_pairing(arch, mode):
    model = make(arch)
    pairs = [(0, 1), (1, 2), (2, 3)]
    with torch.no_grad():
        unpaired = logits(model, ids())
    got, _ = gated_logits(model, [([pair], [mode]) for pair in pairs])
    for pair, gated in zip(pairs, got):
        expected = reference_logits(model, [pair], [mode])
        assert (gated - expected).abs().max().item() <= 1e-5, pair
        assert (expected - unpaired).abs().max().item() > 1e-3, pair  # the pairing changed the model


@pytest.mark.parametrize("modes", [("lp", "lp"), ("lp", "block"), ("block", "lp"), ("block", "block")], ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_disjoint_gates_together_equal_the_eager_reference_of_the_set(arch, modes):
    model = make(arch)
    pairs = [(0, 1), (2, 3)]  # adjacent: the second pair reads the first pair's output
    (got,), _ = gated_logits(model, [(pairs, modes)])
    expected = reference_logits(model, pairs, modes)
    assert (got - expected).abs().max().item() <= 1e-5


def test_changing_gates_compiles_nothing():
    model = make("llama")
    calls = []

    def counting_inner(gm, example_inputs):
        calls.append(len(example_inputs))
        return gm.forward

    settings = [((), ()), ([(1, 2)], ["lp"]), ([(1, 2)], ["block"]), ([(0, 1), (2, 3)], ["lp", "lp"]), ((), ())]
    got, backend = gated_logits(model, settings, inner=counting_inner)
    assert len(backend.reports) == 1 and len(calls) == 1
    assert torch.equal(got[0], got[-1])
    for a, b in zip(got, got[1:-1]):
        assert (a - b).abs().max().item() > 1e-3  # each setting computed another pairing


def test_block_gates_on_a_post_norm_model_and_lp_refused():
    model = tiny_hand_written("postnorm")
    (got,), _ = gated_logits(model, [([(1, 2)], ["block"])], modes=("block",))
    assert (got - reference_logits(model, [(1, 2)], ["block"])).abs().max().item() <= 1e-5
    torch._dynamo.reset()
    with pytest.raises(Exception, match="cannot be gated in mode 'lp'.*post-norm"):
        gated_logits(model, [((), ())], modes=("lp",))


def test_lp_gates_refuse_a_forward_that_returns_its_kv_cache():
    """A copied attention would feed the cache a second set of keys: refused, with the way out."""
    with pytest.raises(Exception, match="cannot be gated in mode 'lp'.*read outside the layer.*use_cache=False"):
        with torch.no_grad():
            torch.compile(make("llama"), backend=GatedLayerParallel(4, ("lp",), inner="eager"))(ids(), use_cache=True)


def test_bad_settings_name_what_is_valid():
    backend = GatedLayerParallel(4, modes=("lp",), inner="eager")
    with pytest.raises(LayerParallelError, match="overlap"):
        backend.set_pairing([(0, 1), (1, 2)], ["lp", "lp"])
    with pytest.raises(LayerParallelError, match="not gated here; gated modes: lp"):
        backend.set_pairing([(0, 1)], ["block"])
    with pytest.raises(LayerParallelError, match=r"out of range: valid pairs are \(0, 1\) .. \(2, 3\)"):
        backend.set_pairing([(3, 4)], ["lp"])
    with pytest.raises(LayerParallelError, match="give some of 'lp', 'block'"):
        GatedLayerParallel(4, modes=("prune",))


def test_a_model_with_another_layer_count_is_refused():
    with pytest.raises(Exception, match="whole stack of 30 layers in one graph; this graph has 4 layers"):
        with torch.no_grad():
            logits(torch.compile(make("llama"), backend=GatedLayerParallel(30, inner="eager")), ids())
