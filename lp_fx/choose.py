"""Which of the requested pairs and the shuffle apply to one graph, and why not the others.

What depends on the model is checked here, once a graph shows its layers: an index past the
last layer, a plan made for another layer count, a ``start``/``end`` range past the last layer,
a pair split by a graph break, a post-norm layer in ``lp`` mode.
"""

from __future__ import annotations

from .config import LayerParallelError, Pair
from .pairing import check_plan
from .find_layers import LayerStack, available_stacks
from .graph_breaks import last_graph_break
from .merge import merge_problem
from .report import LayerInfo
from .rewrite import pair_problem, skip_problem
from .shuffle import shuffle_problem
from .state import GraphState


def describe_layers(state: GraphState) -> None:
    """Put the layers found in the report."""
    state.report.stack = state.stack.path
    state.report.layers = [
        LayerInfo(index=l.index, path=l.path, cls=l.cls, sub_blocks=len(l.blocks), note=l.problem)
        for l in state.stack.layers.values()
    ]


def say_no_layers(state: GraphState) -> None:
    """Say why a graph asked to be paired or shuffled has no layer stack (or refuse a wrong ``stack``)."""
    config = state.config
    if not config.has_pairs and config.shuffle is None:
        return
    found = available_stacks(state.gm) if config.stack is not None else []
    if found:
        raise LayerParallelError(
            f"no layer stack {config.stack!r} in this graph; stacks found: {', '.join(found)} "
            "(give 'stack' as the module path from the model object, e.g. 'model.layers')"
        )
    where = last_graph_break()
    if where is None:
        msg = "no decoder layers found in this graph (no module list of same-class children); compiled without pairing"
    else:
        msg = (
            f"no layer stack in this graph: split by a graph break at {where}; a graph break inside the "
            "layer loop makes Dynamo compile each layer on its own, so no graph holds both layers of a "
            "pair and nothing is paired (remove the graph break: torch._dynamo.explain lists them)"
        )
    state.report.notes.append(msg)
    state.say(msg)


def check_layer_count(state: GraphState) -> None:
    """Refuse a plan made for another layer count, or a ``start``/``end`` range past the last layer."""
    stack, config = state.stack, state.config
    if stack is None or not holds_whole_stack(stack):
        return
    if config.plan_num_layers is not None:
        check_plan({"num_layers": config.plan_num_layers}, len(stack), "the plan", this=stack.path)
    if config.span is not None and config.span[1] > len(stack):
        raise LayerParallelError(
            f"start={config.span[0]}, end={config.span[1]} is out of range: {stack.path} has {len(stack)} layers, "
            f"so end <= {len(stack)}"
        )


def choose_pairs(state: GraphState) -> None:
    """The requested pairs this graph can rewrite, in their modes; say why for the others."""
    stack, report = state.stack, state.report
    if stack is None:
        return
    present, complete = present_layers(stack), holds_whole_stack(stack)
    for pair in state.config.requested_pairs(max(stack.layers) + 1):
        mode = state.config.mode_of(pair)
        reason = _why_not(stack, pair, mode, present, complete)
        if reason is None and mode == "merge":
            a, b = stack.layers[pair[0]], stack.layers[pair[1]]
            reason = merge_problem(state.gm, state.example_inputs, a, b)
        if reason is None:
            state.pairs.append((pair, mode))
        elif reason:
            report.pairs_skipped.append((pair, reason))
            state.say(f"pair {pair} not rewritten: {reason}")
    report.pairs_rewritten = list(state.pairs)


def _why_not(stack: LayerStack, pair: Pair, mode: str, present: set[int], complete: bool) -> str | None:
    """None: rewrite it. "": not in this graph, nothing to say. Otherwise the reason to skip."""
    i, j = pair
    if complete and j >= len(stack):
        raise LayerParallelError(
            f"pair {pair} is out of range: {stack.path} has {len(stack)} layers, valid indices 0..{len(stack) - 1}"
        )
    if mode == "prune":  # needs layer B only: a graph holding it can skip it
        return skip_problem(stack.layers[j]) if j in present else ""
    if i in present and j in present:
        return pair_problem(stack.layers[i], stack.layers[j], mode)
    if i in present or j in present:
        here, missing = (i, j) if i in present else (j, i)
        return missing_partner(here, missing)
    return ""


def shuffle_applies(state: GraphState) -> bool:
    """Whether the shuffle applies to this graph; says why not when some of its layers are here."""
    shuffle, stack = state.config.shuffle, state.stack
    if shuffle is None or stack is None:
        return False
    indices = range(shuffle.start, shuffle.end)
    if shuffle.end > len(stack) and holds_whole_stack(stack):
        raise LayerParallelError(
            f"shuffle range {shuffle.start}..{shuffle.end - 1} is out of range: {stack.path} has {len(stack)} "
            f"layers, valid indices 0..{len(stack) - 1} (end <= {len(stack)})"
        )
    present = present_layers(stack)
    here = [k for k in indices if k in present]
    if not here:
        return False
    missing = [k for k in indices if k not in present]
    reason = missing_partner(here, missing) if missing else shuffle_problem(stack, indices)
    if reason is None:
        return True
    state.report.shuffle_skipped = reason
    state.say(f"shuffle of layers {shuffle.start}..{shuffle.end - 1} not applied: {reason}")
    return False


def present_layers(stack: LayerStack) -> set[int]:
    """The indices of the layers that compute something in this graph."""
    return {i for i, layer in stack.layers.items() if layer.nodes}


def holds_whole_stack(stack: LayerStack) -> bool:
    """Whether the graph holds every layer of the stack, so an index past the end is an error.

    True when layers 0..n-1 are all here and the last one's output feeds the rest of the model
    (not only the graph's output, which a graph break right after the loop would cause).
    """
    if present_layers(stack) != set(range(len(stack))):
        return False
    last = stack.layers[len(stack) - 1].output
    return last is not None and any(u.op != "output" for u in last.users)


def missing_partner(here: int | list[int], missing: int | list[int]) -> str:
    """Why layer(s) ``here`` of this graph go without ``missing``: a graph break Dynamo made, or
    else the model not running them in this graph (a skipped layer is no graph break)."""
    where = last_graph_break()
    if where is None:
        return f"{_named(missing)} not run in this graph (skipped by the model, not a graph break); {_named(here)} run here"
    return f"split by a graph break at {where}: {_named(here)} in this graph, {_named(missing)} not"


def _named(layers: int | list[int]) -> str:
    """``layer 3`` or ``layers 3, 4``."""
    if isinstance(layers, int) or len(layers) == 1:
        return f"layer {layers if isinstance(layers, int) else layers[0]}"
    return "layers " + ", ".join(map(str, layers))
