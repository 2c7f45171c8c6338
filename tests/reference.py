"""An independent eager reference of layer pairing and of the other depth transforms, written
at module level (no FX).

Layer A of a pair is patched to pass its input through unchanged and remember its arguments;
layer B then receives A's input and computes the pair with both layers' own sub-modules:

- lp:    h = x + f1_A(x) + f1_B(x);  out = h + f2_A(h) + f2_B(h)
- block: out = A(x) + B(x) - x

Each layer keeps its own attention arguments (mask, cache slot), as in the compiled rewrite.

- prune: layer B returns its input (the test models' layers return the hidden state alone);
- merge: a copy of the model whose layer A holds the averages of A's and B's parameters, B pruned;
- shuffle: the layer list itself reordered; each layer keeps its attention's own ``layer_idx``,
  so its own cache slot.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from torch import nn


def _named_args(layer: nn.Module, x, args, kwargs) -> dict:
    """The layer's arguments other than self and the hidden state, by name."""
    sig = inspect.signature(type(layer).forward)
    params = list(sig.parameters.values())
    named = dict(sig.bind(layer, x, *args, **kwargs).arguments)
    for p in params[:2]:
        named.pop(p.name, None)
    for p in params:
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(named.pop(p.name, {}))
    return named


def _llama_attn(layer, x, named):
    return layer.self_attn(hidden_states=layer.input_layernorm(x), **named)[0]


def _llama_mlp(layer, h):
    return layer.mlp(layer.post_attention_layernorm(h))


def _gemma_attn(layer, x, named):
    return layer.post_attention_layernorm(_llama_attn(layer, x, named))


def _gemma_mlp(layer, h):
    return layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))


def _gpt2_attn(layer, x, named):
    named = {k: v for k, v in named.items() if not k.startswith("encoder_")}
    return layer.attn(layer.ln_1(x), **named)[0]


def _gpt_attn(layer, x, named):
    return layer.attn(layer.ln_1(x))


def _gpt_mlp(layer, h):
    return layer.mlp(layer.ln_2(h))


def _titan_attn(layer, x, named):
    return layer.attention(layer.attention_norm(x), named["freqs_cis"])


def _titan_mlp(layer, h):
    return layer.feed_forward(layer.ffn_norm(h))


SUB_BLOCKS: dict[str, tuple[Callable, Callable]] = {
    "LlamaDecoderLayer": (_llama_attn, _llama_mlp),
    "Qwen2DecoderLayer": (_llama_attn, _llama_mlp),
    "MistralDecoderLayer": (_llama_attn, _llama_mlp),
    "Gemma3DecoderLayer": (_gemma_attn, _gemma_mlp),
    "GPT2Block": (_gpt2_attn, _gpt_mlp),
    "Block": (_gpt_attn, _gpt_mlp),
    "TransformerBlock": (_titan_attn, _titan_mlp),
}


def layer_list(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of the test models, in index order."""
    container = _layer_container(model)
    return list(container.values()) if isinstance(container, nn.ModuleDict) else list(container)


def _layer_container(model: nn.Module) -> nn.ModuleList | nn.ModuleDict:
    for path in ("model.layers", "transformer.h", "layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise ValueError(f"no layer list in {type(model).__name__}")


@contextmanager
def eager_pairing(model: nn.Module, pairs: Sequence[tuple[int, int]], mode: str):
    """Within the block, ``model`` runs eagerly with ``pairs`` combined in ``mode``."""
    layers = layer_list(model)
    patched = []
    for i, j in pairs:
        a, b = layers[i], layers[j]
        a.forward, b.forward = _paired_forwards(a, b, mode)
        patched += [a, b]
    try:
        yield model
    finally:
        for layer in patched:
            del layer.forward


def _paired_forwards(a: nn.Module, b: nn.Module, mode: str):
    seen = {}

    def forward_a(x, *args, **kwargs):
        seen["a"] = (args, kwargs)
        return x

    def forward_b(x, *args, **kwargs):
        args_a, kwargs_a = seen.pop("a")
        if mode == "block":
            return type(a).forward(a, x, *args_a, **kwargs_a) + type(b).forward(b, x, *args, **kwargs) - x
        f1, f2 = SUB_BLOCKS[type(a).__name__]
        named_a, named_b = _named_args(a, x, args_a, kwargs_a), _named_args(b, x, args, kwargs)
        h = x + f1(a, x, named_a) + f1(b, x, named_b)
        return h + f2(a, h) + f2(b, h)

    return forward_a, forward_b


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
    container = _layer_container(model)
    original = list(container)
    for position, index in enumerate(order):
        container[position] = original[index]
    try:
        yield model
    finally:
        for position, layer in enumerate(original):
            container[position] = layer

