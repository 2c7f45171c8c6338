"""The passes the backend runs on each graph, in order: :data:`PASSES`.

Each pass takes the :class:`~lp_fx.state.GraphState` and changes it (the graph, the report, what
to give the compiled graph at each call); one that does not apply to this graph returns at once.
Adding a transform is one module and one line here. A pass that changes the layers finds them
again (:func:`find_layers_again`), so that the passes after it read the graph as it is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import choose, weights
from .config import PAIRING_MODES
from .find_layers import find_layers
from .fuse import count_gemms, fuse_pairs
from .merge import merged_inputs
from .observe import observed
from .rewrite import lp_layers, rewrite_pairs
from .shuffle import shuffle_layers
from .state import GraphState, average_of_inputs, slice_of_input

Pass = Callable[[GraphState], None]


def find_stack(state: GraphState) -> None:
    """Find the decoder layers (:mod:`lp_fx.find_layers`); say why none when some were asked for."""
    state.stack = find_layers(state.gm, state.config.stack)
    if state.stack is None:
        choose.say_no_layers(state)
    else:
        choose.describe_layers(state)


def find_layers_again(state: GraphState) -> None:
    """The layers of the same stack as the graph holds them now; an ``lp`` pair's two layers as
    its rewrite left them (:func:`lp_fx.rewrite.lp_layers`)."""
    state.stack = find_layers(state.gm, state.stack.path)
    if state.stack is not None:
        for rewritten in state.rewrites:
            state.stack.layers.update(lp_layers(rewritten, state.stack))


def inference_only(state: GraphState) -> None:
    """The one inference-only rule: ``mode="merge"``, ``fuse=True`` and ``free_weights=True`` give
    the compiled graph tensors in place of the model's parameters, so no gradient would reach the
    model; with gradients enabled for a parameter of the graph they are refused, before the graph
    is changed."""
    modes = {mode for _, mode in state.pairs}
    config = state.config
    acting = [
        option
        for option, acts in (
            ("mode='merge'", "merge" in modes),
            ("fuse=True", config.fuse and bool(modes & set(PAIRING_MODES))),
            ("free_weights=True", config.free_weights),
        )
        if acts
    ]
    if acting:
        weights.refuse_gradients(acting[0], state.example_inputs)


def average_merged(state: GraphState) -> None:
    """``mode="merge"`` (:mod:`lp_fx.merge`): layer A of a pair reads the averages of A's and B's parameters."""
    merged = [(state.stack.layers[i], state.stack.layers[j]) for (i, j), mode in state.pairs if mode == "merge"]
    if merged:
        positions = merged_inputs(state.gm, merged)
        state.replaced.update({i: average_of_inputs(state.weights, i, j) for i, j in positions.items()})


def rewrite(state: GraphState) -> None:
    """Rewrite the chosen pairs (:mod:`lp_fx.rewrite`), then find the layers again."""
    if state.pairs:
        state.rewrites = rewrite_pairs(state.gm, state.stack, state.pairs)
        find_layers_again(state)


def shuffle(state: GraphState) -> None:
    """Run the shuffled range in its seeded order (:mod:`lp_fx.shuffle`), then find the layers again."""
    if not choose.shuffle_applies(state):
        return
    order = state.config.shuffle.order
    shuffle_layers(state.gm, state.stack, order)
    state.report.shuffled = order
    if list(order) == sorted(order):
        seed = state.config.shuffle.seed
        state.report.notes.append(f"shuffle seed {seed} keeps layers {sorted(order)} in their order; try another seed")
    find_layers_again(state)


def place(state: GraphState) -> None:
    """With a mesh: this rank's part of the SPMD program (:mod:`lp_fx.placement`)."""
    if state.config.mesh is None:
        return
    from .placement import place as place_graph  # lazy: DTensor's import costs a compile without a mesh

    place_graph(state.gm, state.example_inputs, state.stack, state.rewrites, state.config, state.report, state.say)


def keep_own_weights(state: GraphState) -> None:
    """``free_weights=True`` once placed on several ranks (:mod:`lp_fx.weights`): the graph reads
    its slices of the parameters, and the parameters it does not read are released."""
    if not state.config.free_weights or state.report.collectives is None:
        return
    release, shards, state.report.released_bytes = weights.keep_own_weights(state.gm, state.example_inputs, state.weights)
    state.checks.append(release)
    state.replaced.update({i: slice_of_input(state.weights, i, shard) for i, shard in shards.items()})


def fuse(state: GraphState) -> None:
    """``fuse=True`` (:mod:`lp_fx.fuse`): each summed pair's GEMMs as batched GEMMs."""
    if not state.config.fuse or not state.rewrites:
        return
    report = state.report
    params = [v for v in state.example_inputs if isinstance(v, torch.nn.Parameter)]
    before, gemms = weights.unique_bytes(params), count_gemms(state.gm)
    result = fuse_pairs(state.gm, state.example_inputs, state.stack, [r.pair for r in state.rewrites], state.weights)
    report.gemms = (gemms, count_gemms(state.gm))
    report.fuse_bytes = (before, weights.unique_bytes([*params, *state.weights.buffers()]))
    report.pairs_fused, report.fuse_skipped = result.fused, result.skipped
    for pair, why in result.skipped:
        state.say(f"pair {pair}: not all of its GEMMs fused: {why}")
    if result.buffers:
        state.traced.update(result.traced)
        state.appended += result.buffers


PASSES: tuple[Pass, ...] = (
    find_stack,
    choose.check_layer_count,
    choose.choose_pairs,
    inference_only,
    average_merged,
    rewrite,
    shuffle,
    place,
    keep_own_weights,
    fuse,
)


def run_passes(state: GraphState, passes: tuple[Pass, ...] = PASSES) -> None:
    """Run ``passes`` on ``state`` in order, each under the observer (:mod:`lp_fx.observe`)."""
    for step, run in enumerate(passes):
        observed(step, run, state)
