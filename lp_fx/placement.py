"""Stage 4: place a rewritten graph on the ranks of a 1-D device mesh (SPMD, one process per device).

- Paired layers need an even mesh, W = 2k: mesh positions ``[0, k)`` compute branch A of every
  pair, ``[k, 2k)`` branch B, each with its own KV cache; the other branch is erased.
  - W = 2: each rank holds its branch whole, and every ``delta_A + delta_B`` becomes the DTensor
    sum of the rank's own delta: one all-reduce per summed sub-block.
  - W = 2k, k >= 2: inside a branch every sub-block is Megatron tensor-parallel over the branch's
    k ranks (:func:`tensor_parallel.shard_sub_block` with the rank's position in its branch), also
    with ``tp=False``: without it the k ranks of a branch would all compute the same thing. When
    the branch delta is the row-parallel linear's output plus replicated terms (HF Llama's
    o_proj/down_proj in ``lp``; ``h + down_proj - x`` in ``block``), the sum inside the branch
    and the sum of the two branches are one all-reduce over the whole mesh: the row bias and the
    replicated terms count on the branch's first rank only (zero, with their gradient, on the
    others). Otherwise (a norm after the row linear, a sub-block kept replicated) the branch
    sums its partials over its k ranks, then the two branches sum over the 2 ranks at the same
    position. The fusion is decided on both branches alike, so the two groups of ranks always
    issue the same collectives.
  All-reduces per pair of HF Llama layers: ``lp`` 2 (fused, for any k); ``block`` 1 at W = 2,
  2 at W = 2k (the attention output, needed whole by the MLP, plus the fused sum).
- Other layers: Megatron tensor parallelism over the whole mesh (:mod:`tensor_parallel`), or
  replicated with ``tp=False``. Embedding, final norm and head stay replicated.

The report gets the rank, the number of forward all-reduces and the parameter bytes this rank
reads (sliced weights count by their slice).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.distributed.device_mesh import DeviceMesh

from .collectives import branch_mesh, copy_to, count_collectives, insert_after, resolve_mesh, sum_over
from .config import LayerParallelError, LPConfig
from .find_layers import Layer, LayerStack, example_value, is_add, shape_key
from .fx_utils import erase_unused, in_graph_order
from .report import GraphReport
from .rewrite import PairRewrite
from .tensor_parallel import CannotShard, TooFewHeads, mesh_sizes_for, shard_sub_block
from .weights import slice_bytes, tensor_bytes


# A row-parallel sum, and the adds/subs (with their replicated operand) that lead from it to a delta.
_Chain = tuple[fx.Node, list[tuple[fx.Node, int]]]


@dataclass(frozen=True)
class _Branches:
    """This rank's place in the pairs' layout and the collectives that sum their branches."""

    side: int  # 0: branch A of every pair, 1: branch B
    shard: int  # position among the ranks of its branch
    ranks: int  # ranks per branch (k)
    sum_pair: Callable  # sums a delta over the 2 ranks at the same position of the two branches
    copy_pair: Callable
    sum_all: Callable  # sums partials over the whole mesh: both branches at once
    sum_shard: Callable | None = None  # completes a row-parallel linear inside the branch
    copy_shard: Callable | None = None


def place(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    stack: LayerStack | None,
    rewrites: list[PairRewrite],
    config: LPConfig,
    report: GraphReport,
    say: Callable[[str], None],
) -> None:
    """Turn the single-device graph ``gm`` into this rank's part of the SPMD program.

    ``stack`` is the layers as ``gm`` holds them after the rewrite, a pair's branches included
    (:func:`lp_fx.passes.find_layers_again`)."""
    mesh = resolve_mesh(config.mesh, example_inputs)
    world, rank = mesh.size(), mesh.get_local_rank()
    report.rank = rank
    if world == 1:
        report.notes.append("mesh has 1 device: compiled for a single device")
        say("mesh has 1 device: nothing to place, compiled for a single device")
        return
    sum_target, copy_target = sum_over(mesh), copy_to(mesh)
    if rewrites:
        branches = _branches(mesh, rank, sum_target)
        for rewrite in rewrites:
            _place_pair(rewrite, stack, branches, report, say)
    if config.tp and stack is not None:
        paired = {i for r in rewrites for i in r.pair}
        for layer in stack.layers.values():
            if layer.index not in paired and layer.nodes:
                _shard_layer(layer, rank, world, sum_target, copy_target, report, say)
    gm.graph.lint()
    gm.recompile()
    report.collectives = count_collectives(gm)
    report.param_bytes = parameter_bytes(gm, example_inputs)
    report.parameter_use = parameter_use(gm, example_inputs)


def ranks_per_branch(world: int) -> int:
    """k for a mesh of ``world`` = 2k devices running pairs; a :class:`LayerParallelError` otherwise."""
    if world % 2:
        raise LayerParallelError(
            f"a mesh of {world} devices does not divide the pairs: each pair runs its two branches on two "
            "equal groups of ranks; use an even mesh size, W = 2 (one device per branch) or W = 2k "
            "(each branch tensor-parallel over k devices): 2, 4, 6, 8, ..."
        )
    return world // 2


def _branches(mesh: DeviceMesh, rank: int, sum_all: Callable) -> _Branches:
    k = ranks_per_branch(mesh.size())
    if k == 1:
        return _Branches(side=rank, shard=0, ranks=1, sum_pair=sum_all, copy_pair=copy_to(mesh), sum_all=sum_all)
    grid = branch_mesh(mesh)
    side, shard = grid.get_coordinate()
    pair_mesh, shard_mesh = grid["branch"], grid["shard"]
    return _Branches(
        side=side, shard=shard, ranks=k, sum_pair=sum_over(pair_mesh), copy_pair=copy_to(pair_mesh),
        sum_all=sum_all, sum_shard=sum_over(shard_mesh), copy_shard=copy_to(shard_mesh),
    )


def _place_pair(
    rewrite: PairRewrite,
    stack: LayerStack,
    branches: _Branches,
    report: GraphReport,
    say: Callable[[str], None],
) -> None:
    """Keep this rank's branch of the pair (tensor-parallel when k > 1) and sum its deltas with the
    other branch's."""
    mine, other = rewrite.branches[branches.side], rewrite.branches[1 - branches.side]
    streams = _stream_inputs(mine, shape_key(rewrite.combines[0]))
    chains: list[_Chain | None] = [None] * len(rewrite.combines)
    if branches.ranks > 1:
        chains, added = _shard_both_branches(rewrite, stack, branches, report, say)
        mine, other = mine | added[branches.side], other | added[1 - branches.side]
    # Before the fusion, so that the replicated terms it zeroes still pass their gradient through the copy.
    for stream in streams:
        insert_after(stream, branches.copy_pair, users=lambda user: user in mine)
    for combine, chain in zip(rewrite.combines, chains):
        own = combine.args[branches.side]
        combine.replace_all_uses_with(own)
        combine.graph.erase_node(combine)
        if chain is None:
            insert_after(own, branches.sum_pair, users=lambda user: user not in mine)
        else:
            own = _fuse_sums(own, *chain, branches.shard)
            insert_after(own, branches.sum_all, users=lambda user: user not in mine)
    erase_unused(other, writes_too=True)


def _shard_both_branches(
    rewrite: PairRewrite,
    stack: LayerStack,
    branches: _Branches,
    report: GraphReport,
    say: Callable[[str], None],
) -> tuple[list[_Chain | None], list[set[fx.Node]]]:
    """Split both branches over the ranks of a branch. Returns, per combined delta, the chain that
    fuses this rank's sums (None unless both branches have one: the two groups of ranks must issue
    the same collectives), and the nodes the split added to each branch."""
    added = [_shard_branch(rewrite, side, stack, branches, report, say) for side in (0, 1)]
    found = [
        [_row_sum_chain(c.args[side], added[side], rewrite.branches[side], branches) for c in rewrite.combines]
        for side in (0, 1)
    ]
    mine, theirs = found[branches.side], found[1 - branches.side]
    return [m if t is not None else None for m, t in zip(mine, theirs)], added


def _shard_branch(
    rewrite: PairRewrite,
    side: int,
    stack: LayerStack,
    branches: _Branches,
    report: GraphReport,
    say: Callable[[str], None],
) -> set[fx.Node]:
    """Split branch ``side`` over the ranks of a branch; returns the nodes this added to the graph."""
    graph = rewrite.combines[0].graph
    before = set(graph.nodes)
    layer = stack.layers[rewrite.pair[side]]
    try:
        _shard_layer(layer, branches.shard, branches.ranks, branches.sum_shard, branches.copy_shard, report, say)
    except TooFewHeads as e:
        valid = ", ".join(str(2 * k) for k in mesh_sizes_for(e.units))
        raise LayerParallelError(
            f"pair {rewrite.pair} on a mesh of {2 * branches.ranks} devices runs each branch tensor-parallel "
            f"over {branches.ranks} of them, but layer {layer.index} ({layer.path}) has only {e.units} key/value "
            f"heads (or features) to share out among them; mesh sizes that fit this pair: {valid}"
        ) from e
    return set(graph.nodes) - before


def _row_sum_chain(delta: fx.Node, added: set[fx.Node], branch: set[fx.Node], branches: _Branches) -> _Chain | None:
    """``delta`` as a row-parallel sum plus replicated terms: the sum node, and each add/sub on the
    way from it to ``delta`` with the position of its replicated operand; None when it is not."""
    for node in in_graph_order(added):
        if node.target is branches.sum_shard:
            steps = _plus_steps(node, delta, branch)
            if steps is not None:
                return node, steps
    return None


def _plus_steps(start: fx.Node, delta: fx.Node, branch: set[fx.Node]) -> list[tuple[fx.Node, int]] | None:
    """The adds/subs (``start`` on the plus side, sole user each) leading from ``start`` to ``delta``."""
    steps = []
    node = start
    while node is not delta:
        users = list(node.users)
        if len(users) != 1 or users[0] not in branch:
            return None
        user = users[0]
        position = _replicated_operand(user, node)
        if position is None:
            return None
        steps.append((user, position))
        node = user
    return steps


def _replicated_operand(user: fx.Node, node: fx.Node) -> int | None:
    """In ``node + r``, ``r + node`` or ``node - r``: the position of ``r`` (a tensor), else None."""
    if len(user.args) != 2 or user.kwargs or user.args[0] is user.args[1]:
        return None
    position = 1 if user.args[0] is node else 0
    if not isinstance(user.args[position], fx.Node):
        return None
    subtracts = user.op == "call_function" and user.target in (operator.sub, torch.sub)
    subtracts = subtracts or (user.op == "call_method" and user.target == "sub")
    if is_add(user) or (subtracts and position == 1):
        return position
    return None


def _fuse_sums(delta: fx.Node, row_sum: fx.Node, steps: list[tuple[fx.Node, int]], shard: int) -> fx.Node:
    """Leave ``delta`` partial over the whole mesh (its row-parallel sum removed) and return it.

    Summed over the branch's ranks, each replicated term must count once: on every rank but the
    branch's first it becomes zero that still passes its gradient.
    """
    row = row_sum.args[0]
    row_sum.replace_all_uses_with(row)
    row_sum.graph.erase_node(row_sum)
    if shard != 0:
        for user, position in steps:
            replicated = user.args[position]
            with user.graph.inserting_before(user):
                zero = user.graph.call_function(_gradient_only, (replicated,))
            zero.meta["example_value"] = example_value(replicated)
            user.update_arg(position, zero)
    return row if delta is row_sum else delta


def _gradient_only(x: torch.Tensor) -> torch.Tensor:
    """Zero in the forward, the identity for the gradient."""
    return x - x.detach()


def _stream_inputs(branch: set[fx.Node], shape: tuple | None) -> list[fx.Node]:
    """Tensors the branch reads from outside that have the residual stream's shape."""
    outside = {i for n in branch for i in n.all_input_nodes if i not in branch}
    return [i for i in outside if shape_key(i) == shape]


def _shard_layer(
    layer: Layer,
    rank: int,
    world: int,
    sum_target: Callable,
    copy_target: Callable,
    report: GraphReport,
    say: Callable[[str], None],
) -> None:
    if not layer.residual:
        say(f"layer {layer.index} ({layer.path}) kept replicated for tensor parallelism: {layer.problem}")
        return
    for j in range(len(layer.blocks)):
        try:
            shard_sub_block(layer, j, rank, world, sum_target, copy_target)
        except CannotShard as why:
            msg = f"layer {layer.index} ({layer.path}) sub-block {j} kept replicated: {why}"
            report.notes.append(msg)
            say(msg)


def parameter_bytes(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> int:
    """Bytes of the parameters this graph reads; a parameter read only through slices counts by them."""
    total = 0
    for value, slices in _parameters_read(gm, example_inputs):
        if slices:
            total += sum(slice_bytes(value, *s) for s in slices)
        else:
            total += tensor_bytes(value)
    return total


def parameter_use(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> dict[int, str]:
    """``{id(parameter): "whole" | "slice"}`` for each parameter this rank's graph reads.

    A parameter that is missing is not read on this rank (the other branch of a pair): its
    gradient there is None. Read through slices, its gradient is zero outside them.
    """
    return {id(value): "slice" if slices else "whole" for value, slices in _parameters_read(gm, example_inputs)}


def _parameters_read(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[tuple[torch.Tensor, set]]:
    """Each parameter the graph reads, with the slices it reads (empty: read whole)."""
    read = []
    for node, value in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
        if not isinstance(value, torch.nn.Parameter) or not node.users:
            continue
        slices = [u.meta.get("lp_fx_shard") for u in node.users]
        read.append((value, set(slices) if all(slices) else set()))
    return read

