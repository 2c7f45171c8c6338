"""A pairing folded into the weights of a plain model that stock engines serve (``lp-fx export``).

An ``lp`` pair computes ``h = x + attn_A(n_A(x)) + attn_B(n_B(x))``, ``out = h + mlp_A(m_A(h)) +
mlp_B(m_B(h))``. For pre-norm RMSNorm layers ``n_A(x) = rms(x) * g_A``, so ``g_A`` folds into the
input columns of A's q, k, v (``m_A``'s into gate and up); with the norm weight set to 1 the pair is
ONE layer with A's heads then B's (q, k, v rows, o columns) and A's FFN rows then B's (gate, up
rows, down columns): the o and down GEMMs sum the two branches. Gemma's norm multiplies by
``1 + w``: the gain is ``1 + w`` and the folded weight 0. ``prune`` keeps layer A of a pair,
``merge`` keeps A with the averages of A's and B's weights (as ``mode="merge"`` computes them).

:func:`fold` checks everything and returns a :class:`Folded` model description (tensors with
Hugging Face names, layers renumbered, a head count, KV-head count and FFN width per layer);
:func:`build_model` makes it a transformers model (each wide layer a stock decoder layer built
from a config with its own widths); :func:`lp_fx.tools.export.write.export` writes it as a GGUF
(:mod:`lp_fx.tools.export.gguf_writer`) or, for pairings that keep the layers' shapes, a Hugging Face
folder. Every check runs before anything is written; the output appears under its final name only
once it is complete.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lp_fx.config import LayerParallelError, Pair, config_from_options
from lp_fx.checkpoint import layer_stack_of
from lp_fx.weights import WeightStore

log = logging.getLogger(__name__)

EXPORT_MODES = ("lp", "prune", "merge")

# Decoder layers whose lp pairs fold into one layer: the offset their norm adds to its weight.
NORM_OFFSET = {
    "LlamaDecoderLayer": 0.0,
    "MistralDecoderLayer": 0.0,
    "Qwen2DecoderLayer": 0.0,
    "Qwen3DecoderLayer": 0.0,
    "GemmaDecoderLayer": 1.0,
}
# How each parameter of a pair becomes the wide layer's: (how, norm whose gain folds into it).
#   rows: A's rows then B's, each scaled column-wise by its branch's norm gain (or unscaled: None);
#   cols: A's columns then B's; sum: A's + B's; unit: the norm's neutral weight; same: A's (== B's).
ATTN_NORM, MLP_NORM = "input_layernorm.weight", "post_attention_layernorm.weight"
FOLD_RULES: dict[str, tuple[str, str | None]] = {
    **{f"self_attn.{p}_proj.weight": ("rows", ATTN_NORM) for p in "qkv"},
    **{f"self_attn.{p}_proj.bias": ("rows", None) for p in "qkv"},
    **{f"mlp.{p}_proj.weight": ("rows", MLP_NORM) for p in ("gate", "up")},
    **{f"mlp.{p}_proj.bias": ("rows", None) for p in ("gate", "up")},
    "self_attn.o_proj.weight": ("cols", None),
    "mlp.down_proj.weight": ("cols", None),
    "self_attn.o_proj.bias": ("sum", None),
    "mlp.down_proj.bias": ("sum", None),
    ATTN_NORM: ("unit", None),
    MLP_NORM: ("unit", None),
    "self_attn.q_norm.weight": ("same", None),
    "self_attn.k_norm.weight": ("same", None),
}
POST_NORMS = ("post_feedforward_layernorm", "pre_feedforward_layernorm")


class ExportError(LayerParallelError):
    """A pairing, model or output that cannot be exported; nothing was written."""


@dataclass(frozen=True)
class LayerShape:
    """One layer of the exported model: its widths and the source layers it was made of."""

    heads: int
    kv_heads: int
    ffn: int
    source: tuple[int, ...]
    how: str  # "layer" (copied), "lp" (two layers folded into one wide layer), "merge" (averaged)


@dataclass
class Folded:
    """A pairing folded into weights: tensors with Hugging Face names (layers renumbered)."""

    config: Any  # the source config with the new layer count
    model_class: type
    layer_class: type
    stack: str
    layers: list[LayerShape]
    tensors: dict[str, torch.Tensor]
    pairing: dict[str, Any] = field(default_factory=dict)

    @property
    def wide(self) -> bool:
        """Whether some layer is wider than the source's layers (an ``lp`` pair)."""
        return any(layer.how == "lp" for layer in self.layers)

    @property
    def head_dim(self) -> int:
        return config_head_dim(self.config)


def config_head_dim(config: Any) -> int:
    """The attention head size a config gives (``head_dim``, else hidden size / heads)."""
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


# ------------------------------------------------------------------------------------- checks


def check_foldable(model: nn.Module, pairs: Sequence[Pair], modes: Sequence[str]) -> None:
    """Raise :class:`ExportError` naming the pair and layer when the pairing cannot be folded."""
    if len(pairs) != len(modes):
        raise ExportError(f"{len(pairs)} pairs but {len(modes)} modes")
    config_from_options(pairs=[list(pair) for pair in pairs])  # well-formed, disjoint pairs
    stack, count = layer_stack_of(model)
    layers = _layers(model, stack)
    for (i, j), mode in zip(pairs, modes):
        if mode not in EXPORT_MODES:
            raise ExportError(
                f"pair ({i}, {j}) has mode {mode!r}, which is not one layer: only {', '.join(EXPORT_MODES)} pairs "
                "can be exported (a block pair's second sub-blocks read two different streams)"
            )
        if j >= count:
            raise ExportError(f"pair ({i}, {j}) is past the last layer: the model has {count} layers (0..{count - 1})")
        problem = _shape_problem(layers[i], layers[j], i, j)
        if problem is None and mode == "lp":
            problem = _wide_layer_problem(model, layers[i], layers[j], i, j)
        if problem:
            raise ExportError(f"pair ({i}, {j}), {mode}: {problem}")


def _layers(model: nn.Module, stack: str) -> list[nn.Module]:
    container = model.get_submodule(stack)
    return list(container.values()) if isinstance(container, nn.ModuleDict) else list(container)


def _shape_problem(a: nn.Module, b: nn.Module, i: int, j: int) -> str | None:
    shapes_a = {name: tuple(p.shape) for name, p in a.named_parameters()}
    shapes_b = {name: tuple(p.shape) for name, p in b.named_parameters()}
    if type(a) is not type(b):
        return f"layer {i} is a {type(a).__name__}, layer {j} a {type(b).__name__}"
    for name in sorted(shapes_a.keys() | shapes_b.keys()):
        if shapes_a.get(name) != shapes_b.get(name):
            return f"layers {i} and {j} differ in shape: {name} is {shapes_a.get(name)} vs {shapes_b.get(name)}"
    return None


def _wide_layer_problem(model: nn.Module, a: nn.Module, b: nn.Module, i: int, j: int) -> str | None:
    """Why layers ``i`` and ``j`` cannot be folded into one wide layer (same shapes already checked)."""
    kind = type(a).__name__
    post = [name for name in POST_NORMS if hasattr(a, name)]
    if post:
        return (
            f"layer {i} ({kind}) is post-norm: {post[0]} normalises a sub-block's output, and the norm of a "
            "sum of two branches is not the sum of their norms, so the pair is not one layer"
        )
    if any(isinstance(m, nn.LayerNorm) for m in a.modules()):
        return (
            f"layer {i} ({kind}) uses LayerNorm: its mean subtraction and bias do not fold into the next "
            f"projection's columns; foldable layers are pre-norm RMSNorm ({', '.join(NORM_OFFSET)})"
        )
    if kind not in NORM_OFFSET:
        return f"layer {i} is a {kind}, which is not known to fold; supported: {', '.join(NORM_OFFSET)}"
    unknown = sorted(name for name, _ in a.named_parameters() if name not in FOLD_RULES)
    if unknown:
        return f"layer {i} ({kind}) has parameters with no folding rule: {', '.join(unknown)}"
    params_b = dict(b.named_parameters())
    for name, param in a.named_parameters():
        if FOLD_RULES[name][0] == "same" and not torch.equal(param, params_b[name]):
            return (
                f"the per-head norm {name} differs between layers {i} and {j}: one wide layer has one such norm "
                "for all its heads (Qwen3 / Gemma 3 q/k norms fold only when equal)"
            )
    types = getattr(model.config, "layer_types", None)
    if types is not None and types[i] != types[j]:
        return f"layer {i} is {types[i]} attention and layer {j} {types[j]}: one layer has one attention pattern"
    return None


# ---------------------------------------------------------------------------------------- fold


def fold(model: nn.Module, pairs: Sequence[Pair], modes: Sequence[str]) -> Folded:
    """``model`` with ``pairs`` folded in, each in its mode (``lp``, ``prune`` or ``merge``)."""
    check_foldable(model, pairs, modes)
    stack, count = layer_stack_of(model)
    config = model.config
    state = model.state_dict()
    per_layer = [_layer_tensors(state, stack, i) for i in range(count)]
    offset = NORM_OFFSET.get(type(_layers(model, stack)[0]).__name__, 0.0)
    partner = {i: (j, mode) for (i, j), mode in zip(pairs, modes)}
    dropped = {j for _, j in pairs}
    base = LayerShape(config.num_attention_heads, _kv_heads(config), config.intermediate_size, (), "layer")
    shapes: list[LayerShape] = []
    tensors = {name: t for name, t in state.items() if not name.startswith(stack + ".")}
    for i in (i for i in range(count) if i not in dropped):
        j, mode = partner.get(i, (None, "layer"))
        if mode == "lp":
            weights = fold_lp(per_layer[i], per_layer[j], offset)
            shape = LayerShape(2 * base.heads, 2 * base.kv_heads, 2 * base.ffn, (i, j), "lp")
        elif mode == "merge":
            weights = merge_weights(per_layer[i], per_layer[j])
            shape = LayerShape(base.heads, base.kv_heads, base.ffn, (i, j), "merge")
        else:  # a plain layer, or A of a pruned pair
            weights, shape = per_layer[i], LayerShape(base.heads, base.kv_heads, base.ffn, (i,), "layer")
        tensors.update({f"{stack}.{len(shapes)}.{name}": t for name, t in weights.items()})
        shapes.append(shape)
    return Folded(
        config=_config_with_layers(config, [shape.source[0] for shape in shapes]),
        model_class=type(model),
        layer_class=type(_layers(model, stack)[0]),
        stack=stack,
        layers=shapes,
        tensors=tensors,
        pairing={"pairs": [list(pair) for pair in pairs], "modes": list(modes)},
    )


def _layer_tensors(state: Mapping[str, torch.Tensor], stack: str, index: int) -> dict[str, torch.Tensor]:
    prefix = f"{stack}.{index}."
    return {name[len(prefix):]: t.detach() for name, t in state.items() if name.startswith(prefix)}


def _kv_heads(config: Any) -> int:
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def fold_lp(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], offset: float) -> dict[str, torch.Tensor]:
    """The wide layer's tensors for the ``lp`` pair of layers with tensors ``a`` and ``b``
    (names inside the layer; the norm computes ``rms(x) * (offset + w)``)."""
    out = {}
    for name, ta in a.items():
        how, norm = FOLD_RULES[name]
        tb = b[name]
        if how == "rows":
            scaled = [t if norm is None else t * (offset + n[norm]).to(t.dtype) for t, n in ((ta, a), (tb, b))]
            out[name] = torch.cat(scaled, dim=0)
        elif how == "cols":
            out[name] = torch.cat([ta, tb], dim=1)
        elif how == "sum":
            out[name] = ta + tb
        elif how == "unit":
            out[name] = torch.full_like(ta, 1.0 - offset)
        else:  # same
            out[name] = ta.clone()
    return out


def merge_weights(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A's tensors averaged with B's, as ``mode="merge"`` averages them (:meth:`WeightStore.average_of`)."""
    store = WeightStore()
    return {name: store.average_of(t, b[name]) for name, t in a.items()}


def _config_with_layers(config: Any, sources: Sequence[int]) -> Any:
    """A copy of ``config`` for the layers ``sources`` of the original (their per-layer types kept)."""
    new = copy.deepcopy(config)
    new.num_hidden_layers = len(sources)
    types = getattr(config, "layer_types", None)
    if types is not None:
        new.layer_types = [types[i] for i in sources]
    return new


# ------------------------------------------------------------------------------------- a model


def build_model(folded: Folded, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformers model holding ``folded``'s tensors; each wide layer is a stock decoder layer
    of the source's class built from a config with its own head counts and FFN width."""
    model = folded.model_class(folded.config)
    container = model.get_submodule(folded.stack)
    for index, shape in enumerate(folded.layers):
        if shape.how == "lp":
            container[index] = folded.layer_class(layer_config(folded, shape), layer_idx=index)
    model.load_state_dict(folded.tensors, strict=True)
    return model.to(dtype).eval()


def layer_config(folded: Folded, shape: LayerShape) -> Any:
    """The model's config with one layer's head counts and FFN width."""
    config = copy.deepcopy(folded.config)
    config.head_dim = folded.head_dim
    config.num_attention_heads, config.num_key_value_heads, config.intermediate_size = (
        shape.heads, shape.kv_heads, shape.ffn,
    )
    return config


@dataclass(frozen=True)
class Source:
    """Where the model came from: a name for the metadata, and the tokenizer's files (a GGUF whose
    ``tokenizer.*`` fields are copied, or a Hugging Face directory; an hf export saves the tokenizer
    transformers loads from either)."""

    name: str
    tokenizer: Path | None = None
