"""The depth transforms prune, merge and shuffle equal independent eager references of them
(the model edited by hand, see tests/helpers/reference.py), in forward and in static-cache generation."""

import json
from contextlib import nullcontext

import pytest
import torch

from lp_fx import LayerParallel, LayerParallelError

from tests.helpers.models import hf_model
from tests.helpers.reference import eager_order, eager_pairing, eager_skipping, layer_list, merged_copy
from tests.helpers.runs import NEW_TOKENS, greedy
from tests.helpers.runs import logits, make, random_ids, shuffled_order

ARCHS = ["llama", "gpt2", "nanogpt"]
PAIRS = [(1, 2)]
SHUFFLE = {"start": 0, "end": 4, "seed": 0}


def edited_by_hand(model, transform):
    """A context giving ``model`` edited by hand as ``transform`` says (for merge, an edited copy)."""
    if transform == "prune":
        return eager_skipping(model, [j for _, j in PAIRS])
    if transform == "merge":
        return nullcontext(merged_copy(model, PAIRS))
    return eager_order(model, shuffled_order(SHUFFLE, len(layer_list(model)))[0])


def backend_for(transform, **kwargs):
    if transform == "shuffle":
        return LayerParallel(shuffle=SHUFFLE, **kwargs)
    return LayerParallel(pairs=PAIRS, mode=transform, **kwargs)


@pytest.mark.parametrize("transform", ["prune", "merge", "shuffle"])
@pytest.mark.parametrize("arch", ARCHS)
def test_compiled_transform_matches_eager_reference(arch, transform):
    model = make(arch)
    ids = random_ids(1)
    with torch.no_grad():
        plain = logits(model, ids)
        with edited_by_hand(model, transform) as reference:
            expected = logits(reference, ids)
        lp = backend_for(transform, inner="aot_eager" if arch == "llama" else "eager", strict=True)
        got = logits(torch.compile(model, backend=lp), ids)
    report = lp.reports[0]
    if transform == "shuffle":
        assert report.shuffled == shuffled_order(SHUFFLE, 4)[1]
        assert "run in the order " + ", ".join(map(str, report.shuffled)) in report.summary()
    else:
        assert report.pairs_rewritten == [((1, 2), transform)]
    assert (got - expected).abs().max().item() <= 1e-4
    # The transform really changed the model: a no-op would also "match" a no-op reference.
    assert (expected - plain).abs().max().item() > 1e-3


def test_plan_names_prune_and_merge_per_pair(tmp_path):
    model = make("llama", layers=6)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"pairs": [[0, 1], [2, 3], [4, 5]], "num_layers": 6, "modes": ["merge", "lp", "prune"]}))
    ids = random_ids(2)
    with torch.no_grad():
        reference = merged_copy(model, [(0, 1)])
        with eager_pairing(reference, [(2, 3)], "lp"), eager_skipping(reference, [5]):
            expected = logits(reference, ids)
        lp = LayerParallel(plan=str(plan), inner="aot_eager", strict=True)
        got = logits(torch.compile(model, backend=lp), ids)
    assert lp.reports[0].pairs_rewritten == [((0, 1), "merge"), ((2, 3), "lp"), ((4, 5), "prune")]
    assert (got - expected).abs().max().item() <= 1e-4


def test_shuffle_composes_with_pairs_outside_its_range(tmp_path):
    model = make("llama", layers=8)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"pairs": [[0, 1], [6, 7]], "num_layers": 8, "modes": ["merge", "lp"]}))
    shuffle = {"start": 2, "end": 6, "seed": 0}
    order, shuffled = shuffled_order(shuffle, 8)
    ids = random_ids(3)
    with torch.no_grad():
        reference = merged_copy(model, [(0, 1)])
        with eager_pairing(reference, [(6, 7)], "lp"), eager_order(reference, order):
            expected = logits(reference, ids)
        lp = LayerParallel(plan=str(plan), shuffle=shuffle, inner="eager", strict=True)
        got = logits(torch.compile(model, backend=lp), ids)
    assert lp.reports[0].pairs_rewritten == [((0, 1), "merge"), ((6, 7), "lp")]
    assert lp.reports[0].shuffled == shuffled
    assert (got - expected).abs().max().item() <= 1e-4


def layer_nodes(gm, index):
    """The nodes of ``gm`` computed inside decoder layer ``index`` (HF module paths)."""
    return [
        n for n in gm.graph.nodes
        if any(path.endswith(f"layers.{index}") for path, _ in (n.meta.get("nn_module_stack") or {}).values())
    ]


def kv_writes(nodes):
    return [n for n in nodes if n.op == "call_method" and n.target == "index_copy_"]


def assert_each_layer_writes_its_own_cache(gm, indices):
    """Each layer writes its K and V into tensors made inside it (prefill) or read from cache.layers[i]."""
    for i in indices:
        nodes = layer_nodes(gm, i)
        writes = kv_writes(nodes)
        assert len(writes) == 2
        assert all(w.args[0] in nodes or f"cache_layers_{i}_" in w.args[0].name for w in writes)


def assert_layer_is_gone(gm, index):
    """No weight of the layer is read and it writes no K or V (its cache's position counter stays)."""
    nodes = layer_nodes(gm, index)
    assert not kv_writes(nodes)
    assert not [n for n in nodes if n.op == "placeholder" and "_parameters_" in n.name and n.users]


@pytest.mark.parametrize("transform", ["prune", "merge", "shuffle"])
def test_static_cache_generation_matches_eager_reference(transform):
    model = hf_model("llama")
    ids = random_ids(4, length=6, batch=1)
    with edited_by_hand(model, transform) as reference:
        expected = greedy(reference, ids)
    plain = greedy(model, ids)
    graphs = []
    lp = backend_for(transform, inner=lambda gm, example_inputs: graphs.append(gm) or gm.forward, strict=True)
    model.forward = torch.compile(model.forward, backend=lp)
    got = greedy(model, ids)
    assert got.shape[1] == ids.shape[1] + NEW_TOKENS
    assert torch.equal(got, expected)
    assert not torch.equal(expected, plain), "the transform should change the tokens of a random tiny model"
    assert len(lp.reports) >= 2  # the prefill and the decode graph
    for gm, report in zip(graphs, lp.reports):
        if transform == "shuffle":
            assert report.shuffled == shuffled_order(SHUFFLE, 4)[1]
            assert_each_layer_writes_its_own_cache(gm, range(4))
        else:
            assert report.pairs_rewritten == [((1, 2), transform)]
            assert_layer_is_gone(gm, 2)
            assert_each_layer_writes_its_own_cache(gm, (0, 1, 3))
    if transform == "merge":  # one average per parameter of layer 1, shared by the prefill and decode graphs
        assert len(lp.weights.averages()) == len(list(layer_list(model)[1].parameters()))


def test_merge_leaves_the_model_parameters_bit_identical():
    model = make("llama")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    lp = LayerParallel(pairs=PAIRS, mode="merge", inner="aot_eager")
    with torch.no_grad():
        torch.compile(model, backend=lp)(random_ids(5), use_cache=False)
    assert lp.weights.averages(), "merge should hold the averaged weights in the backend"
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_merge_refuses_gradients():
    model = make("nanogpt")
    compiled = torch.compile(model, backend=LayerParallel(pairs=PAIRS, mode="merge", inner="eager"))
    with pytest.raises(Exception, match="merge' is for inference and does not train"):
        compiled(random_ids(6))


def mismatched_nanogpt():
    """nanoGPT whose layer 2 has a wider MLP than layer 1: their weights cannot be averaged."""
    model = make("nanogpt")
    mlp = model.transformer.h[2].mlp
    mlp.c_fc, mlp.c_proj = torch.nn.Linear(64, 128), torch.nn.Linear(128, 64)
    return model.eval()


def test_merge_of_layers_with_different_weights_is_skipped_and_left_alone(lp_warnings):
    model = mismatched_nanogpt()
    ids = random_ids(7)
    with torch.no_grad():
        plain = model(ids)
        lp = LayerParallel(pairs=PAIRS, mode="merge", inner="eager")
        got = torch.compile(model, backend=lp)(ids)
    assert torch.allclose(got, plain, atol=1e-5)
    (pair, reason), = lp.reports[0].pairs_skipped
    assert pair == (1, 2) and "mlp.c_fc.weight" in reason and "(256, 64)" in reason and "(128, 64)" in reason
    assert "not rewritten" in lp_warnings.text and not lp.weights.averages()


def test_merge_of_layers_with_different_weights_is_an_error_when_strict():
    compiled = torch.compile(
        mismatched_nanogpt(), backend=LayerParallel(pairs=PAIRS, mode="merge", inner="eager", strict=True)
    )
    with torch.no_grad(), pytest.raises(Exception, match="shapes/dtypes differ"):
        compiled(random_ids(8))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mode": "drop"}, "mode='drop' is not valid; choose one of 'lp', 'block', 'prune', 'merge'"),
        ({"shuffle": [0, 4]}, "shuffle must be a dict"),
        ({"shuffle": {"start": 0, "end": 4, "sed": 1}}, "shuffle takes the keys start, end, seed"),
        ({"shuffle": {"start": 0, "end": 4, "seed": "a"}}, "must be integers"),
        ({"shuffle": {"start": 3, "end": 4}}, "at least two layers"),
        ({"shuffle": {"start": 2, "end": 6}, "pairs": [(5, 6)]}, r"pair \(5, 6\) is inside the shuffled layers 2..5"),
        ({"mesh": "auto", "pairs": [(1, 2)], "mode": "prune"}, "mode 'prune' cannot be placed on a mesh"),
        ({"mesh": "auto", "pairs": [(1, 2)], "mode": "merge"}, "mode 'merge' cannot be placed on a mesh"),
        ({"mesh": "auto", "shuffle": {"start": 0, "end": 4}}, "shuffle cannot be placed on a mesh"),
    ],
)
def test_bad_transform_options_are_refused_with_what_is_valid(options, message):
    with pytest.raises(LayerParallelError, match=message):
        LayerParallel(options)


def test_shuffle_range_outside_the_stack_names_the_valid_indices():
    compiled = torch.compile(make("llama"), backend=LayerParallel(shuffle={"start": 2, "end": 6}, inner="eager"))
    message = r"shuffle range 2..5 is out of range: model.layers has 4 layers, valid indices 0..3"
    with pytest.raises(Exception, match=message):
        compiled(random_ids(9), use_cache=False)


class SharedMemoryLayer(torch.nn.Module):
    """Writes its slot of a buffer all layers share, then reads the whole buffer."""

    def __init__(self, index, memory):
        super().__init__()
        self.index, self.lin = index, torch.nn.Linear(16, 16)
        self.register_buffer("memory", memory, persistent=False)

    def forward(self, x):
        self.memory[self.index] = x.mean()
        return x + torch.tanh(self.lin(x)) * self.memory.sum()


class SharedMemoryNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        memory = torch.zeros(4)
        self.layers = torch.nn.ModuleList([SharedMemoryLayer(i, memory) for i in range(4)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_shuffle_of_layers_sharing_written_memory_is_refused_and_left_alone(lp_warnings):
    model = SharedMemoryNet().eval()
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        plain = model(x)
        model.layers[0].memory.zero_()
        lp = LayerParallel(shuffle=SHUFFLE, inner="eager")
        got = torch.compile(model, backend=lp)(x)
    assert torch.equal(got, plain)
    assert lp.reports[0].shuffled is None
    assert "layer 0 writes in place memory that layer(s) [1, 2, 3] read" in lp.reports[0].shuffle_skipped
    assert "shuffle of layers 0..3 not applied" in lp_warnings.text


def test_a_seed_that_keeps_the_order_says_so():
    model = make("llama")
    ids = random_ids(11)
    lp = LayerParallel(shuffle={"start": 2, "end": 4, "seed": 1}, inner="eager")
    with torch.no_grad():
        plain = logits(model, ids)
        got = logits(torch.compile(model, backend=lp), ids)
    assert lp.reports[0].shuffled == (2, 3)
    assert "shuffle seed 1 keeps layers [2, 3] in their order" in lp.reports[0].summary()
    assert (got - plain).abs().max().item() <= 1e-5
