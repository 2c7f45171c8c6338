"""An independent eager reference of layer pairing, written at module level (no FX, no Dynamo):
what the compiled pass is checked against, by the test suite (``tests/helpers/reference.py`` adds the
other depth transforms) and by ``lp-fx gpu-check`` on the device it measures.

Layer A of a pair is patched to pass its input through unchanged and remember its arguments;
layer B then receives A's input and computes the pair with both layers' own sub-modules:

- lp:    h = x + f1_A(x) + f1_B(x);  out = h + f2_A(h) + f2_B(h)
- block: out = A(x) + B(x) - x

Each layer keeps its own attention arguments (mask, cache slot), as in the compiled rewrite.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from contextlib import contextmanager

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


# The two residual sub-blocks (attention, MLP) of each layer class an ``lp`` pair is referenced for:
# Hugging Face's, nanoGPT's ``Block`` and torchtitan's ``TransformerBlock``.
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
    """The decoder layers, in index order."""
    container = layer_container(model)
    return list(container.values()) if isinstance(container, nn.ModuleDict) else list(container)


def layer_container(model: nn.Module) -> nn.ModuleList | nn.ModuleDict:
    """The module holding the decoder layers (``model.layers``, ``transformer.h`` or ``layers``)."""
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
def eager_pairing(model: nn.Module, pairs: Sequence[tuple[int, int]], mode: str | Sequence[str]):
    """Within the block, ``model`` runs eagerly with ``pairs`` combined in ``mode`` (one mode for
    all, or one per pair)."""
    modes = [mode] * len(pairs) if isinstance(mode, str) else list(mode)
    if len(modes) != len(pairs):
        raise ValueError(f"{len(pairs)} pairs but {len(modes)} modes")
    layers = layer_list(model)
    patched = []
    for (i, j), pair_mode in zip(pairs, modes):
        a, b = layers[i], layers[j]
        a.forward, b.forward = _paired_forwards(a, b, pair_mode)
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
