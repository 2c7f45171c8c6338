"""Rewrite chosen layer pairs so both layers read the same input and their updates are summed,
or so that the second layer is skipped.

For a pair (A, B) with residual sub-blocks ``s_{j+1} = s_j + f_j(s_j)``:

- ``lp``:    ``s_{j+1} = s_j + (fA_j(s_j) + fB_j(s_j))`` for each sub-block j (the paper's form);
- ``block``: ``out = x + ((A(x) - x) + (B(x) - x))``;
- ``prune`` and ``merge``: ``out = A(x)``; what reads B's output reads its input instead and B's
  compute is erased, its KV-cache writes included (``merge`` also swaps A's weights for the
  averages, see :mod:`lp_fx.merge`; the graph is the same).

Every ``(branch A delta) + (branch B delta)`` node is recorded in :class:`PairRewrite` with the
nodes of each branch, so that placement can compute one branch per device and replace the sum by
a collective. Placeholders, the other layers and each layer's KV-cache writes are left as they were.
Pairs are rewritten from the last to the first, so that each reads its layers as they were found:
rewriting a pair changes only what reads its output, which is the input of the pairs after it.
The layers of an ``lp`` pair share their streams afterwards, which no longer pass through either
as ``x + f(x)``: :func:`lp_layers` describes them as the rewrite left them.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import fx

from .config import SKIP_MODES, Pair
from .find_layers import Layer, LayerStack, SubBlock, example_value
from .fx_utils import erase_skipped_layer, erase_unused, stable_topological_sort


@dataclass
class PairRewrite:
    """What one rewritten pair left in the graph."""

    pair: Pair
    mode: str
    branches: tuple[set[fx.Node], set[fx.Node]]
    combines: list[fx.Node]


def pair_problem(a: Layer, b: Layer, mode: str) -> str | None:
    """Why the pair (a, b) cannot be rewritten in ``mode``, or None when it can."""
    if mode in SKIP_MODES:
        return skip_problem(b)
    for layer in (a, b):
        if layer.input is None or layer.output is None:
            return f"layer {layer.index} ({layer.path}): {layer.problem}"
        if mode == "lp" and not layer.residual:
            return f"layer {layer.index} ({layer.path}): {layer.problem}"
    if b.input is not a.output:
        return f"layer {b.index} does not read the output of layer {a.index} in this graph"
    if mode == "lp" and len(a.blocks) != len(b.blocks):
        return (
            f"layers {a.index} and {b.index} have {len(a.blocks)} and {len(b.blocks)} residual sub-blocks; "
            "mode='lp' sums them one to one, use mode='block'"
        )
    return None


def skip_problem(layer: Layer) -> str | None:
    """Why ``layer`` cannot be skipped (its output replaced by its input), or None when it can."""
    if layer.input is None or layer.output is None:
        return f"layer {layer.index} ({layer.path}): {layer.problem}"
    return None


def rewrite_pairs(gm: fx.GraphModule, stack: LayerStack, pairs: list[tuple[Pair, str]]) -> list[PairRewrite]:
    """Rewrite each ``(pair, mode)`` (already checked with :func:`pair_problem`) and tidy the graph.

    Returns what the summed pairs (``lp``, ``block``) left in the graph, in the order of ``pairs``;
    a skipped layer leaves nothing.
    """
    graph = gm.graph
    done, skipped = [], []
    for (i, j), mode in reversed(pairs):
        b = stack.layers[j]
        if mode in SKIP_MODES:
            _skip(b)
            skipped.append(b)
        else:
            a = stack.layers[i]
            done.append(_rewrite_lp(graph, a, b) if mode == "lp" else _rewrite_block(graph, a, b))
    done.reverse()
    for layer in skipped:
        erase_skipped_layer(layer.nodes, layer.input)
    if done:
        stable_topological_sort(graph)
        erase_unused(set().union(*(r.branches[0] | r.branches[1] for r in done)))
        live = set(graph.nodes)
        for r in done:
            r.branches = (r.branches[0] & live, r.branches[1] & live)
    if pairs:
        graph.lint()
        gm.recompile()
    return done


def lp_layers(rewrite: PairRewrite, stack: LayerStack) -> dict[int, Layer]:
    """The two layers of an ``lp`` pair as the graph holds them now (none for another mode): each
    the nodes of its branch, its sub-block j reading the pair's stream ``s_j`` and adding its delta
    into ``s_(j+1) = s_j + (delta_A + delta_B)``."""
    if rewrite.mode != "lp":
        return {}
    layers = {}
    for side, index in enumerate(rewrite.pair):
        blocks = []
        for combine in rewrite.combines:
            stream_add = next(iter(combine.users))
            blocks.append(SubBlock(stream=stream_add.args[0], add=stream_add, deltas=[combine.args[side]]))
        found = stack.layers[index]
        layers[index] = Layer(
            index=index, path=found.path, cls=found.cls, nodes=rewrite.branches[side], blocks=blocks,
            input=blocks[0].stream, output=blocks[-1].add,
        )
    return layers


def _skip(layer: Layer) -> None:
    """Make everything outside ``layer`` that read its output read its input."""
    layer.output.replace_all_uses_with(layer.input, delete_user_cb=lambda user: user not in layer.nodes)


def _rewrite_lp(graph: fx.Graph, a: Layer, b: Layer) -> PairRewrite:
    stream = a.input
    branch_a, branch_b = set(a.nodes), set(b.nodes)
    combines = []
    for block_a, block_b in zip(a.blocks, b.blocks):
        for layer, block in ((a, block_a), (b, block_b)):
            if block.stream is not stream:
                _rewire(layer.nodes - {block.add}, block.stream, stream)
        with graph.inserting_after(block_b.add):
            delta_a = sum_deltas(graph, block_a.deltas, branch_a)
            delta_b = sum_deltas(graph, block_b.deltas, branch_b)
            combine, stream = pair_sum(graph, stream, delta_a, delta_b, like=block_b.add)
        combines.append(combine)
    b.output.replace_all_uses_with(stream, delete_user_cb=lambda user: user not in b.nodes)
    return PairRewrite(pair=(a.index, b.index), mode="lp", branches=(branch_a, branch_b), combines=combines)


def _rewrite_block(graph: fx.Graph, a: Layer, b: Layer) -> PairRewrite:
    x = a.input
    _rewire(b.nodes, b.input, x)
    with graph.inserting_after(b.output):
        delta_a = new_node(graph, operator.sub, a.output, x, like=a.output)
        delta_b = new_node(graph, operator.sub, b.output, x, like=b.output)
        combine, out = pair_sum(graph, x, delta_a, delta_b, like=b.output)
    b.output.replace_all_uses_with(out, delete_user_cb=lambda user: user not in b.nodes and user is not delta_b)
    branches = (set(a.nodes) | {delta_a}, set(b.nodes) | {delta_b})
    return PairRewrite(pair=(a.index, b.index), mode="block", branches=branches, combines=[combine])


def _rewire(users: set[fx.Node], old: fx.Node, new: fx.Node) -> None:
    for user in users:
        if old in user.all_input_nodes:
            user.replace_input_with(old, new)


def pair_sum(
    graph: fx.Graph, stream: fx.Node, delta_a: fx.Node, delta_b: fx.Node, like: fx.Node
) -> tuple[fx.Node, fx.Node]:
    """``stream + (delta_a + delta_b)`` as new nodes: returns the combine (the sum of the two
    branches' deltas) and the new stream. Both modes sum this way, and so does the gated graph."""
    combine = new_node(graph, operator.add, delta_a, delta_b, like=like)
    return combine, new_node(graph, operator.add, stream, combine, like=like)


def sum_deltas(graph: fx.Graph, deltas: list[fx.Node], branch: set[fx.Node]) -> fx.Node:
    """``deltas[0] + deltas[1] + ...`` left to right; the added nodes join ``branch``."""
    total = deltas[0]
    for d in deltas[1:]:
        total = new_node(graph, operator.add, total, d, like=d)
        branch.add(total)
    return total


def new_node(graph: fx.Graph, fn: Callable, *args: Any, like: fx.Node) -> fx.Node:
    """``fn(*args)`` as a new node, with the example value of ``like`` (same shape and dtype)."""
    node = graph.call_function(fn, args)
    value = example_value(like)
    if value is not None:
        node.meta["example_value"] = value
    return node
