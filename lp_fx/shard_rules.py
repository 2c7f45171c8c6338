"""How a split moves through one op: the per-op rules of :mod:`tensor_parallel`'s propagation.

A :class:`Split` says which dim of a tensor is split and which slice of it this rank holds. A
rule takes an op's node and the splits known so far, and returns the split of the op's output
and, where the op bakes global sizes into its arguments (``view``/``reshape``/``expand``), its
new positional args with the local sizes. :data:`RULES` maps op names (as
:func:`method_or_function` gives them) to their rule: a new op is one rule and one line there.

Ops not in the table are taken as broadcasting ops (``mul``, ``silu``, ``sdpa`` without GQA,
``matmul`` over batch dims, in-place cache writes): :func:`_broadcasting` checks that by shapes,
and raises :class:`CannotShard` when the op changes the size of the split dim, mixes a split
tensor with a whole one, or returns something that is not a tensor.

Node metadata (``example_value``) keeps the global shapes; the rules read only those.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import fx

from .find_layers import example_value
from .fx_utils import mutated_input

# Ops whose ``dim`` argument (keyword, or the positional one at index 1) must not be the split dim.
_DIM_OPS = (
    "softmax", "log_softmax", "sum", "mean", "amax", "amin", "max", "min", "cumsum", "cat", "concat",
    "split", "chunk", "argmax", "norm", "var", "std", "prod", "logsumexp", "stack", "flatten",
)
VIEWS = ("view", "reshape")


class CannotShard(Exception):
    """This sub-block cannot be split by the propagation; the layer stays replicated."""


@dataclass(frozen=True)
class Split:
    """A tensor of which this rank holds ``[start, start + size)`` along ``dim`` (global indices)."""

    dim: int
    start: int
    size: int


class Propagated(NamedTuple):
    """What a rule derives for one node: its output's split and its new positional args."""

    split: Split
    args: tuple | None = None  # None: the args stay as they are


Rule = Callable[[fx.Node, dict[fx.Node, Split]], Propagated]


class CacheIsSplit(Exception):
    """An in-place write stores a split tensor into ``cache``, a whole tensor: the cache's uses
    must be narrowed to ``split`` too (the planner restarts with it)."""

    def __init__(self, cache: fx.Node, split: Split) -> None:
        super().__init__(cache.name)
        self.cache, self.split = cache, split


def propagate(node: fx.Node, splits: dict[fx.Node, Split]) -> Propagated:
    """The split of ``node``'s output (some of its inputs are in ``splits``) and its new args."""
    return RULES.get(method_or_function(node), _broadcasting)(node, splits)


def method_or_function(node: fx.Node) -> str | None:
    """The op's name: the method's, or the function's (``getitem`` for ``x[...]``)."""
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        if node.target is operator.getitem:
            return "getitem"
        return getattr(node.target, "__name__", None)
    return None


def shape_of(node: fx.Node) -> tuple:
    """The global shape Dynamo traced for ``node`` (sizes as ints, symbolic ones as they are)."""
    value = example_value(node)
    return tuple(int(d) if isinstance(d, int) else d for d in value.shape)


def _first_input_rule(rule: Callable[[fx.Node, Split], Propagated]) -> Rule:
    """A rule for an op that moves the split of its first argument (a view, an index); when only
    another input is split the op is taken as broadcasting."""

    def apply(node: fx.Node, splits: dict[fx.Node, Split]) -> Propagated:
        x = node.args[0] if node.args else None
        return rule(node, splits[x]) if x in splits else _broadcasting(node, splits)

    return apply


def _int_args(node: fx.Node) -> list:
    """The size (or dim) arguments after the tensor, given as ``f(x, 1, 2)`` or ``f(x, (1, 2))``."""
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
    """The args of a view/reshape/expand with the size along ``dim`` made ``size`` (-1 stays)."""
    sizes = _int_args(node)
    if len(sizes) != len(shape_of(node)):
        raise CannotShard(f"{node.name}: cannot read its sizes")
    old = sizes[dim]
    if isinstance(old, int) and old == -1:
        return _with_sizes(node, sizes)
    if not isinstance(old, int):
        raise CannotShard(f"{node.name}: symbolic size on the split dim")
    sizes[dim] = size
    return _with_sizes(node, sizes)


@_first_input_rule
def _view(node: fx.Node, split: Split) -> Propagated:
    """A reshape maps the split dim to the outer dim of its group (``(.., 576) -> (.., 9, 64)``)."""
    src, dst = shape_of(node.args[0]), shape_of(node)
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
        return Propagated(out, _localised(node, outer, out.size))
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


@_first_input_rule
def _expand(node: fx.Node, split: Split) -> Propagated:
    """``expand`` may add leading dims; the split dim keeps its slice and gets its local size."""
    dim = split.dim + len(shape_of(node)) - len(shape_of(node.args[0]))
    return Propagated(replace(split, dim=dim), _localised(node, dim, split.size))


@_first_input_rule
def _transpose(node: fx.Node, split: Split) -> Propagated:
    return _swapped(node, split, *node.args[1:3])


@_first_input_rule
def _t(node: fx.Node, split: Split) -> Propagated:
    return _swapped(node, split, 0, 1)


def _swapped(node: fx.Node, split: Split, d0: int, d1: int) -> Propagated:
    rank = len(shape_of(node.args[0]))
    d0, d1, d = d0 % rank, d1 % rank, split.dim
    return Propagated(replace(split, dim=d1 if d == d0 else d0 if d == d1 else d))


@_first_input_rule
def _permute(node: fx.Node, split: Split) -> Propagated:
    rank = len(shape_of(node.args[0]))
    dims = [d % rank for d in _int_args(node)]
    return Propagated(replace(split, dim=dims.index(split.dim)))


@_first_input_rule
def _unsqueeze(node: fx.Node, split: Split) -> Propagated:
    new = _dim_arg(node) % len(shape_of(node))
    return Propagated(replace(split, dim=split.dim if split.dim < new else split.dim + 1))


@_first_input_rule
def _squeeze(node: fx.Node, split: Split) -> Propagated:
    """Only ``squeeze(dim)`` of another dim than the split one is understood."""
    rank = len(shape_of(node.args[0]))
    gone = _dim_arg(node)
    if gone is None or gone % rank == split.dim:
        raise CannotShard(f"{node.name}: squeeze of the split dim")
    return Propagated(replace(split, dim=split.dim if split.dim < gone % rank else split.dim - 1))


@_first_input_rule
def _index(node: fx.Node, split: Split) -> Propagated:
    """``x[..., :8]``, ``x[:, :, None]``: where the split dim lands; it must be taken whole."""
    idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    rank = len(shape_of(node.args[0]))
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
            return Propagated(replace(split, dim=out_dim))
        in_dim += 1
        out_dim += isinstance(item, slice)
    raise CannotShard(f"{node.name}: indexing not understood")


def _attention(node: fx.Node, splits: dict[fx.Node, Split]) -> Propagated:
    """``sdpa(q, k, v, enable_gqa=True)``: q holds ``group`` times the heads of k and v, so its
    slice is ``group`` times theirs. Without GQA it broadcasts like any batched op."""
    if not node.kwargs.get("enable_gqa"):
        return _broadcasting(node, splits)
    q, k, v = node.args[:3]
    if not all(t in splits and splits[t].dim == 1 for t in (q, k, v)) or splits[k] != splits[v]:
        raise CannotShard(f"{node.name}: query/key/value heads not split alike")
    group = shape_of(q)[1] // shape_of(k)[1]
    sq, sk = splits[q], splits[k]
    if (sq.start, sq.size) != (sk.start * group, sk.size * group):
        raise CannotShard(f"{node.name}: query heads do not follow their key/value group")
    mask = node.kwargs.get("attn_mask")
    if isinstance(mask, fx.Node) and (mask in splits or len(shape_of(mask)) != 4 or shape_of(mask)[1] != 1):
        raise CannotShard(f"{node.name}: an attention mask with a head dim")
    return Propagated(sq)


def _broadcasting(node: fx.Node, splits: dict[fx.Node, Split]) -> Propagated:
    """An op whose inputs broadcast to its output: every split input's split dim lines up with
    the same output dim and keeps its size; whole inputs have size 1 there (or do not reach it).
    A whole input written in place is a KV cache that must be split too (:class:`CacheIsSplit`)."""
    if not isinstance(example_value(node), torch.Tensor):
        raise CannotShard(f"{node.name}: a split tensor flows into a non-tensor result")
    dst = shape_of(node)
    inputs = [i for i in node.all_input_nodes if isinstance(example_value(i), torch.Tensor)]
    aligned = {replace(splits[i], dim=splits[i].dim + len(dst) - len(shape_of(i))) for i in inputs if i in splits}
    if len(aligned) != 1:
        raise CannotShard(f"{node.name}: inputs split differently")
    split = aligned.pop()
    if split.dim < 0:
        raise CannotShard(f"{node.name}: reduces the split dim away")
    for i in inputs:
        src = shape_of(i)
        k = split.dim - (len(dst) - len(src))
        if i in splits:
            if k < 0 or str(src[k]) != str(dst[split.dim]):
                raise CannotShard(f"{node.name}: changes the size of the split dim")
        elif k >= 0 and str(src[k]) != "1":
            if i is mutated_input(node):
                raise CacheIsSplit(i, Split(k, split.start, split.size))
            raise CannotShard(f"{node.name}: mixes a split tensor with a whole one ({i.name})")
    return Propagated(split)


def _along_other_dim(node: fx.Node, splits: dict[fx.Node, Split]) -> Propagated:
    """A reduction, softmax, concatenation...: broadcasting, over a ``dim`` that is not the split one."""
    result = _broadcasting(node, splits)
    dim = _dim_arg(node)
    if dim is None or dim % len(shape_of(node)) == result.split.dim:
        raise CannotShard(f"{node.name}: reduces or concatenates along the split dim")
    return result


def _dim_arg(node: fx.Node) -> int | None:
    if "dim" in node.kwargs:
        return node.kwargs["dim"]
    return node.args[1] if len(node.args) > 1 and isinstance(node.args[1], int) else None


RULES: dict[str, Rule] = {
    "view": _view,
    "reshape": _view,
    "expand": _expand,
    "transpose": _transpose,
    "t": _t,
    "permute": _permute,
    "unsqueeze": _unsqueeze,
    "squeeze": _squeeze,
    "getitem": _index,
    "scaled_dot_product_attention": _attention,
    **{name: _along_other_dim for name in _DIM_OPS},
}
