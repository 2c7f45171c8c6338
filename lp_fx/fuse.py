"""``fuse=True`` (one device): the GEMMs of the two layers of a rewritten pair run as one batched GEMM each.

After the rewrite both layers of a pair read the same stream, so each of B's projections can run
in the same kernel as A's projection of the same name. Projections are matched by their weight's
name inside the layer (``self_attn.q_proj.weight`` of A and of B), and those of one layer that read
the same input (q, k and v; gate and up) are grouped. Each group becomes ONE ``bmm`` over
``stack([input_A, input_B])`` and a weight buffer ``[2, rows, in]`` that holds A's weights
(concatenated along their output rows) in slice 0 and B's in slice 1; the outputs are slices of
the result. For a pre-norm Llama pair that is 4 GEMMs instead of 14.

Why a batched GEMM over each branch's own normalised input, rather than folding the norm weights
into the projections to make one GEMM over a shared input: it needs no knowledge of the norm (RMS,
Gemma's ``1 + w``, LayerNorm with bias, or none), each branch computes exactly the products it
computed before, and the buffer can hold the weights' *own values*: the model's parameters become
views of it (``param.data = buffer[b, rows]``), so the weights are not held twice and the model
keeps computing as before in eager mode. At decode the GEMMs are bound by weight bytes and launch
latency, not by their width, so one ``bmm`` over two inputs costs about what one layer's GEMM costs.
Inductor's own ``batch_linear`` pre-grad fusion does the same grouping but stacks the weights with
``torch.stack`` on every call, which reads and writes every weight once more per token.

The buffers are held by the backend object (shared by the prefill and decode graphs), one set per
model: each call passes the buffers made from the parameters that call passes (built at the first
call of a model, when Dynamo reuses the graph for a second model of the same class), so a model
never reads or writes another model's weights. In-place changes of the parameters
(``load_state_dict``, an optimizer) write into the buffer and are seen; a parameter given a new
tensor (``param.data = t``) is copied back into the buffer before the next call. ``fuse`` is for inference: with gradients enabled it is
refused (the buffer is not the parameter autograd would differentiate; :func:`lp_fx.passes.inference_only`).

A group is left unfused, with the reason in the report, when the two layers' projections differ
in shape, dtype or bias, when a weight is not a plain floating-point tensor (torchao's quantized
weights: their scales do not stack) or not contiguous (a view of the buffer would change its
strides, which Dynamo guards), or when one branch's input depends on the other's output.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .config import Pair
from .find_layers import Layer, LayerStack, example_value, shape_key
from .fx_utils import LINEAR, append_input, depends_on, placeholder_positions, stable_topological_sort
from .merge import layer_parameters
from .state import Provider
from .weights import WeightStore

GEMM_TARGETS = (LINEAR, torch.addmm, torch.mm, torch.bmm, torch.baddbmm, torch.matmul, operator.matmul)


def count_gemms(gm: fx.GraphModule) -> int:
    """GEMM calls in ``gm`` (linear, addmm, mm, bmm, baddbmm, matmul): one kernel launch each."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in GEMM_TARGETS)


@dataclass
class Projection:
    """One GEMM of a layer whose weight is a parameter: ``linear(x, w, b)`` or Conv1D's ``addmm(b, x, w)``."""

    node: fx.Node
    input: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    transposed: bool  # the weight is stored ``[in, out]`` (Conv1D), not ``[out, in]``


@dataclass
class FuseResult:
    """What fusion did to one graph: the pairs fused (with their GEMM groups), and why not for the rest."""

    fused: list[tuple[Pair, int]] = field(default_factory=list)
    skipped: list[tuple[Pair, str]] = field(default_factory=list)
    fused_inputs: list[int] = field(default_factory=list)  # input positions of the parameters fused
    buffers: list[Provider] = field(default_factory=list)  # what the placeholders appended to the graph read
    # input position -> Dynamo's fake of a fused parameter, to trace with: the parameter itself is
    # a view of a buffer now, whose storage offset Dynamo's shape environment has not seen
    traced: dict[int, Any] = field(default_factory=dict)


def fuse_pairs(
    gm: fx.GraphModule, example_inputs: Sequence[Any], stack: LayerStack, pairs: Sequence[Pair], store: WeightStore
) -> FuseResult:
    """Fuse the GEMMs of each rewritten pair of ``gm`` (``lp`` or ``block``) where it is exact."""
    result = FuseResult()
    positions = placeholder_positions(gm)
    for pair in pairs:
        a, b = stack.layers[pair[0]], stack.layers[pair[1]]
        groups, why = _groups(gm, example_inputs, positions, a, b)
        for group in groups:
            result.fused_inputs += _fuse_group(gm, example_inputs, positions, group, store, result)
        if groups:
            result.fused.append((pair, len(groups)))
        if why:
            result.skipped.append((pair, why))
    placeholders = list(positions)
    result.traced = {i: example_value(placeholders[i]) for i in result.fused_inputs}
    if result.fused:
        stable_topological_sort(gm.graph)
        gm.graph.lint()
        gm.recompile()
    return result


Group = list[tuple[Projection, Projection]]


def _groups(
    gm: fx.GraphModule, example_inputs: Sequence[Any], positions: dict[fx.Node, int], a: Layer, b: Layer
) -> tuple[list[Group], str | None]:
    """A's and B's projections matched by name and grouped by their inputs; and what could not be fused."""
    proj_a, proj_b = _projections(gm, a), _projections(gm, b)
    groups: dict[tuple, Group] = {}
    problems = []
    for name in sorted(proj_a.keys() | proj_b.keys()):
        pa, pb = proj_a.get(name), proj_b.get(name)
        why = _cannot_fuse(pa, pb, example_inputs, positions, a, b)
        if why:
            problems.append(f"{name}: {why}")
            continue
        key = (pa.input, pb.input, pa.node if pa.transposed else None)
        groups.setdefault(key, []).append((pa, pb))
    return list(groups.values()), "; ".join(problems) or None


def _projections(gm: fx.GraphModule, layer: Layer) -> dict[str, Projection]:
    """The layer's GEMMs whose weight is one of its parameters, by the weight's name in the layer."""
    names = {node: name for name, node in layer_parameters(gm, layer).items()}
    out = {}
    for node in layer.nodes:
        proj = _projection(node)
        if proj is not None and proj.weight in names:
            out[names[proj.weight]] = proj
    return out


def _projection(node: fx.Node) -> Projection | None:
    if node.op != "call_function" or node.kwargs:
        return None
    if node.target is LINEAR and len(node.args) in (2, 3):
        x, w, *rest = node.args
        return Projection(node, x, w, rest[0] if rest else None, transposed=False)
    if node.target is torch.addmm and len(node.args) == 3:
        bias, x, w = node.args
        return Projection(node, x, w, bias, transposed=True)
    return None


def _cannot_fuse(
    pa: Projection | None, pb: Projection | None, example_inputs: Sequence[Any], positions: dict[fx.Node, int],
    a: Layer, b: Layer,
) -> str | None:
    if pa is None or pb is None:
        return f"only in layer {a.index if pb is None else b.index}"
    if pa.transposed != pb.transposed or (pa.bias is None) != (pb.bias is None):
        return "the two layers compute it differently"
    tensors = [(pa.weight, pb.weight)] + ([(pa.bias, pb.bias)] if pa.bias is not None else [])
    for node_a, node_b in tensors:
        if not all(isinstance(n, fx.Node) and n in positions for n in (node_a, node_b)):
            return "its weight or bias is not a parameter of the layer"
        ta, tb = example_inputs[positions[node_a]], example_inputs[positions[node_b]]
        why = _cannot_stack(ta, tb)
        if why:
            return why
        if any(user is not proj.node for proj, n in ((pa, node_a), (pb, node_b)) for user in n.users):
            return "its weight is read elsewhere too (a tied weight)"
    if shape_key(pa.input) != shape_key(pb.input):
        return f"inputs of different shapes {shape_key(pa.input)} and {shape_key(pb.input)}"
    pair_nodes = a.nodes | b.nodes
    if depends_on(pa.input, pb.node, pair_nodes) or depends_on(pb.input, pa.node, pair_nodes):
        return "one layer's input depends on the other's output"
    return None


def _cannot_stack(ta: Any, tb: Any) -> str | None:
    if not isinstance(ta, torch.nn.Parameter) or not isinstance(tb, torch.nn.Parameter):
        return "not a parameter"
    if is_traceable_wrapper_subclass(ta) or is_traceable_wrapper_subclass(tb) or not ta.is_floating_point():
        return f"{type(ta).__name__} weights (quantized?) do not stack: plain floating-point tensors only"
    if ta.shape != tb.shape or ta.dtype != tb.dtype or ta.device != tb.device:
        return f"shapes/dtypes differ ({tuple(ta.shape)} {ta.dtype} vs {tuple(tb.shape)} {tb.dtype})"
    if not (ta.is_contiguous() and tb.is_contiguous()):
        return (
            f"a weight is not contiguous (strides {ta.stride()} and {tb.stride()}): the fused buffer's rows, "
            "which the parameters become views of, are; make it contiguous (p.data = p.data.contiguous())"
        )
    return None


aten = torch.ops.aten


def _fuse_group(
    gm: fx.GraphModule, example_inputs: Sequence[Any], positions: dict[fx.Node, int], group: Group, store: WeightStore,
    result: FuseResult,
) -> list[int]:
    """Replace one group by ``bmm(stack(x_A, x_B), W)`` and slices; returns the input positions of
    the parameters fused."""
    graph = gm.graph
    transposed = group[0][0].transposed
    members = [[proj for proj, _ in group], [proj for _, proj in group]]
    weight_inputs = [[positions[p.weight] for p in branch] for branch in members]
    weights = _stacked_inputs(store, example_inputs, weight_inputs, transposed)
    fused = [*weight_inputs[0], *weight_inputs[1]]
    biases = None
    if group[0][0].bias is not None:
        bias_inputs = [[positions[p.bias] for p in branch] for branch in members]
        biases = _stacked_inputs(store, example_inputs, bias_inputs, transposed=False)
        fused += [*bias_inputs[0], *bias_inputs[1]]
    x_a, x_b = group[0][0].input, group[0][1].input
    anchor = max((x_a, x_b), key=_order(graph).__getitem__)
    # AOTAutograd caches a graph only if every tensor method is called on a node with Dynamo's fake value
    # (else a fused compile bypassed its cache: "Unsupported call_method target"): the nodes added here
    # call functions, and each projection's replacement carries the fake value of the projection.
    with graph.inserting_after(anchor):
        w = _buffer_node(gm, weights, result)
        inputs = graph.call_function(torch.stack, ([_rows(graph, x_a), _rows(graph, x_b)],))
        w_t = w if transposed else graph.call_function(torch.transpose, (w, 1, 2))
        if biases is None:
            y = graph.call_function(torch.bmm, (inputs, w_t))
        else:
            bias = graph.call_function(operator.getitem, (_buffer_node(gm, biases, result), (slice(None), None)))
            y = graph.call_function(torch.baddbmm, (bias, inputs, w_t))
        leading = graph.call_function(operator.getitem, (graph.call_method("size", (x_a,)), slice(None, -1)))
        for branch, projs in enumerate(members):
            start = 0
            for proj in projs:
                width = example_inputs[positions[proj.weight]].shape[0 if not transposed else 1]
                part = graph.call_function(operator.getitem, (y, (branch, slice(None), slice(start, start + width))))
                shape = graph.call_function(operator.add, (leading, (width,)))
                out = graph.call_function(aten.view.default, (graph.call_function(aten.contiguous.default, (part,)), shape))
                if "example_value" in proj.node.meta:  # the same tensor the model's next ops read
                    out.meta["example_value"] = proj.node.meta["example_value"]
                proj.node.replace_all_uses_with(out)
                graph.erase_node(proj.node)
                start += width
    return fused


def _stacked_inputs(
    store: WeightStore, example_inputs: Sequence[Any], branches: list[list[int]], transposed: bool
) -> Provider:
    """What the graph reads for one group: the buffer stacking the parameters the call passes at
    the positions ``branches`` (A's, then B's), made once per model by ``store`` (now for the
    model being compiled)."""

    def buffer(args: Sequence[Any]) -> torch.Tensor:
        return store.stacked(tuple([args[i] for i in branch] for branch in branches), transposed)[0]

    buffer(example_inputs)
    return buffer


def _rows(graph: fx.Graph, x: fx.Node) -> fx.Node:
    """``x`` as a matrix of rows ``[M, in]``."""
    return graph.call_method("reshape", (x, -1, _width(x)))


def _buffer_node(gm: fx.GraphModule, buffer: Provider, result: FuseResult) -> fx.Node:
    """The placeholder through which the graph reads ``buffer``, appended to its inputs (the caller
    passes the buffers, :func:`lp_fx.state.wrap_call`)."""
    result.buffers.append(buffer)
    return append_input(gm, f"lp_fx_fused_{len(result.buffers) - 1}", static=True)


def _order(graph: fx.Graph) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


def _width(node: fx.Node) -> int:
    return int(example_value(node).shape[-1])
