"""The eager references the tests check the compiled pass against, written at module level (no FX).

Pairing (``lp``, ``block``) is the package's own reference, :mod:`lp_fx.tools.evaluation.reference`
(``lp-fx gpu-check`` checks a device against it too); here are the other depth transforms:

- prune: layer B returns its input (the test models' layers return the hidden state alone);
- merge: a copy of the model whose layer A holds the averages of A's and B's parameters, B pruned;
- shuffle: the layer list itself reordered; each layer keeps its attention's own ``layer_idx``,
  so its own cache slot.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lp_fx.tools.evaluation.reference import eager_pairing, layer_container, layer_list

__all__ = ["eager_pairing", "eager_skipping", "eager_order", "layer_list", "merged_copy"]


@contextmanager
def eager_skipping(model: nn.Module, skipped: Sequence[int]):
    """Within the block, the layers ``skipped`` of ``model`` return their input unchanged."""
    layers = [layer_list(model)[i] for i in skipped]
    for layer in layers:
        layer.forward = _identity
    try:
        yield model
    finally:
        for layer in layers:
            del layer.forward


def merged_copy(model: nn.Module, pairs: Sequence[tuple[int, int]]) -> nn.Module:
    """A deep copy of ``model`` in which layer A of each pair holds the averages of A's and B's
    parameters and layer B returns its input."""
    merged = copy.deepcopy(model)
    layers = layer_list(merged)
    with torch.no_grad():
        for i, j in pairs:
            b_params = dict(layers[j].named_parameters())
            for name, param in layers[i].named_parameters():
                param.copy_((param + b_params[name]) / 2)
            layers[j].forward = _identity
    return merged


def _identity(x, *args, **kwargs):
    return x


@contextmanager
def eager_order(model: nn.Module, order: Sequence[int]):
    """Within the block, ``model``'s layer list runs its layers in ``order`` (all indices, each once)."""
    container = layer_container(model)
    original = list(container)
    for position, index in enumerate(order):
        container[position] = original[index]
    try:
        yield model
    finally:
        for position, layer in enumerate(original):
            container[position] = layer

