"""``mode="merge"``: layer A of a pair computes with the averages of A's and B's weights; B is skipped.

Same-named parameters of the two layers (``self_attn.q_proj.weight`` of A and of B) are averaged
elementwise. The averages are held by the backend object (``backend.weights``, shared by the
prefill and decode graphs) and passed to the compiled graph in place of A's parameters, so the
model's own parameters are never written. The graph itself is the ``prune`` graph
(:func:`lp_fx.rewrite.rewrite_pairs`).

Merge is for inference: the averages are not the model's parameters, so no gradient would reach
the model; a graph compiled with gradients enabled is refused (:func:`lp_fx.passes.inference_only`). An average
always equals the average of the weights the model holds at the call: before each call the
compiled graph checks the two parameters it averages and computes the average again when either
was written in place since (``load_state_dict``, an optimizer step, ``p.copy_``: autograd's
version counter) or given a new tensor (``p.data = t``). An edit through ``p.data`` in place
(``p.data.mul_(2)``) is invisible to that counter, as it is to autograd: assign or copy instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .find_layers import Layer, parameter_paths
from .fx_utils import placeholder_positions

# Parameters named in a "do not correspond" message, at most.
_NAMED = 4


def merge_problem(gm: fx.GraphModule, example_inputs: Sequence[Any], a: Layer, b: Layer) -> str | None:
    """Why the weights of ``a`` and ``b`` cannot be averaged in this graph, or None when they can."""
    params_a, params_b = layer_parameters(gm, a), layer_parameters(gm, b)
    if not params_a:
        return f"no parameter of layer {a.index} ({a.path}) is an input of this graph, so none can be averaged"
    if params_a.keys() != params_b.keys():
        return (
            f"layers {a.index} and {b.index} do not have the same parameters in this graph "
            f"(only in {a.index}: {_names(params_a.keys() - params_b.keys())}; "
            f"only in {b.index}: {_names(params_b.keys() - params_a.keys())})"
        )
    pair_nodes, position = a.nodes | b.nodes, placeholder_positions(gm)
    for name, node_a in params_a.items():
        why = _cannot_average(example_inputs[position[node_a]], example_inputs[position[params_b[name]]])
        if why:
            return f"parameter {name} of layers {a.index} and {b.index}: {why}"
        if any(user not in pair_nodes for user in node_a.users):
            return (
                f"parameter {name} of layer {a.index} is also read outside the pair (a tied weight): "
                "averaging it would change that too"
            )
    return None


def merged_inputs(gm: fx.GraphModule, pairs: Sequence[tuple[Layer, Layer]]) -> dict[int, int]:
    """``{input position of a parameter of A: position of B's parameter of the same name}`` for
    each pair (A, B), already checked with :func:`merge_problem`: the compiled graph reads the
    average of the two at A's position."""
    merged, position = {}, placeholder_positions(gm)
    for a, b in pairs:
        params_b = layer_parameters(gm, b)
        for name, node_a in layer_parameters(gm, a).items():
            merged[position[node_a]] = position[params_b[name]]
    return merged


def layer_parameters(gm: fx.GraphModule, layer: Layer) -> dict[str, fx.Node]:
    """The parameter placeholders of ``layer``, by name inside the layer (``mlp.up_proj.weight``)."""
    prefix = layer.path + "."
    return {path[len(prefix) :]: node for node, path in parameter_paths(gm).items() if path.startswith(prefix)}


def _cannot_average(a: Any, b: Any) -> str | None:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return "not tensors"
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"shapes/dtypes differ ({tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype})"
    if is_traceable_wrapper_subclass(a) or is_traceable_wrapper_subclass(b) or not a.is_floating_point():
        return f"{type(a).__name__} of {a.dtype} cannot be averaged (plain floating-point tensors only)"
    return None


def _names(names: set[str]) -> str:
    listed = sorted(names)[:_NAMED]
    return ", ".join(listed) + (f" and {len(names) - _NAMED} more" if len(names) > _NAMED else "") if listed else "none"
