"""The depth transforms prune and merge equal independent eager references of them
(the model edited by hand, see tests/reference.py), in forward and in static-cache generation."""

import json

import pytest
import torch

from lp_fx import LayerParallel, LayerParallelError

from .models import VOCAB, hf_model, tiny_hand_written
from .reference import eager_pairing, eager_skipping, merged_copy
from .test_generate import NEW_TOKENS, greedy

ARCHS = ["llama", "gpt2", "nanogpt"]
PAIRS = [(1, 2)]


def make(arch, layers=4):
    return tiny_hand_written(arch) if arch == "nanogpt" else hf_model(arch, layers=layers)


def logits(model, ids):
    out = model(ids, use_cache=False) if hasattr(model, "config") else model(ids)
    return out.logits if hasattr(out, "logits") else out


def random_ids(seed, length=12, batch=2):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def expected_logits(model, ids, transform):
    """Logits of the model edited by hand as ``transform`` says."""
    if transform == "prune":
        with eager_skipping(model, [j for _, j in PAIRS]):
            return logits(model, ids)
    return logits(merged_copy(model, PAIRS), ids)


def backend_for(transform, **kwargs):
    return LayerParallel(pairs=PAIRS, mode=transform, **kwargs)


@pytest.mark.parametrize("transform", ["prune", "merge"])
@pytest.mark.parametrize("arch", ARCHS)
def test_compiled_transform_matches_eager_reference(arch, transform):
    model = make(arch)
    ids = random_ids(1)
    with torch.no_grad():
        plain = logits(model, ids)
        expected = expected_logits(model, ids, transform)
        lp = backend_for(transform, inner="aot_eager", strict=True)
        got = logits(torch.compile(model, backend=lp), ids)
    assert lp.reports[0].pairs_rewritten == [((1, 2), transform)]
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


def layer_nodes(gm, index):
    """The nodes of ``gm`` computed inside decoder layer ``index`` (HF module paths)."""
    return [
        n for n in gm.graph.nodes
        if any(path.endswith(f"layers.{index}") for path, _ in (n.meta.get("nn_module_stack") or {}).values())
    ]


def float_writes(nodes):
    return [n for n in nodes if n.op == "call_method" and n.target == "index_copy_"]


def test_static_cache_generation_matches_eager_reference():
    model = hf_model("llama")
    ids = random_ids(4, length=6, batch=1)
    with eager_skipping(model, [2]):
        expected = greedy(model, ids)
    plain = greedy(model, ids)
    graphs = []
    lp = backend_for("prune", inner=lambda gm, example_inputs: graphs.append(gm) or gm.forward, strict=True)
    model.forward = torch.compile(model.forward, backend=lp)
    got = greedy(model, ids)
    assert got.shape[1] == ids.shape[1] + NEW_TOKENS
    assert torch.equal(got, expected)
    assert not torch.equal(expected, plain), "the transform should change the tokens of a random tiny model"
    assert len(lp.reports) >= 2  # the prefill and the decode graph
    for gm, report in zip(graphs, lp.reports):
        assert report.pairs_rewritten == [((1, 2), "prune")]
        pruned = layer_nodes(gm, 2)
        # Layer 2's compute and its KV-cache writes are gone (what stays is the cache's position
        # counter); the other layers keep their cache writes.
        assert not float_writes(pruned)
        assert not [n for n in pruned if n.op == "placeholder" and "_parameters_" in n.name and n.users]
        assert all(len(float_writes(layer_nodes(gm, i))) == 2 for i in (0, 1, 3))


def test_merge_leaves_the_model_parameters_bit_identical():
    model = make("llama")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    lp = LayerParallel(pairs=PAIRS, mode="merge", inner="aot_eager")
    with torch.no_grad():
        torch.compile(model, backend=lp)(random_ids(5), use_cache=False)
    assert lp.weights.averages, "merge should hold the averaged weights in the backend"
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
    assert "not rewritten" in lp_warnings.text and not lp.weights.averages


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
        ({"mesh": "auto", "pairs": [(1, 2)], "mode": "prune"}, "mode 'prune' cannot be placed on a mesh"),
        ({"mesh": "auto", "pairs": [(1, 2)], "mode": "merge"}, "mode 'merge' cannot be placed on a mesh"),
    ],
)
def test_bad_transform_options_are_refused_with_what_is_valid(options, message):
    with pytest.raises(LayerParallelError, match=message):
        LayerParallel(options)
