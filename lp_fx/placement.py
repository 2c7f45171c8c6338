"""Stage 4: place a rewritten graph on the ranks of a 1-D device mesh (SPMD, one process per device).

- Paired layers (W = 2): rank 0 computes branch A of each pair, rank 1 branch B, each with its
  full weights and its own KV cache; every ``delta_A + delta_B`` becomes the DTensor sum of the
  rank's own delta (one all-reduce per summed sub-block), and the other branch is erased.
- Other layers: Megatron tensor parallelism over the whole mesh (:mod:`tensor_parallel`), or
  replicated with ``tp=False``. Embedding, final norm and head stay replicated.

The report gets the rank, the number of forward all-reduces and the parameter bytes this rank
reads (sliced weights count by their slice).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from .collectives import copy_to, count_collectives, insert_after, resolve_mesh, sum_over
from .config import LayerParallelError, LPConfig
from .find_layers import Layer, LayerStack, example_value
from .report import GraphReport
from .rewrite import PairRewrite
from .tensor_parallel import CannotShard, shard_sub_block


def place(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    stack: LayerStack | None,
    rewrites: list[PairRewrite],
    config: LPConfig,
    report: GraphReport,
    say: Callable[[str], None],
) -> fx.GraphModule:
    """Turn the single-device graph ``gm`` into this rank's part of the SPMD program."""
    mesh = resolve_mesh(config.mesh, example_inputs)
    world, rank = mesh.size(), mesh.get_local_rank()
    report.rank = rank
    if world == 1:
        report.notes.append("mesh has 1 device: compiled for a single device")
        say("mesh has 1 device: nothing to place, compiled for a single device")
        return gm
    if rewrites and world != 2:
        what = "does not divide the pairs (each pair needs 2 groups of ranks)" if world % 2 else "is not supported yet"
        raise LayerParallelError(
            f"a mesh of {world} devices {what}: layer-parallel placement runs each pair on exactly 2 devices; "
            "use a mesh of 2 devices (W = 2k with tensor parallelism inside each branch is not implemented)"
        )
    sum_target, copy_target = sum_over(mesh), copy_to(mesh)
    for rewrite in rewrites:
        _place_pair(rewrite, rank, sum_target, copy_target)
    if config.tp and stack is not None:
        paired = {i for r in rewrites for i in r.pair}
        for layer in stack.layers.values():
            if layer.index not in paired and layer.nodes:
                _shard_layer(layer, rank, world, sum_target, copy_target, report, say)
    gm.graph.lint()
    gm.recompile()
    report.collectives = count_collectives(gm)
    report.param_bytes = parameter_bytes(gm, example_inputs)
    return gm


def _place_pair(rewrite: PairRewrite, rank: int, sum_target: Callable, copy_target: Callable) -> None:
    """Keep branch ``rank`` of the pair; its deltas are summed with the other rank's."""
    mine, other = rewrite.branches[rank], rewrite.branches[1 - rank]
    streams = _stream_inputs(mine, _shape_text(rewrite.combines[0]))
    for combine in rewrite.combines:
        own = combine.args[rank]
        combine.replace_all_uses_with(own)
        combine.graph.erase_node(combine)
        insert_after(own, sum_target, users=lambda user: user not in mine)
    _erase_branch(other)
    for stream in streams:
        insert_after(stream, copy_target, users=lambda user: user in mine)


def _stream_inputs(branch: set[fx.Node], shape: tuple | None) -> list[fx.Node]:
    """Tensors the branch reads from outside that have the residual stream's shape."""
    outside = {i for n in branch for i in n.all_input_nodes if i not in branch}
    return [i for i in outside if _shape_text(i) == shape]


def _erase_branch(nodes: set[fx.Node]) -> None:
    """Erase the other rank's branch, its KV-cache writes included.

    Nodes whose result leaves the graph (a static cache allocated lazily inside the first graph
    is returned by it) stay, with what they need; nothing else of the branch is computed.
    """
    alive = set(nodes)
    dead = [n for n in alive if not n.users]
    while dead:
        for n in dead:
            n.graph.erase_node(n)
            alive.discard(n)
        dead = [n for n in alive if not n.users]


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
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        if not isinstance(value, torch.nn.Parameter) or not node.users:
            continue
        slices = [u.meta.get("lp_fx_shard") for u in node.users]
        if all(slices):
            total += sum(value.element_size() * value.numel() // value.shape[d] * size for d, _, size in set(slices))
        else:
            total += value.element_size() * value.numel()
    return total


def _shape_text(node: Any) -> tuple | None:
    value = example_value(node) if isinstance(node, fx.Node) else None
    return tuple(str(d) for d in value.shape) if isinstance(value, torch.Tensor) else None
