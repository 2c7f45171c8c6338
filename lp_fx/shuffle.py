"""``shuffle``: the layers of a range run in another order; only the residual stream is re-wired.

For layers ``s .. e - 1`` run in the order ``p_0, p_1, …``: layer ``p_0`` reads the range's input,
layer ``p_{m+1}`` reads the output of ``p_m``, and what read the stream after the m-th layer of the
range (the output of layer ``s + m``; for m = last, the rest of the model) reads the output of
``p_m``. Everything else a layer reads stays its own: its KV-cache slot and its cache writes, its
mask, its rotary inputs. The graph is then re-sorted with the stable sort that keeps in-place
writes in place among the readers of the same memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from torch import fx

from .find_layers import LayerStack
from .fx_utils import memory_readers, mutated_input, stable_topological_sort


def shuffle_problem(stack: LayerStack, indices: Sequence[int]) -> str | None:
    """Why layers ``indices`` (consecutive, all in the graph) cannot be reordered, or None when they can."""
    layers = [stack.layers[k] for k in indices]
    for layer in layers:
        if layer.input is None or layer.output is None:
            return f"layer {layer.index} ({layer.path}): {layer.problem}"
    for prev, layer in zip(layers, layers[1:]):
        if layer.input is not prev.output:
            return f"layer {layer.index} does not read the output of layer {prev.index} in this graph"
    for layer in layers:
        for write in (n for n in layer.nodes if mutated_input(n) is not None):
            readers = memory_readers(write)
            others = [other.index for other in layers if other is not layer and readers & other.nodes]
            if others:
                return (
                    f"layer {layer.index} writes in place memory that layer(s) {others} read "
                    "(a cache shared between layers): their order cannot change"
                )
    return None


def shuffle_layers(gm: fx.GraphModule, stack: LayerStack, order: Sequence[int]) -> None:
    """Run the layers ``sorted(order)`` in ``order`` (checked with :func:`shuffle_problem`)."""
    layers = [stack.layers[k] for k in sorted(order)]
    run = [stack.layers[k] for k in order]
    in_range = set().union(*(layer.nodes for layer in layers))
    after_step = {orig.output: new.output for orig, new in zip(layers, run)}
    outside = {user for out in after_step for user in out.users if user not in in_range}
    stream = layers[0].input
    for layer in run:
        _substitute(layer.nodes, {layer.input: stream})
        stream = layer.output
    _substitute(outside, after_step)
    stable_topological_sort(gm.graph)
    gm.graph.lint()
    gm.recompile()


def _substitute(users: Iterable[fx.Node], replacement: Mapping[fx.Node, fx.Node]) -> None:
    """Replace, all at once, each input of ``users`` found in ``replacement``."""
    for user in users:
        user.args = fx.map_arg(user.args, lambda n: replacement.get(n, n))
        user.kwargs = fx.map_arg(user.kwargs, lambda n: replacement.get(n, n))
