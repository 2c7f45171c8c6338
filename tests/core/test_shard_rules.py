"""The tensor-parallel propagation on small hand-built FX graphs, in this process (no ranks).

Each graph is a tiny function traced by ``fx.symbolic_trace``, with every node's
``example_value`` set to the FakeTensor its op gives, as Dynamo sets it. The rule tests check the
split each per-op rule derives and the local sizes it writes; the sub-block tests shard a whole
attention or MLP block once per rank and check that the per-rank partial outputs add up to the
unsharded output (which is what the all-reduce does on real ranks).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode

from lp_fx.find_layers import Layer, SubBlock
from lp_fx.shard_rules import CacheIsSplit, CannotShard, Propagated, Split, propagate
from lp_fx.tensor_parallel import TooFewHeads, shard_sub_block

T, HEAD = 5, 4  # sequence length, head dim
Q_HEADS, KV_HEADS = 9, 3  # SmolLM2's GQA: on 2 ranks 6+3 query heads over 2+1 KV heads


class _ExampleValues(fx.Interpreter):
    """Runs the graph on FakeTensors and keeps each node's result as its ``example_value``."""

    def run_node(self, n: fx.Node):
        n.meta["example_value"] = super().run_node(n)
        return n.meta["example_value"]


def traced(fn, *inputs: torch.Tensor) -> fx.GraphModule:
    gm = fx.symbolic_trace(fn)
    with FakeTensorMode() as mode:
        _ExampleValues(gm).run(*(mode.from_tensor(t) for t in inputs))
    return gm


def node(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def rule_of(fn, inputs: list[torch.Tensor], seeds: dict[str, Split], name: str) -> Propagated:
    """What the rule derives for node ``name`` when the named inputs are split as ``seeds``."""
    gm = traced(fn, *inputs)
    return propagate(node(gm, name), {node(gm, n): s for n, s in seeds.items()})


def args_of(result: Propagated) -> tuple:
    """The new args without the tensor (the sizes), for comparing."""
    return result.args[1:]


# ----- view / reshape -----


@pytest.mark.parametrize(
    "split,expected,sizes",
    [(Split(2, 0, 24), Split(2, 0, 6), (1, T, 6, HEAD)), (Split(2, 24, 12), Split(2, 6, 3), (1, T, 3, HEAD))],
)
def test_view_into_heads_splits_the_head_dim(split, expected, sizes):
    result = rule_of(lambda x: x.view(1, T, Q_HEADS, HEAD), [torch.randn(1, T, 36)], {"x": split}, "view")
    assert result.split == expected
    assert args_of(result) == sizes


def test_reshape_keeps_minus_one_on_the_split_dim():
    result = rule_of(lambda x: x.reshape((1, T, -1, HEAD)), [torch.randn(1, T, 36)], {"x": Split(2, 0, 24)}, "reshape")
    assert result.split == Split(2, 0, 6)
    assert args_of(result) == ((1, T, -1, HEAD),)


def test_reshape_merging_heads_splits_the_features():
    result = rule_of(lambda o: o.reshape(1, T, 36), [torch.randn(1, T, 9, HEAD)], {"o": Split(2, 6, 3)}, "reshape")
    assert result.split == Split(2, 24, 12)
    assert args_of(result) == (1, T, 12)


def test_view_cutting_through_a_head_cannot_shard():
    with pytest.raises(CannotShard, match="cuts through a head"):
        rule_of(lambda x: x.view(1, T, Q_HEADS, HEAD), [torch.randn(1, T, 36)], {"x": Split(2, 0, 2)}, "view")


def test_merging_an_inner_split_dim_cannot_shard():
    with pytest.raises(CannotShard, match="not the outer one"):
        rule_of(lambda o: o.reshape(1, T, 36), [torch.randn(1, T, 9, HEAD)], {"o": Split(3, 0, 2)}, "reshape")


# ----- expand, index: the repeat_kv spelling of GQA -----


def repeat_kv(k):
    return k[:, :, None].expand(1, KV_HEADS, 3, T, HEAD).reshape(1, Q_HEADS, T, HEAD)


@pytest.mark.parametrize(
    "kv_split,q_split,q_heads", [(Split(1, 0, 2), Split(1, 0, 6), 6), (Split(1, 2, 1), Split(1, 6, 3), 3)]
)
def test_repeat_kv_gives_each_rank_the_query_heads_of_its_kv_heads(kv_split, q_split, q_heads):
    gm = traced(repeat_kv, torch.randn(1, KV_HEADS, T, HEAD))
    splits = {node(gm, "k"): kv_split}
    derived = {}
    for name in ("getitem", "expand", "reshape"):
        splits[node(gm, name)], derived[name] = propagate(node(gm, name), splits)
    assert splits[node(gm, "getitem")] == kv_split
    assert splits[node(gm, "expand")] == kv_split
    assert derived["expand"][1:] == (1, kv_split.size, 3, T, HEAD)
    assert splits[node(gm, "reshape")] == q_split
    assert derived["reshape"][1:] == (1, q_heads, T, HEAD)


def test_expand_with_new_leading_dims_moves_the_split_dim():
    result = rule_of(lambda x: x.expand(2, T, 36), [torch.randn(T, 36)], {"x": Split(1, 0, 24)}, "expand")
    assert result.split == Split(2, 0, 24)
    assert args_of(result) == (2, T, 24)


@pytest.mark.parametrize(
    "index,split_dim,out_dim",
    [
        ((slice(None), None), 2, 3),
        ((0,), 2, 1),
        ((Ellipsis, slice(None, 2)), 1, 1),
        ((slice(None), slice(None), 0), 1, 1),
    ],
)
def test_index_moves_the_split_dim(index, split_dim, out_dim):
    result = rule_of(lambda x: x[index], [torch.randn(1, T, 36)], {"x": Split(split_dim, 0, 6)}, "getitem")
    assert result == Propagated(Split(out_dim, 0, 6))


def test_index_into_the_split_dim_cannot_shard():
    with pytest.raises(CannotShard, match="indexes into the split dim"):
        rule_of(lambda x: x[..., :2], [torch.randn(1, T, 36)], {"x": Split(2, 0, 24)}, "getitem")


def test_index_by_a_tensor_cannot_shard():
    with pytest.raises(CannotShard, match="indexing by"):
        rule_of(lambda x, i: x[i], [torch.randn(1, T, 36), torch.tensor([0])], {"x": Split(2, 0, 24)}, "getitem")


# ----- transpose, t, permute, unsqueeze, squeeze -----

REORDERS = [
    (lambda x: x.transpose(1, 2), (1, T, Q_HEADS, HEAD), 2, "transpose", 1),
    (lambda x: x.transpose(-1, 0), (1, T, Q_HEADS, HEAD), 2, "transpose", 2),
    (lambda x: x.t(), (36, T), 0, "t", 1),
    (lambda x: x.permute(0, 2, 1, 3), (1, T, Q_HEADS, HEAD), 2, "permute", 1),
    (lambda x: torch.permute(x, (3, 2, 1, 0)), (1, T, Q_HEADS, HEAD), 2, "permute", 1),
    (lambda x: x.unsqueeze(0), (T, 36), 1, "unsqueeze", 2),
    (lambda x: x.unsqueeze(-1), (T, 36), 1, "unsqueeze", 1),
    (lambda x: x.squeeze(0), (1, Q_HEADS, T, HEAD), 1, "squeeze", 0),
    (lambda x: x.squeeze(-1), (Q_HEADS, T, 1), 0, "squeeze", 0),
]


@pytest.mark.parametrize("fn,shape,split_dim,name,out_dim", REORDERS)
def test_reorders_move_the_split_dim(fn, shape, split_dim, name, out_dim):
    result = rule_of(fn, [torch.randn(shape)], {"x": Split(split_dim, 3, 6)}, name)
    assert result == Propagated(Split(out_dim, 3, 6))


@pytest.mark.parametrize("fn", [lambda x: x.squeeze(1), lambda x: x.squeeze()])
def test_squeeze_of_the_split_dim_or_every_dim_cannot_shard(fn):
    with pytest.raises(CannotShard, match="squeeze"):
        rule_of(fn, [torch.randn(1, Q_HEADS, 1)], {"x": Split(1, 0, 6)}, "squeeze")


# ----- attention -----


def plain_attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def gqa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def gqa_masked(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


QKV = [torch.randn(1, Q_HEADS, T, HEAD), torch.randn(1, KV_HEADS, T, HEAD), torch.randn(1, KV_HEADS, T, HEAD)]


@pytest.mark.parametrize("q,kv", [(Split(1, 0, 6), Split(1, 0, 2)), (Split(1, 6, 3), Split(1, 2, 1))])
def test_gqa_attention_keeps_query_heads_with_their_kv_group(q, kv):
    result = rule_of(gqa, QKV, {"q": q, "k": kv, "v": kv}, "scaled_dot_product_attention")
    assert result == Propagated(q)


@pytest.mark.parametrize(
    "seeds",
    [
        {"q": Split(1, 0, 3), "k": Split(1, 0, 2), "v": Split(1, 0, 2)},  # not whole groups
        {"q": Split(1, 0, 6), "k": Split(1, 0, 2)},  # v whole
        {"q": Split(1, 0, 6), "k": Split(1, 0, 2), "v": Split(1, 1, 2)},  # k and v differ
    ],
)
def test_gqa_attention_with_heads_not_split_by_group_cannot_shard(seeds):
    with pytest.raises(CannotShard):
        rule_of(gqa, QKV, seeds, "scaled_dot_product_attention")


def test_gqa_attention_mask_without_a_head_dim_is_shared():
    kv = Split(1, 0, 2)
    seeds = {"q": Split(1, 0, 6), "k": kv, "v": kv}
    result = rule_of(gqa_masked, [*QKV, torch.zeros(1, 1, T, T)], seeds, "scaled_dot_product_attention")
    assert result == Propagated(Split(1, 0, 6))


def test_gqa_attention_mask_with_a_head_dim_cannot_shard():
    kv = Split(1, 0, 2)
    seeds = {"q": Split(1, 0, 6), "k": kv, "v": kv}
    with pytest.raises(CannotShard, match="mask with a head dim"):
        rule_of(gqa_masked, [*QKV, torch.zeros(1, Q_HEADS, T, T)], seeds, "scaled_dot_product_attention")


def test_attention_without_gqa_broadcasts_over_heads():
    qkv = [torch.randn(1, KV_HEADS, T, HEAD) for _ in range(3)]
    split = Split(1, 2, 1)
    result = rule_of(plain_attention, qkv, dict.fromkeys("qkv", split), "scaled_dot_product_attention")
    assert result == Propagated(split)


# ----- broadcasting ops (everything not in the table) -----

X = torch.randn(1, T, 36)


@pytest.mark.parametrize(
    "fn,other,other_split",
    [
        (lambda x, y: x * y, torch.randn(1, T, 1), None),  # size 1 on the split dim
        (lambda x, y: x + y, torch.randn(T, 1), None),  # fewer dims
        (lambda x, y: x * y, X, Split(2, 0, 24)),  # split alike
    ],
)
def test_broadcasting_op_keeps_the_split(fn, other, other_split):
    gm = traced(fn, X, other)
    splits = {node(gm, "x"): Split(2, 0, 24)} | ({node(gm, "y"): other_split} if other_split else {})
    out = next(iter(gm.graph.find_nodes(op="output"))).args[0]
    assert propagate(out, splits) == Propagated(Split(2, 0, 24))


def test_ops_on_tensors_split_differently_cannot_shard():
    with pytest.raises(CannotShard, match="split differently"):
        rule_of(lambda x, y: x + y, [X, X], {"x": Split(2, 0, 24), "y": Split(2, 24, 12)}, "add")


def test_split_tensor_mixed_with_a_whole_one_cannot_shard():
    with pytest.raises(CannotShard, match="mixes a split tensor with a whole one"):
        rule_of(lambda x, w: x * w, [X, torch.randn(36)], {"x": Split(2, 0, 24)}, "mul")


def test_matmul_contracting_the_split_dim_cannot_shard():
    with pytest.raises(CannotShard, match="changes the size of the split dim"):
        rule_of(lambda x, w: x @ w, [X, torch.randn(36, 7)], {"x": Split(2, 0, 24)}, "matmul")


def test_op_with_a_non_tensor_result_cannot_shard():
    with pytest.raises(CannotShard, match="non-tensor result"):
        rule_of(lambda x: x.size(-1), [X], {"x": Split(2, 0, 24)}, "size")


def test_in_place_write_of_a_split_tensor_into_a_whole_cache_splits_the_cache():
    def write(cache, pos, k):
        return cache.index_copy_(2, pos, k)

    inputs = [torch.zeros(1, KV_HEADS, 8, HEAD), torch.arange(T), torch.randn(1, KV_HEADS, T, HEAD)]
    gm = traced(write, *inputs)
    with pytest.raises(CacheIsSplit) as found:
        propagate(node(gm, "index_copy_"), {node(gm, "k"): Split(1, 2, 1)})
    assert (found.value.cache, found.value.split) == (node(gm, "cache"), Split(1, 2, 1))


# ----- reductions, softmax, concatenation: along another dim only -----

SCORES = torch.randn(1, Q_HEADS, T, T)


@pytest.mark.parametrize(
    "fn,name",
    [
        (lambda x: x.softmax(-1), "softmax"),
        (lambda x: x.sum(-1, keepdim=True), "sum_1"),
        (lambda x: torch.cat([x, x], dim=-1), "cat"),
    ],
)
def test_reduction_along_another_dim_keeps_the_split(fn, name):
    assert rule_of(fn, [SCORES], {"x": Split(1, 0, 6)}, name) == Propagated(Split(1, 0, 6))


@pytest.mark.parametrize(
    "fn,name",
    [
        (lambda x: x.softmax(1), "softmax"),
        (lambda x: x.sum(dim=1, keepdim=True), "sum_1"),
        (lambda x: torch.cat([x, x], dim=1), "cat"),
    ],
)
def test_reduction_over_the_split_dim_cannot_shard(fn, name):
    with pytest.raises(CannotShard):
        rule_of(fn, [SCORES], {"x": Split(1, 0, 6)}, name)


def test_reduction_of_a_split_tensor_to_a_scalar_cannot_shard():
    with pytest.raises(CannotShard, match="reduces the split dim away"):
        rule_of(lambda x: x.mean(), [SCORES], {"x": Split(1, 0, 6)}, "mean")


# ----- a whole sub-block, one rank at a time -----


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """Stands for the all-reduce: each rank's graph returns its partial sum, added up below."""
    return x


def copy_to_ranks(x: torch.Tensor) -> torch.Tensor:
    return x


def attention_block(x, wq, wk, wv, wo):
    q = F.linear(x, wq).view(1, T, Q_HEADS, HEAD).transpose(1, 2)
    k = F.linear(x, wk).view(1, T, KV_HEADS, HEAD).transpose(1, 2)
    v = F.linear(x, wv).view(1, T, KV_HEADS, HEAD).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return x + F.linear(o.transpose(1, 2).reshape(1, T, Q_HEADS * HEAD), wo)


def repeat_kv_block(x, wq, wk, wv, wo):
    q = F.linear(x, wq).view(1, T, Q_HEADS, HEAD).transpose(1, 2)
    k = repeat_kv(F.linear(x, wk).view(1, T, KV_HEADS, HEAD).transpose(1, 2))
    v = repeat_kv(F.linear(x, wv).view(1, T, KV_HEADS, HEAD).transpose(1, 2))
    o = (q @ k.transpose(2, 3) / HEAD**0.5).softmax(dim=-1) @ v
    return x + F.linear(o.transpose(1, 2).reshape(1, T, Q_HEADS * HEAD), wo)


def mlp_block(x, w_gate, w_up, w_down):
    return x + F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def small_random(*shapes: tuple[int, ...]) -> list[torch.Tensor]:
    """Inputs and weights of the order of 0.25, so float32 sums in another order stay close."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator) / 4 for shape in shapes]


def attention_weights() -> list[torch.Tensor]:
    q, kv = Q_HEADS * HEAD, KV_HEADS * HEAD
    return small_random((1, T, 16), (q, 16), (kv, 16), (kv, 16), (16, q))


def mlp_weights() -> list[torch.Tensor]:
    return small_random((1, T, 16), (6, 16), (6, 16), (16, 6))


def one_block_layer(gm: fx.GraphModule) -> Layer:
    """The whole graph as one layer whose output ``x + delta`` is its only sub-block."""
    add = next(iter(gm.graph.find_nodes(op="output"))).args[0]
    nodes = {n for n in gm.graph.nodes if n.op not in ("placeholder", "output")}
    block = SubBlock(stream=add.args[0], add=add, deltas=[add.args[1]])
    return Layer(index=0, path="layers.0", cls="Block", nodes=nodes, blocks=[block])


def sharded(fn, inputs: list[torch.Tensor], rank: int, world: int) -> fx.GraphModule:
    gm = traced(fn, *inputs)
    assert shard_sub_block(one_block_layer(gm), 0, rank, world, sum_over_ranks, copy_to_ranks) == 1
    gm.recompile()
    return gm


def sizes_written(gm: fx.GraphModule, kind: str) -> list[tuple]:
    return [tuple(n.args[1:]) for n in gm.graph.nodes if n.op == "call_method" and n.target == kind]


@pytest.mark.parametrize(
    "fn,weights", [(attention_block, attention_weights), (repeat_kv_block, attention_weights), (mlp_block, mlp_weights)]
)
def test_partial_outputs_of_all_ranks_add_up_to_the_whole_block(fn, weights):
    inputs, world = weights(), 2
    x = inputs[0]
    partials = [sharded(fn, inputs, rank, world)(*inputs) - x for rank in range(world)]
    torch.testing.assert_close(x + sum(partials), fn(*inputs))


@pytest.mark.parametrize("rank,q_heads,kv_heads", [(0, 6, 2), (1, 3, 1)])
def test_gqa_block_on_two_ranks_gets_whole_kv_groups(rank, q_heads, kv_heads):
    gm = sharded(attention_block, attention_weights(), rank, 2)
    assert sizes_written(gm, "view") == [(1, T, q_heads, HEAD), (1, T, kv_heads, HEAD), (1, T, kv_heads, HEAD)]
    assert sizes_written(gm, "reshape") == [(1, T, q_heads * HEAD)]
    narrowed = {n.args[0].name: n.args[1:] for n in gm.graph.nodes if n.target is torch.narrow}
    first_kv = 0 if rank == 0 else 2
    assert narrowed == {
        "wq": (0, first_kv * 3 * HEAD, q_heads * HEAD),
        "wk": (0, first_kv * HEAD, kv_heads * HEAD),
        "wv": (0, first_kv * HEAD, kv_heads * HEAD),
        "wo": (1, first_kv * 3 * HEAD, q_heads * HEAD),
    }


def test_kv_cache_is_written_by_each_rank_in_its_own_heads():
    def cached_block(x, wq, wk, wv, wo, k_cache, v_cache, pos):
        q = F.linear(x, wq).view(1, T, Q_HEADS, HEAD).transpose(1, 2)
        k_cache.index_copy_(2, pos, F.linear(x, wk).view(1, T, KV_HEADS, HEAD).transpose(1, 2))
        v_cache.index_copy_(2, pos, F.linear(x, wv).view(1, T, KV_HEADS, HEAD).transpose(1, 2))
        o = F.scaled_dot_product_attention(q, k_cache[:, :, :T], v_cache[:, :, :T], enable_gqa=True)
        return x + F.linear(o.transpose(1, 2).reshape(1, T, Q_HEADS * HEAD), wo)

    def fresh_inputs() -> list[torch.Tensor]:
        caches = [torch.zeros(1, KV_HEADS, 8, HEAD) for _ in range(2)]
        return [*attention_weights(), *caches, torch.arange(T)]

    whole = fresh_inputs()
    expected = cached_block(*whole)
    partials, kv_heads = [], [slice(0, 2), slice(2, 3)]
    for rank in range(2):
        inputs = fresh_inputs()
        partials.append(sharded(cached_block, inputs, rank, 2)(*inputs) - inputs[0])
        for cache, whole_cache in zip(inputs[5:7], whole[5:7]):
            torch.testing.assert_close(cache[:, kv_heads[rank]], whole_cache[:, kv_heads[rank]])
            assert not cache[:, kv_heads[1 - rank]].any()
    torch.testing.assert_close(whole[0] + sum(partials), expected)


def test_block_reducing_over_the_split_features_cannot_shard_and_is_left_unchanged():
    def normed_mlp(x, w_gate, w_up, w_down):
        h = F.linear(x, w_gate)
        return x + F.linear(h / h.sum(-1, keepdim=True) * F.linear(x, w_up), w_down)

    gm = traced(normed_mlp, *mlp_weights())
    before = gm.code
    with pytest.raises(CannotShard, match="split dim"):
        shard_sub_block(one_block_layer(gm), 0, 0, 2, sum_over_ranks, copy_to_ranks)
    gm.recompile()
    assert gm.code == before


def test_more_ranks_than_kv_heads_is_refused_naming_the_head_count():
    gm = traced(attention_block, *attention_weights())
    with pytest.raises(TooFewHeads, match="only 3 key/value heads") as refused:
        shard_sub_block(one_block_layer(gm), 0, 0, 4, sum_over_ranks, copy_to_ranks)
    assert refused.value.units == KV_HEADS
