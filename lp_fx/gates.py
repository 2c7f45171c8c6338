"""One graph in which every candidate pair ``(i, i + 1)`` is switched on or off at run time.

For choosing pairs: scoring another pairing writes new values into a small gate tensor that the
compiled graph reads as one more input, instead of compiling again. ``gates[i]`` is the state of
the candidate pair ``(i, i + 1)``: ``OFF`` (0), ``LP`` (1) or ``BLOCK`` (2). A valid setting pairs
each layer at most once (``gates[i - 1]`` and ``gates[i]`` not both on); the backend checks that.

Every choice is a ``torch.where`` on a gate, which passes one operand through unchanged: with all
gates off the graph computes the unpaired model's operations on the same values, and with gate
``i`` on it computes the pairing ``(i, i + 1)`` as :mod:`lp_fx.rewrite` writes it (same operations,
same order of the sums). For layer ``k`` with residual sub-blocks ``t_j = t_{j-1} + f_j(t_{j-1})``
(``t_0`` its input, ``t_m`` its output):

- ``in_k = where(block(k-1), in_{k-1}, out_{k-1})``: in block mode, B reads A's input;
- ``out_k`` (what the rest of the model reads after layer k) is
  ``where(lp(k-1), s_m, where(block(k-1), x + ((A(x) - x) + (B(x) - x)), t_m))``, x = in_{k-1};
- the lp pair (k-1, k) is ``s_0 = in_{k-1}``, ``s_j = s_{j-1} + (fA_j(s_{j-1}) + fB_j(s_{j-1}))``:
  A's sub-blocks after the first read ``where(lp(k-1), s_{j-1}, t_{j-1})`` (its first reads
  ``in_{k-1}`` either way), B's last sub-block reads ``where(lp(k-1), s_{m-1}, t_{m-1})``, and B's
  other sub-blocks are computed a second time, on ``s_{j-1}``. One copy cannot serve both: unpaired,
  B's first sub-block reads A's output, which A's second sub-block computes; paired, A's second
  sub-block reads B's first sub-block's update (through ``s_1``). Selecting inputs there would
  make a cycle.

Cost: block gates add only the selections; lp gates compute sub-blocks ``1 .. m-1`` of every
layer but the first twice (for a pre-norm Llama layer, m = 2: its attention), on every call,
whichever gates are on. Layers whose sub-blocks read the stream other than through their own
stream input, pass stream values out of the layer, or write memory in place from the stream
(a KV cache: compile with ``use_cache=False``) cannot be gated in lp mode.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx

from .config import LayerParallelError
from .find_layers import Layer, LayerStack
from .fx_utils import append_input, in_graph_order, mutated_input, stable_topological_sort
from .rewrite import new_node, pair_problem, pair_sum, sum_deltas

OFF, LP, BLOCK = 0, 1, 2
GATE_VALUES = {"lp": LP, "block": BLOCK}


@dataclass
class SubBlockBody:
    """The nodes that compute one sub-block's deltas from its stream (graph order), and the deltas."""

    nodes: list[fx.Node]
    deltas: list[fx.Node]


def gate_pairs(gm: fx.GraphModule, stack: LayerStack, modes: Sequence[str]) -> None:
    """Rewrite ``gm`` so that gates switch every pair ``(i, i + 1)`` of ``stack`` between off and
    ``modes``; the gate tensor is read through a placeholder added as the graph's last input.

    Raises :class:`LayerParallelError`, leaving ``gm`` untouched, when the stack cannot be gated.
    """
    layers = [stack.layers[k] for k in range(len(stack))]
    _check_pairs(layers, modes)
    bodies = [_bodies_or_raise(layer) for layer in layers] if "lp" in modes else []
    graph = gm.graph
    gates = append_input(gm, "lp_gates")
    with graph.inserting_before(graph.output_node()):
        _GatedStack(graph, gates, layers, bodies, modes).build()
    stable_topological_sort(graph)
    graph.lint()
    gm.recompile()


def _check_pairs(layers: list[Layer], modes: Sequence[str]) -> None:
    missing = [layer.index for layer in layers if not layer.nodes]
    if missing:
        raise LayerParallelError(
            f"layers {missing} are not in this graph (a graph break?): gates need every layer in one graph"
        )
    for a, b in zip(layers, layers[1:]):
        for mode in modes:
            reason = pair_problem(a, b, mode)
            if reason:
                raise LayerParallelError(f"pair {(a.index, b.index)} cannot be gated in mode {mode!r}: {reason}")


def _bodies_or_raise(layer: Layer) -> list[SubBlockBody]:
    bodies = sub_block_bodies(layer)
    if isinstance(bodies, str):
        raise LayerParallelError(f"layer {layer.index} ({layer.path}) cannot be gated in mode 'lp': {bodies}")
    return bodies


def sub_block_bodies(layer: Layer) -> list[SubBlockBody] | str:
    """Each sub-block's body (what computes its deltas from its stream), or why there is none that
    another stream could be fed to: a sub-block reading an earlier stream or another sub-block's
    values, a value computed from the stream used outside the layer, or an in-place write of one."""
    streams = [layer.input] + [block.add for block in layer.blocks]
    stage = {node: j for j, node in enumerate(streams)}  # the last stream a node is computed from
    for node in in_graph_order(layer.nodes):
        if node not in stage:
            seen = [stage[arg] for arg in node.all_input_nodes if arg in stage]
            if seen:
                stage[node] = max(seen)
    cache = "(a KV cache? compile the forward with use_cache=False)"
    for node in stage:
        if node is not layer.output and node in layer.nodes:
            if mutated_input(node) is not None:
                return f"{node.name} writes memory in place from the stream {cache}"
            outside = ", ".join(user.name for user in node.users if user not in layer.nodes)
            if outside:
                return f"{node.name}, computed from the stream, is read outside the layer by {outside} {cache}"
    bodies = []
    for j, block in enumerate(layer.blocks):
        body = _body(block.deltas, j, streams, stage)
        if isinstance(body, str):
            return f"sub-block {j + 1}: {body}"
        bodies.append(SubBlockBody(in_graph_order(body), list(block.deltas)))
    return bodies


def _body(deltas: list[fx.Node], j: int, streams: list[fx.Node], stage: dict[fx.Node, int]) -> set[fx.Node] | str:
    """The stream-derived ancestors of sub-block ``j``'s deltas, which must read stream ``j`` only."""
    body: set[fx.Node] = set()
    todo = [d for d in deltas if d in stage]
    while todo:
        node = todo.pop()
        if node in body:
            continue
        if stage[node] != j or node in streams:
            return f"{node.name} is computed from an earlier stream than the sub-block's own"
        body.add(node)
        todo.extend(arg for arg in node.all_input_nodes if arg in stage and arg is not streams[j])
    return body


class _GatedStack:
    """Builds the gated streams of :func:`gate_pairs` (see the module doc), layer after layer."""

    def __init__(
        self, graph: fx.Graph, gates: fx.Node, layers: list[Layer], bodies: list[list[SubBlockBody]],
        modes: Sequence[str],
    ) -> None:
        self.graph, self.layers, self.bodies = graph, layers, bodies
        self.on = {mode: [self._gate_is(gates, k, GATE_VALUES[mode]) for k in range(len(layers) - 1)] for mode in modes}
        # The node each sub-block body reads as its stream, by (layer, sub-block), as it is rewired.
        self.reads = {
            (k, j): layer.input if j == 0 else layer.blocks[j - 1].add
            for k, layer in enumerate(layers)
            for j in range(len(bodies[k]) if bodies else 0)
        }

    def build(self) -> None:
        layers = self.layers
        readers = [_outside_readers(layer) for layer in layers]  # taken before anything is rewired
        inputs = [layers[0].input]
        for k, layer in enumerate(layers):
            out = layer.output
            if k > 0 and "block" in self.on:
                out = self._select(self.on["block"][k - 1], self._block_pair(k - 1, inputs[k - 1]), out)
            if k > 0 and "lp" in self.on:
                out = self._select(self.on["lp"][k - 1], self._lp_pair(k - 1, inputs[k - 1]), out)
            if k + 1 == len(layers):
                for user in readers[k]:
                    user.replace_input_with(layer.output, out)
                break
            nxt = self._select(self.on["block"][k], inputs[k], out) if "block" in self.on else out
            for user in readers[k]:
                user.replace_input_with(layer.output, nxt if user in layers[k + 1].nodes else out)
            inputs.append(nxt)
            if self.bodies:
                self.reads[(k + 1, 0)] = nxt

    def _lp_pair(self, k: int, x: fx.Node) -> fx.Node:
        """The stream after the lp pair (k, k + 1) from its input ``x``; wires A's later sub-blocks
        and B's last to read the pair's stream when the gate is lp, and copies B's others."""
        on = self.on["lp"][k]
        last = len(self.bodies[k]) - 1
        stream = x
        for j, (body_a, body_b) in enumerate(zip(self.bodies[k], self.bodies[k + 1])):
            if j > 0:
                self._feed(k, j, on, stream)
            if j == last:
                self._feed(k + 1, j, on, stream)
                deltas_b = body_b.deltas
            else:
                deltas_b = self._copy_on(k + 1, j, stream)
            delta_a = sum_deltas(self.graph, body_a.deltas, set())
            delta_b = sum_deltas(self.graph, deltas_b, set())
            _, stream = pair_sum(self.graph, stream, delta_a, delta_b, like=self.layers[k + 1].blocks[j].add)
        return stream

    def _block_pair(self, k: int, x: fx.Node) -> fx.Node:
        """``x + ((A(x) - x) + (B(x) - x))`` for the pair (k, k + 1), as the block rewrite sums it."""
        a, b = self.layers[k].output, self.layers[k + 1].output
        delta_a = new_node(self.graph, operator.sub, a, x, like=a)
        delta_b = new_node(self.graph, operator.sub, b, x, like=b)
        return pair_sum(self.graph, x, delta_a, delta_b, like=b)[1]

    def _feed(self, k: int, j: int, on: fx.Node, stream: fx.Node) -> None:
        """Sub-block j of layer k reads ``stream`` when ``on``, what it read before otherwise."""
        old = self.reads[(k, j)]
        new = self._select(on, stream, old)
        for node in self.bodies[k][j].nodes:
            node.replace_input_with(old, new)
        self.reads[(k, j)] = new

    def _copy_on(self, k: int, j: int, stream: fx.Node) -> list[fx.Node]:
        """A copy of sub-block j of layer k that reads ``stream``; returns the copy's deltas."""
        body = self.bodies[k][j]
        env = {self.reads[(k, j)]: stream}
        for node in body.nodes:
            env[node] = self.graph.node_copy(node, lambda arg: env.get(arg, arg))
        return [env.get(delta, delta) for delta in body.deltas]

    def _select(self, on: fx.Node, when_on: fx.Node, when_off: fx.Node) -> fx.Node:
        return new_node(self.graph, torch.where, on, when_on, when_off, like=when_off)

    def _gate_is(self, gates: fx.Node, k: int, value: int) -> fx.Node:
        gate = self.graph.call_function(operator.getitem, (gates, k))
        return self.graph.call_function(operator.eq, (gate, value))


def _outside_readers(layer: Layer) -> set[fx.Node]:
    return {user for user in layer.output.users if user not in layer.nodes}
