"""Megatron tensor parallelism of one residual sub-block, done on the FX graph.

In each sub-block the *column* linears (those reading the normed sub-block input: q/k/v, gate/up)
keep a slice of their output features on each rank, and the *row* linear (o_proj, down_proj)
keeps the matching slice of its input features, so its output is a per-rank partial sum that one
all-reduce (:func:`collectives.sum_over`) completes. Column inputs go through
:func:`collectives.copy_to` so that backward sums their gradients.

Why the graph is localised instead of run as DTensor: Dynamo bakes head counts into
``view``/``reshape``/``expand`` arguments (``view(1, 8, -1, 16)``, GQA ``expand(1, 2, 2, 8, 16)``),
and the split must follow key/value-head groups (SmolLM2: 9 query / 3 KV heads on 2 ranks is
6+3 query heads over 2+1 KV heads), which DTensor's even ``Shard`` cannot express. So we
propagate, from the column linears, which dim of each tensor is split and which slice a rank
holds (:class:`~shard_rules.Split`, by the per-op rules of :mod:`shard_rules`), rewrite the size
constants to local sizes, and narrow the weights and the KV cache. The graph stays plain tensors:
no DTensor dispatch per op, one all-reduce per sub-block. Anything the propagation does not
understand raises :class:`CannotShard`, and the caller keeps that layer replicated.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

from .collectives import insert_after
from .config import LayerParallelError
from .find_layers import Layer, example_value
from .fx_utils import LINEAR, in_graph_order
from .shard_rules import VIEWS, CacheIsSplit, CannotShard, Split, method_or_function, propagate, shape_of


class TooFewHeads(LayerParallelError):
    """The mesh cannot give every rank whole key/value heads of a layer: it has only ``units``."""

    def __init__(self, message: str, units: int) -> None:
        super().__init__(message)
        self.units = units


def mesh_sizes_for(units: int) -> list[int]:
    """The mesh sizes over which ``units`` heads split (``torch.chunk`` style) with some for every rank."""
    return [w for w in range(1, units + 1) if (w - 1) * math.ceil(units / w) < units]


@dataclass
class _Plan:
    """What to change in the graph for one sub-block on one rank."""

    splits: dict[fx.Node, Split]
    new_args: dict[fx.Node, tuple]
    caches: dict[fx.Node, Split]
    columns: list[fx.Node]
    rows: list[fx.Node]


def shard_sub_block(
    layer: Layer, block_index: int, rank: int, world: int, sum_target: Callable, copy_target: Callable
) -> int:
    """Split sub-block ``block_index`` of ``layer`` over ``world`` ranks; returns the all-reduces added.

    Raises :class:`CannotShard` (nothing changed) when the sub-block is not understood, and
    :class:`LayerParallelError` when the mesh is too large for the layer's heads.
    """
    block = layer.blocks[block_index]
    allowed = layer.nodes - _descendants(block.add, layer.nodes) - {block.add}
    region = _descendants(block.stream, allowed)
    linears = [n for n in in_graph_order(region) if _is_linear(n)]
    if not linears:
        return 0
    columns = _column_linears(linears, region)
    plan = _plan(allowed, region, columns, _column_splits(layer, columns, rank, world), {})
    _apply(plan, rank, sum_target, copy_target)
    return len(plan.rows)


def _descendants(node: fx.Node, within: set[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = [u for u in node.users if u in within]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(u for u in n.users if u in within)
    return seen


def _is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is LINEAR


def _column_linears(linears: list[fx.Node], region: set[fx.Node]) -> list[fx.Node]:
    """Linears whose input does not depend on another linear of the sub-block."""
    after_linear: set[fx.Node] = set()
    columns = []
    for n in in_graph_order(region):
        if any(i in after_linear or _is_linear(i) for i in n.all_input_nodes if i in region):
            after_linear.add(n)
        elif _is_linear(n):
            columns.append(n)
    return columns


def _column_splits(layer: Layer, columns: list[fx.Node], rank: int, world: int) -> dict[fx.Node, Split]:
    """Each column linear's output slice on ``rank``: whole heads, whole key/value groups.

    Every column linear has ``n_i`` heads (output features reshaped into ``(n_i, head_dim)``, or
    one "head" per feature for an MLP). The smallest count ``n`` (the KV heads under GQA) is split
    like ``torch.chunk``; linear ``i`` takes the same fraction, ``n_i / n`` heads per unit.
    """
    heads = [_heads_of(c) for c in columns]
    units = min(heads)
    if units < world:
        raise TooFewHeads(
            f"a mesh of {world} devices cannot split layer {layer.index} ({layer.path}): it has only "
            f"{units} key/value heads (or features) to share out; use a mesh of at most {units} devices, "
            "or tp=False to keep the non-paired layers replicated",
            units,
        )
    if any(h % units for h in heads):
        raise CannotShard(f"head counts {heads} are not multiples of {units}")
    chunk = math.ceil(units / world)
    first, last = min(rank * chunk, units), min((rank + 1) * chunk, units)
    if first == last:
        raise TooFewHeads(
            f"a mesh of {world} devices cannot split the {units} key/value heads of layer {layer.index} "
            f"({layer.path}) so that every rank gets one; use a mesh size that divides {units}",
            units,
        )
    splits = {}
    for column in columns:
        features = shape_of(column)[-1]
        per_unit = features // units
        splits[column] = Split(len(shape_of(column)) - 1, first * per_unit, (last - first) * per_unit)
    return splits


def _heads_of(linear: fx.Node) -> int:
    """How many heads the linear's output features form: the view that splits them, else one each."""
    features = shape_of(linear)[-1]
    for user in linear.users:
        if method_or_function(user) in VIEWS:
            out = shape_of(user)
            if len(out) == len(shape_of(linear)) + 1 and out[-2] * out[-1] == features:
                return out[-2]
    return features


def _plan(
    allowed: set[fx.Node],
    region: set[fx.Node],
    columns: list[fx.Node],
    seeds: dict[fx.Node, Split],
    caches: dict[fx.Node, Split],
) -> _Plan:
    """Propagate the splits through the region (the sub-block's nodes computed from its stream,
    and from its split KV caches); restart when a KV cache turns out to be split."""
    splits = dict(seeds) | dict(caches)
    new_args: dict[fx.Node, tuple] = {}
    rows = []
    for node in in_graph_order(region):
        if node in seeds:
            continue
        split_inputs = [i for i in node.all_input_nodes if i in splits]
        if not split_inputs:
            continue
        if _is_linear(node):
            rows.append(_row(node, splits))
            continue
        try:
            splits[node], args = propagate(node, splits)
        except CacheIsSplit as found:
            grown = region | _descendants(found.cache, allowed)
            return _plan(allowed, grown, columns, seeds, caches | {found.cache: found.split})
        if args is not None:
            new_args[node] = args
    _check_contained(region, {n: s for n, s in splits.items() if n not in caches}, rows)
    return _Plan(splits=splits, new_args=new_args, caches=caches, columns=columns, rows=rows)


def _row(node: fx.Node, splits: dict[fx.Node, Split]) -> fx.Node:
    x, weight = node.args[0], node.args[1]
    split = splits.get(x)
    if split is None or split.dim != len(shape_of(x)) - 1 or weight in splits:
        raise CannotShard(f"{node.name}: a linear that is neither column nor row parallel")
    return node


def _check_contained(region: set[fx.Node], splits: dict[fx.Node, Split], rows: list[fx.Node]) -> None:
    """Split tensors stay inside the sub-block (a KV cache stays whole: only its uses are narrowed)."""
    for node in splits:
        outside = [u for u in node.users if u not in region]
        if outside:
            raise CannotShard(f"{node.name} is split but used outside its sub-block by {outside[0].name}")
    if not rows:
        raise CannotShard("no row-parallel linear closes the sub-block")


def _apply(plan: _Plan, rank: int, sum_target: Callable, copy_target: Callable) -> None:
    for node, args in plan.new_args.items():
        node.args = args
    for cache, split in plan.caches.items():
        _narrow_uses(cache, split, plan.splits)
    inputs = {c.args[0] for c in plan.columns}
    for x in inputs:
        with x.graph.inserting_before(min(plan.columns, key=_position)):
            copied = x.graph.call_function(copy_target, (x,))
        copied.meta["example_value"] = example_value(x)
        for column in plan.columns:
            if column.args[0] is x:
                column.replace_input_with(x, copied)
    for column in plan.columns:
        split = plan.splits[column]
        _narrow_arg(column, 1, 0, split)
        if len(column.args) > 2 and column.args[2] is not None:
            _narrow_arg(column, 2, 0, split)
    for row in plan.rows:
        _narrow_arg(row, 1, 1, plan.splits[row.args[0]])
        if len(row.args) > 2 and row.args[2] is not None and rank != 0:
            row.args = (*row.args[:2], None)
        insert_after(row, sum_target)


def _position(node: fx.Node) -> int:
    return next(i for i, n in enumerate(node.graph.nodes) if n is node)


def _narrow(graph_point: fx.Node, tensor: fx.Node, dim: int, split: Split) -> fx.Node:
    with tensor.graph.inserting_before(graph_point):
        narrowed = tensor.graph.call_function(torch.narrow, (tensor, dim, split.start, split.size))
    narrowed.meta["example_value"] = example_value(tensor)
    narrowed.meta["lp_fx_shard"] = (dim, split.start, split.size)
    return narrowed


def _narrow_arg(node: fx.Node, position: int, dim: int, split: Split) -> None:
    args = list(node.args)
    args[position] = _narrow(node, args[position], dim, split)
    node.args = tuple(args)


def _narrow_uses(cache: fx.Node, split: Split, splits: dict[fx.Node, Split]) -> None:
    users = [u for u in cache.users if u in splits]
    narrowed = _narrow(min(users, key=_position), cache, split.dim, split)
    for user in users:
        user.replace_input_with(cache, narrowed)

