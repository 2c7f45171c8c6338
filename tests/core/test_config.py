"""Bad input gives a clear message naming what is valid, and never a wrong result."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lp_fx import LayerParallel, LayerParallelError
from lp_fx.config import Shuffle

from tests.helpers.models import VOCAB, Block, GPTConfig, hf_model, tiny_hand_written
from tests.helpers.reference import eager_pairing


def ids(seed=0):
    return torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"pairs": [(1, 2), (2, 3)]}, "overlap"),
        ({"pairs": [(1, 3)]}, r"not two consecutive layers.*\(1, 2\)"),
        ({"pairs": [(-1, 0)]}, ">= 0"),
        ({"pairs": "1,2"}, "list of"),
        ({"start": 1, "end": 4}, "odd"),
        ({"start": 4, "end": 2}, "start < end"),
        ({"start": 2}, "integers"),
        ({"pairz": [(1, 2)]}, "unknown option.*'pairz'.*valid options: pairs, start, end"),
        ({"mode": "fast"}, "mode='fast' is not valid; choose one of 'lp', 'block', 'prune', 'merge'"),
        ({"inner": "tvm"}, "'inductor', 'aot_eager', 'eager'"),
        ({"cudagraphs": True, "inner": "eager"}, "cudagraphs=True is an Inductor setting.*inner='eager'"),
        ({"fuse": "yes"}, "fuse must be True or False"),
        ({"pairs": [(0, 1)], "start": 2, "end": 4}, "one way only"),
        ({"strict": "yes"}, "True or False"),
    ],
)
def test_bad_options_are_refused_with_what_is_valid(options, message):
    with pytest.raises(LayerParallelError, match=message):
        LayerParallel(options)


@pytest.mark.parametrize(
    "pairs",
    [np.array([[2, 3]]), torch.tensor([[2, 3]]), [(np.int64(2), np.int32(3))], [np.array([2, 3])],
     [(torch.tensor(2), torch.tensor([3]))], [(np.array(2), np.array([[3]]))]],
    ids=["numpy-array", "tensor", "numpy-ints", "numpy-row", "one-element-tensors", "one-element-arrays"],
)
def test_integer_like_pairs_are_taken_as_python_ints(pairs):
    config = LayerParallel(pairs=pairs, modes=["block"]).config
    assert config.pairs == ((2, 3),) and config.modes == {(2, 3): "block"}
    assert all(type(index) is int for index in config.pairs[0])


def test_integer_like_start_end_and_shuffle_are_taken_as_python_ints():
    config = LayerParallel(start=np.int64(0), end=torch.tensor(2), shuffle={
        "start": np.uint8(2), "end": torch.tensor([4]), "seed": np.array(7)}).config
    assert config.span == (0, 2) and config.shuffle == Shuffle(2, 4, 7)
    assert all(type(value) is int for value in (*config.span, config.shuffle.start, config.shuffle.seed))


def test_a_numpy_pairs_array_compiles_the_pairing_a_list_does():
    model = hf_model("llama")
    lp = LayerParallel(pairs=np.array([[2, 3]]), inner="eager")
    with torch.no_grad():
        got = torch.compile(model, backend=lp)(ids(), use_cache=False).logits
        with eager_pairing(model, [(2, 3)], "lp"):
            expected = model(ids(), use_cache=False).logits
    assert lp.reports[0].pairs_rewritten == [((2, 3), "lp")]
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"plan": 123}, r"plan must be the path of a plan file written by `lp-fx plan` \(a str or os\.PathLike\), got 123"),
        ({"plan": ["x.json"]}, r"plan must be the path of a plan file .*got \['x.json'\]"),
        ({"pairs": [(True, 2)]}, r"'pairs': each pair must be two layer indices \(i, i \+ 1\), integers, got \(True"),
        ({"pairs": np.array([[2.0, 3.0]])}, "'pairs': each pair must be two layer indices"),
        ({"pairs": torch.tensor([[True, False]])}, "'pairs': each pair must be two layer indices"),
        ({"pairs": np.array([2, 3])}, r"'pairs': each pair must be two layer indices .*got 2"),
        ({"pairs": [(torch.tensor([2, 3]), 3)]}, "'pairs': each pair must be two layer indices"),
        ({"start": np.float64(0), "end": 2}, "'start' and 'end' must both be integers"),
        ({"start": True, "end": 3}, "'start' and 'end' must both be integers"),
        ({"start": torch.tensor([0, 2]), "end": 4}, "'start' and 'end' must both be integers"),
        ({"shuffle": {"start": np.bool_(False), "end": 2}}, "shuffle start, end and seed must be integers"),
    ],
    ids=["plan-int", "plan-list", "pairs-bool", "pairs-float-array", "pairs-bool-tensor", "pairs-one-pair-array",
         "pairs-two-element-tensor", "start-float", "start-bool", "start-two-elements", "shuffle-bool"],
)
def test_values_that_are_not_integers_or_a_plan_path_are_refused_naming_the_option(options, message):
    with pytest.raises(LayerParallelError, match=message):
        LayerParallel(options)


def test_bad_options_through_the_named_backend():
    model = hf_model("llama")
    compiled = torch.compile(model, backend="layer_parallel", options={"pairz": [(1, 2)]})
    with pytest.raises(Exception, match="unknown option"):
        compiled(ids(), use_cache=False)


@pytest.mark.parametrize("pair", [(4, 5), (3, 4)], ids=["both-past-the-end", "second-past-the-end"])
def test_pair_out_of_range_names_the_valid_indices(pair):
    model = hf_model("llama")  # 4 layers
    compiled = torch.compile(model, backend=LayerParallel(pairs=[pair], inner="eager"))
    with pytest.raises(Exception, match=r"out of range: model.layers has 4 layers, valid indices 0..3"):
        compiled(ids(), use_cache=False)


class NoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.proj, self.head = nn.Embedding(VOCAB, 32), nn.Linear(32, 32), nn.Linear(32, VOCAB)

    def forward(self, idx):
        return self.head(torch.relu(self.proj(self.emb(idx))))


def test_model_without_layers_warns_and_matches_plain_inductor(lp_warnings):
    torch.manual_seed(0)
    model = NoLayers().eval()
    with torch.no_grad():
        expected = torch.compile(model, backend="inductor")(ids())
        torch._dynamo.reset()
        lp = LayerParallel(pairs=[(0, 1)])
        got = torch.compile(model, backend=lp)(ids())
    assert torch.equal(got, expected)
    assert "no decoder layers found" in lp_warnings.text
    assert lp.reports[0].stack is None and not lp.reports[0].pairs_rewritten


class BrokenGPT(nn.Module):
    """Layers 0-1 and 2-3 end up in different graphs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        cfg = GPTConfig()
        self.emb = nn.Embedding(VOCAB, cfg.n_embd)
        self.h = nn.ModuleList([Block(cfg) for _ in range(4)])
        self.head = nn.Linear(cfg.n_embd, VOCAB)

    def forward(self, idx):
        x = self.emb(idx)
        for block in self.h[:2]:
            x = block(x)
        torch._dynamo.graph_break()
        for block in self.h[2:]:
            x = block(x)
        return self.head(x)


def test_pair_split_by_graph_break_warns_and_is_left_alone(lp_warnings):
    model = BrokenGPT().eval()
    with torch.no_grad():
        expected = model(ids())
        lp = LayerParallel(pairs=[(1, 2)], inner="eager")
        got = torch.compile(model, backend=lp)(ids())
    assert torch.allclose(got, expected, atol=1e-5)
    where = f"{Path(__file__).name}:{BrokenGPT.forward.__code__.co_firstlineno + 4} in forward"
    assert f"split by a graph break at {where} (Call to `torch._dynamo.graph_break()`): layer 1 in this graph, layer 2 not" in lp_warnings.text
    assert f"split by a graph break at {where} (Call to `torch._dynamo.graph_break()`): layer 2 in this graph, layer 1 not" in lp_warnings.text
    assert len(lp.reports) == 2
    assert all(not r.pairs_rewritten for r in lp.reports)


def test_pair_split_by_graph_break_is_an_error_when_strict():
    compiled = torch.compile(BrokenGPT().eval(), backend=LayerParallel(pairs=[(1, 2)], inner="eager", strict=True))
    with pytest.raises(Exception, match="split by a graph break"):
        compiled(ids())


def test_post_norm_model_refuses_lp_mode_and_pairs_in_block_mode(lp_warnings):
    model = tiny_hand_written("postnorm")
    with torch.no_grad():
        plain = model(ids())
        lp = LayerParallel(pairs=[(1, 2)], mode="lp", inner="eager")
        got = torch.compile(model, backend=lp)(ids())
        assert torch.allclose(got, plain, atol=1e-5)
        assert "post-norm" in lp_warnings.text and "mode='block'" in lp_warnings.text
        assert lp.reports[0].pairs_skipped[0][0] == (1, 2)

        torch._dynamo.reset()
        with eager_pairing(model, [(1, 2)], "block"):
            expected = model(ids())
        block = LayerParallel(pairs=[(1, 2)], mode="block", inner="eager")
        got = torch.compile(model, backend=block)(ids())
    assert block.reports[0].pairs_rewritten == [((1, 2), "block")]
    assert (got - expected).abs().max().item() <= 1e-4
