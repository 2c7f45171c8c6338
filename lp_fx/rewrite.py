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
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import fx

from .config import SKIP_MODES, Pair
from .find_layers import Layer, LayerStack, example_value
from .fx_utils import erase_skipped_layer, erase_unused, stable_topological_sort


@dataclass
class PairRewrite:
    """What one rewritten pair left in the graph."""

    pair: Pair
    mode: str
    branches: tuple[set[fx.Node], set[fx.Node]]
    combines: list[fx.Node]
    output: fx.Node


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

    Returns what the summed pairs (``lp``, ``block``) left in the graph; a skipped layer leaves nothing.
    """
    graph = gm.graph
    done, skipped = [], []
    for (i, j), mode in pairs:
        b = stack.layers[j]
        old_output = b.output
        if mode in SKIP_MODES:
            new_output = _skip(b)
            skipped.append(b)
        else:
            a = stack.layers[i]
            rewrite = _rewrite_lp(graph, a, b) if mode == "lp" else _rewrite_block(graph, a, b)
            done.append(rewrite)
            new_output = rewrite.output
        follow_new_input(stack.layers.get(j + 1), old_output, new_output)
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


def _skip(layer: Layer) -> fx.Node:
    """Make everything outside ``layer`` that read its output read its input; returns the input."""
    layer.output.replace_all_uses_with(layer.input, delete_user_cb=lambda user: user not in layer.nodes)
    return layer.input


def follow_new_input(layer: Layer | None, old: fx.Node, new: fx.Node) -> None:
    """``layer`` now reads ``new`` where it read ``old`` (the layer after a rewritten pair reads the
    pair's new output); update what we know of it so that a later rewrite (an adjacent pair)
    rewires from the right node."""
    if layer is None or layer.input is not old:
        return
    layer.input = new
    if layer.blocks:
        layer.blocks[0].stream = new


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
    return PairRewrite(
        pair=(a.index, b.index), mode="lp", branches=(branch_a, branch_b), combines=combines, output=stream
    )


def _rewrite_block(graph: fx.Graph, a: Layer, b: Layer) -> PairRewrite:
    x = a.input
    _rewire(b.nodes, b.input, x)
    with graph.inserting_after(b.output):
        delta_a = new_node(graph, operator.sub, a.output, x, like=a.output)
        delta_b = new_node(graph, operator.sub, b.output, x, like=b.output)
        combine, out = pair_sum(graph, x, delta_a, delta_b, like=b.output)
    b.output.replace_all_uses_with(out, delete_user_cb=lambda user: user not in b.nodes and user is not delta_b)
    branches = (set(a.nodes) | {delta_a}, set(b.nodes) | {delta_b})
    return PairRewrite(pair=(a.index, b.index), mode="block", branches=branches, combines=[combine], output=out)


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
