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
holds (:class:`Split`), rewrite the size constants to local sizes, and narrow the weights and
the KV cache. The graph stays plain tensors: no DTensor dispatch per op, one all-reduce per
sub-block. Anything the propagation does not understand raises :class:`CannotShard`, and the
caller keeps that layer replicated.

Node metadata (``example_value``) keeps the global shapes; the propagation reads only those.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

from .collectives import insert_after
from .config import LayerParallelError
from .find_layers import Layer, SubBlock, example_value, is_add
from .fx_utils import in_graph_order, mutated_input

_LINEAR = torch._C._nn.linear
_VIEWS = {"view", "reshape"}
# Ops whose ``dim`` argument (keyword, or the positional one at index 1) must not be the split dim.
_DIM_OPS = {
    "softmax", "log_softmax", "sum", "mean", "amax", "amin", "max", "min", "cumsum", "cat", "concat",
    "split", "chunk", "argmax", "norm", "var", "std", "prod", "logsumexp", "stack", "flatten",
}


class CannotShard(Exception):
    """This sub-block cannot be split by the propagation; the layer stays replicated."""


class TooFewHeads(LayerParallelError):
    """The mesh cannot give every rank whole key/value heads of a layer: it has only ``units``."""

    def __init__(self, message: str, units: int) -> None:
        super().__init__(message)
        self.units = units


def mesh_sizes_for(units: int) -> list[int]:
    """The mesh sizes over which ``units`` heads split (``torch.chunk`` style) with some for every rank."""
    return [w for w in range(1, units + 1) if (w - 1) * math.ceil(units / w) < units]


@dataclass(frozen=True)
class Split:
    """A tensor of which this rank holds ``[start, start + size)`` along ``dim`` (global indices)."""

    dim: int
    start: int
    size: int


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
    region = _descendants(_stream_of(block, layer), allowed)
    linears = [n for n in in_graph_order(region) if _is_linear(n)]
    if not linears:
        return 0
    columns = _column_linears(linears, region)
    plan = _plan(allowed, region, columns, _column_splits(layer, columns, rank, world), {})
    _apply(plan, rank, sum_target, copy_target)
    return len(plan.rows)


def _stream_of(block: SubBlock, layer: Layer) -> fx.Node:
    """The stream ``block.add`` adds to now (``block.stream`` is stale after a pair before it)."""
    node = block.add
    while node is block.add or (node in layer.nodes and is_add(node) and any(d in node.args for d in block.deltas)):
        node = next(a for a in node.args if a not in block.deltas)
    return node


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
    return node.op == "call_function" and node.target is _LINEAR


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
    for column, n in zip(columns, heads):
        features = _shape(column)[-1]
        per_unit = features // units
        splits[column] = Split(len(_shape(column)) - 1, first * per_unit, (last - first) * per_unit)
    return splits


def _heads_of(linear: fx.Node) -> int:
    """How many heads the linear's output features form: the view that splits them, else one each."""
    features = _shape(linear)[-1]
    for user in linear.users:
        if _method_or_function(user) in _VIEWS:
            out = _shape(user)
            if len(out) == len(_shape(linear)) + 1 and out[-2] * out[-1] == features:
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
            result = _propagate(node, splits)
        except _CacheIsSplit as found:
            grown = region | _descendants(found.cache, allowed)
            return _plan(allowed, grown, columns, seeds, caches | {found.cache: found.split})
        if result is not None:
            splits[node], args = result
            if args is not None:
                new_args[node] = args
    _check_contained(region, {n: s for n, s in splits.items() if n not in caches}, rows)
    return _Plan(splits=splits, new_args=new_args, caches=caches, columns=columns, rows=rows)


def _row(node: fx.Node, splits: dict[fx.Node, Split]) -> fx.Node:
    x, weight = node.args[0], node.args[1]
    split = splits.get(x)
    if split is None or split.dim != len(_shape(x)) - 1 or weight in splits:
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


class _CacheIsSplit(Exception):
    def __init__(self, cache: fx.Node, split: Split) -> None:
        super().__init__(cache.name)
        self.cache, self.split = cache, split


def _propagate(node: fx.Node, splits: dict[fx.Node, Split]) -> tuple[Split, tuple | None] | None:
    """The split of ``node``'s output and its new positional args (None: unchanged)."""
    kind = _method_or_function(node)
    x = node.args[0] if node.args else None
    if kind in _VIEWS and x in splits:
        return _view(node, splits[x])
    if kind == "expand" and x in splits:
        return _expand(node, splits[x])
    if kind in ("transpose", "permute", "unsqueeze", "squeeze", "t") and x in splits:
        return _reorder(node, kind, splits[x]), None
    if kind == "getitem" and x in splits:
        return _index(node, splits[x]), None
    if kind == "scaled_dot_product_attention" and node.kwargs.get("enable_gqa"):
        return _gqa_attention(node, splits), None
    return _pointwise(node, splits), None


def _method_or_function(node: fx.Node) -> str | None:
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        if node.target is operator.getitem:
            return "getitem"
        return getattr(node.target, "__name__", None)
    return None


def _sizes(node: fx.Node) -> list:
    """Size arguments of view/reshape/expand, given as ``f(x, 1, 2)`` or ``f(x, (1, 2))``."""
    rest = list(node.args[1:])
    if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)):
        return list(rest[0])
    return rest


def _with_sizes(node: fx.Node, sizes: list) -> tuple:
    rest = node.args[1:]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)):
        return (node.args[0], tuple(sizes))
    return (node.args[0], *sizes)


def _localised(node: fx.Node, dim: int, size: int) -> tuple:
    sizes = _sizes(node)
    if len(sizes) != len(_shape(node)):
        raise CannotShard(f"{node.name}: cannot read its sizes")
    old = sizes[dim]
    if isinstance(old, int) and old == -1:
        return _with_sizes(node, sizes)
    if not isinstance(old, int):
        raise CannotShard(f"{node.name}: symbolic size on the split dim")
    sizes[dim] = size
    return _with_sizes(node, sizes)


def _view(node: fx.Node, split: Split) -> tuple[Split, tuple]:
    """A reshape maps the split dim to the outer dim of its group (``(.., 576) -> (.., 9, 64)``)."""
    src, dst = _shape(node.args[0]), _shape(node)
    for in_dims, out_dims in _groups(src, dst):
        if split.dim not in in_dims:
            continue
        if any(src[d] != 1 for d in in_dims[: in_dims.index(split.dim)]):
            raise CannotShard(f"{node.name}: the split dim is not the outer one of its reshape group")
        inner_in = math.prod(src[d] for d in in_dims[in_dims.index(split.dim) + 1 :])
        outer = next((d for d in out_dims if dst[d] != 1), out_dims[0])
        inner_out = math.prod(dst[d] for d in out_dims[out_dims.index(outer) + 1 :])
        start, size = split.start * inner_in, split.size * inner_in
        if start % inner_out or size % inner_out:
            raise CannotShard(f"{node.name}: the reshape cuts through a head")
        out = Split(outer, start // inner_out, size // inner_out)
        return out, _localised(node, outer, out.size)
    raise CannotShard(f"{node.name}: reshape not understood")


def _groups(src: tuple, dst: tuple) -> list[tuple[list[int], list[int]]]:
    """Pair up runs of dims with equal products: ``(1, 1, 576) / (1, 1, 9, 64)`` ->
    ``[([0], [0]), ([1], [1]), ([2], [2, 3])]``."""
    groups, i, j = [], 0, 0
    while i < len(src) and j < len(dst):
        gi, gj, pi, pj = [i], [j], src[i], dst[j]
        if not isinstance(pi, int) or not isinstance(pj, int):
            # A symbolic size (a dynamic sequence length) only maps onto the same symbol.
            if str(pi) != str(pj):
                raise CannotShard("reshape with symbolic sizes")
            groups.append((gi, gj))
            i, j = i + 1, j + 1
            continue
        while pi != pj:
            if pi < pj and i + 1 < len(src) and isinstance(src[i + 1], int):
                i += 1
                gi.append(i)
                pi *= src[i]
            elif pj < pi and j + 1 < len(dst) and isinstance(dst[j + 1], int):
                j += 1
                gj.append(j)
                pj *= dst[j]
            else:
                raise CannotShard("reshape not understood")
        groups.append((gi, gj))
        i, j = i + 1, j + 1
    if i < len(src) or j < len(dst):
        leftover = (list(range(i, len(src))), list(range(j, len(dst))))
        if groups and all(src[d] == 1 for d in leftover[0]) and all(dst[d] == 1 for d in leftover[1]):
            groups[-1] = (groups[-1][0] + leftover[0], groups[-1][1] + leftover[1])
        else:
            raise CannotShard("reshape not understood")
    return groups


def _expand(node: fx.Node, split: Split) -> tuple[Split, tuple]:
    dim = split.dim + len(_shape(node)) - len(_shape(node.args[0]))
    return Split(dim, split.start, split.size), _localised(node, dim, split.size)


def _reorder(node: fx.Node, kind: str, split: Split) -> Split:
    in_rank, out_rank = len(_shape(node.args[0])), len(_shape(node))
    args = [a for a in node.args[1:]]
    d = split.dim
    if kind in ("transpose", "t"):
        d0, d1 = (args if kind == "transpose" else (0, 1))
        d0, d1 = d0 % in_rank, d1 % in_rank
        dim = d1 if d == d0 else d0 if d == d1 else d
    elif kind == "permute":
        dims = [a % in_rank for a in (args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args)]
        dim = dims.index(d)
    elif kind == "unsqueeze":
        k = _dim_arg(node) % out_rank
        dim = d if d < k else d + 1
    else:
        k = _dim_arg(node)
        if k is None or k % in_rank == d:
            raise CannotShard(f"{node.name}: squeeze of the split dim")
        dim = d if d < k % in_rank else d - 1
    return Split(dim, split.start, split.size)


def _index(node: fx.Node, split: Split) -> Split:
    """``x[..., :8]``, ``x[:, :, None]``: where the split dim lands; it must be taken whole."""
    idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    rank = len(_shape(node.args[0]))
    consuming = sum(1 for i in idx if i is not None and i is not Ellipsis)
    items: list = []
    for i in idx:
        items.extend([slice(None)] * (rank - consuming) if i is Ellipsis else [i])
    items.extend([slice(None)] * (rank - sum(1 for i in items if i is not None)))
    in_dim = out_dim = 0
    for item in items:
        if item is None:
            out_dim += 1
            continue
        if not isinstance(item, (int, slice)):
            raise CannotShard(f"{node.name}: indexing by {type(item).__name__}")
        if in_dim == split.dim:
            if item != slice(None):
                raise CannotShard(f"{node.name}: indexes into the split dim")
            return Split(out_dim, split.start, split.size)
        in_dim += 1
        out_dim += isinstance(item, slice)
    raise CannotShard(f"{node.name}: indexing not understood")


def _gqa_attention(node: fx.Node, splits: dict[fx.Node, Split]) -> Split:
    """``sdpa(q, k, v, enable_gqa=True)``: q holds ``group`` times the heads of k and v."""
    q, k, v = node.args[:3]
    if not all(t in splits and splits[t].dim == 1 for t in (q, k, v)) or splits[k] != splits[v]:
        raise CannotShard(f"{node.name}: query/key/value heads not split alike")
    group = _shape(q)[1] // _shape(k)[1]
    sq, sk = splits[q], splits[k]
    if (sq.start, sq.size) != (sk.start * group, sk.size * group):
        raise CannotShard(f"{node.name}: query heads do not follow their key/value group")
    mask = node.kwargs.get("attn_mask")
    if isinstance(mask, fx.Node) and (mask in splits or len(_shape(mask)) != 4 or _shape(mask)[1] != 1):
        raise CannotShard(f"{node.name}: an attention mask with a head dim")
    return sq


def _pointwise(node: fx.Node, splits: dict[fx.Node, Split]) -> Split:
    """Broadcasting ops (mul, silu, sdpa, matmul over batch dims, in-place cache writes, ...)."""
    out = example_value(node)
    if not isinstance(out, torch.Tensor):
        raise CannotShard(f"{node.name}: a split tensor flows into a non-tensor result")
    dst = _shape(node)
    inputs = [i for i in node.all_input_nodes if isinstance(example_value(i), torch.Tensor)]
    aligned = {
        Split(splits[i].dim + len(dst) - len(_shape(i)), splits[i].start, splits[i].size) for i in inputs if i in splits
    }
    if len(aligned) != 1:
        raise CannotShard(f"{node.name}: inputs split differently")
    split = aligned.pop()
    for i in inputs:
        src = _shape(i)
        k = split.dim - (len(dst) - len(src))
        if i in splits:
            if k < 0 or str(src[k]) != str(dst[split.dim]):
                raise CannotShard(f"{node.name}: changes the size of the split dim")
        elif k >= 0 and str(src[k]) != "1":
            if i is mutated_input(node):
                raise _CacheIsSplit(i, Split(k, split.start, split.size))
            raise CannotShard(f"{node.name}: mixes a split tensor with a whole one ({i.name})")
    if _method_or_function(node) in _DIM_OPS:
        dim = _dim_arg(node)
        if dim is None or dim % len(dst) == split.dim:
            raise CannotShard(f"{node.name}: reduces or concatenates along the split dim")
    return split


def _dim_arg(node: fx.Node) -> int | None:
    if "dim" in node.kwargs:
        return node.kwargs["dim"]
    return node.args[1] if len(node.args) > 1 and isinstance(node.args[1], int) else None


def _shape(node: fx.Node) -> tuple:
    value = example_value(node)
    return tuple(int(d) if isinstance(d, int) else d for d in value.shape)


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

