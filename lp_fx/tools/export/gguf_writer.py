"""A :class:`~lp_fx.tools.export.fold.Folded` model as a GGUF file that llama.cpp loads.

Wide layers (``lp`` pairs) are written with llama.cpp's ``deci`` architecture, which takes a head
count, KV-head count and FFN width per layer; a pairing without them (prune, merge, none) keeps the
source's architecture (``llama`` for Llama and Mistral, ``qwen2``). q and k rows go in the order
llama.cpp's rotary embedding expects for ``llama``/``deci`` (the permutation llama.cpp's
``convert_hf_to_gguf.py`` applies); ``qwen2`` rotates Hugging Face's halves and keeps them. The
tokenizer is copied: the ``tokenizer.*`` fields of a source GGUF as they are, or a byte-level BPE
``tokenizer.json`` of a Hugging Face folder (tokens, merges, special ids, chat template).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lp_fx.files import atomic_write
from lp_fx.tools.export.fold import ExportError, Folded, Source

log = logging.getLogger(__name__)

# model_type -> (architecture of a model with the source's layer shapes, q/k rows permuted for it)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
WIDE_ARCHITECTURE = "deci"  # rotary in llama's order: q/k rows permuted
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}


# ------------------------------------------------------------------------------------- checks


def check_gguf(config: Any, source: Source) -> None:
    """Refuse a model this writer cannot express in llama.cpp, or a tokenizer it cannot copy."""
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        raise ExportError(
            f"model type {kind!r} has no GGUF writer here; supported: {', '.join(ARCHITECTURES)} "
            "(other models: --format hf with prune/merge pairs)"
        )
    if _sliding(config):
        raise ExportError(
            f"this {kind} model uses sliding-window attention, which llama.cpp's llama/deci architectures "
            "do not compute: the GGUF would differ from the model on long inputs"
        )
    rope = _rope_parameters(config)
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"rope scaling {rope.get('rope_type')!r} is not written by this exporter (default RoPE only)")
    if source.tokenizer is None:
        raise ExportError("no tokenizer to copy: give the model as a GGUF file or a Hugging Face folder with tokenizer.json")
    tokens = _gguf_token_count(source.tokenizer) if source.tokenizer.suffix == ".gguf" else _hf_vocab(source.tokenizer).vocab_size
    if tokens > config.vocab_size:
        raise ExportError(
            f"{source.tokenizer}: the tokenizer has {tokens} tokens, more than the model's vocabulary ({config.vocab_size})"
        )


def _gguf_token_count(path: Path) -> int:
    tokens = gguf_tokenizer_fields(path).get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ExportError(f"{path} has no tokenizer.ggml.tokens to copy")
    return len(tokens[0])


def gguf_tokenizer_fields(path: Path) -> dict[str, tuple[Any, Any, Any]]:
    """``{name: (value, type, item type of an array)}`` of the ``tokenizer.*`` fields of a GGUF (read
    once for the check and the copy, unless the file changed: parsing a 49k-token vocabulary takes seconds)."""
    return _tokenizer_fields(path.resolve(), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _tokenizer_fields(path: Path, mtime_ns: int) -> dict[str, tuple[Any, Any, Any]]:
    import gguf  # lazy: only a GGUF export needs gguf

    fields = {}
    for name, field in gguf.GGUFReader(path).fields.items():
        if name.startswith("tokenizer."):
            kind = field.types[0]
            fields[name] = (field.contents(), kind, field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    return fields


def _sliding(config: Any) -> bool:
    types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in types):
        return True
    return config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None


def _rope_parameters(config: Any) -> dict:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(rope)


def _rope_theta(config: Any) -> float:
    return float(_rope_parameters(config).get("rope_theta") or getattr(config, "rope_theta"))


def _hf_vocab(directory: Path) -> Any:
    from gguf.vocab import BpeVocab  # lazy: only a GGUF export needs gguf

    try:
        return BpeVocab(directory)
    except (FileNotFoundError, ValueError, KeyError) as error:
        raise ExportError(
            f"{directory}: no byte-level BPE tokenizer.json to copy ({error}); other tokenizers are not written"
        ) from None


# ---------------------------------------------------------------------------------------- write


def write_gguf(folded: Folded, path: Path, dtype: str, source: Source) -> None:
    """Write ``folded`` to ``path`` (a temporary name in its folder, then renamed)."""
    import gguf  # lazy: only a GGUF export needs gguf

    config = folded.config
    arch, _ = ARCHITECTURES[config.model_type]
    arch = WIDE_ARCHITECTURE if folded.wide else arch

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        _add_hyperparameters(writer, folded, dtype)
        _add_metadata(writer, folded, source)
        _add_tokenizer(writer, source.tokenizer, config.vocab_size)
        for name, array, qtype in gguf_tensors(folded, dtype, arch):
            writer.add_tensor(name, array, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(path, write)


def _add_hyperparameters(writer: Any, folded: Folded, dtype: str) -> None:
    import gguf  # lazy: only a GGUF export needs gguf

    config, layers = folded.config, folded.layers
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(len(layers))
    writer.add_vocab_size(int(config.vocab_size))
    per_layer = (lambda values: list(values)) if folded.wide else (lambda values: values[0])
    writer.add_feed_forward_length(per_layer([layer.ffn for layer in layers]))
    writer.add_head_count(per_layer([layer.heads for layer in layers]))
    writer.add_head_count_kv(per_layer([layer.kv_heads for layer in layers]))
    writer.add_key_length(folded.head_dim)  # not hidden / heads of layer 0, which may be wide
    writer.add_value_length(folded.head_dim)
    writer.add_rope_dimension_count(folded.head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[dtype]))


def _add_metadata(writer: Any, folded: Folded, source: Source) -> None:
    pairs = ", ".join(f"{i}-{j} {mode}" for (i, j), mode in zip(folded.pairing["pairs"], folded.pairing["modes"]))
    writer.add_name(f"{source.name} lp_fx[{pairs or 'baseline'}]")
    writer.add_string("lp_fx.source", source.name)
    writer.add_string("lp_fx.pairing", json.dumps(folded.pairing))
    writer.add_string("lp_fx.layer_sources", json.dumps([list(layer.source) for layer in folded.layers]))


def _add_tokenizer(writer: Any, tokenizer: Path, vocab_size: int) -> None:
    if tokenizer.suffix == ".gguf":
        _copy_gguf_tokenizer(writer, tokenizer)
    else:
        _add_hf_tokenizer(writer, tokenizer, vocab_size)


def _copy_gguf_tokenizer(writer: Any, path: Path) -> None:
    """Every ``tokenizer.*`` field of the source GGUF, with its value types."""
    for name, (value, kind, sub_type) in gguf_tokenizer_fields(path).items():
        writer.add_key_value(name, value, kind, sub_type=sub_type)


def _add_hf_tokenizer(writer: Any, directory: Path, vocab_size: int) -> None:
    """A byte-level BPE vocabulary, padded to the model's vocabulary size as convert_hf_to_gguf pads it."""
    import gguf  # lazy: only a GGUF export needs gguf
    from gguf.vocab import SpecialVocab  # lazy: only a GGUF export needs gguf

    vocab = _hf_vocab(directory)
    tokens, _, types = zip(*vocab.all_tokens())
    padding = range(len(tokens), vocab_size)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_tokenizer_pre("default")
    writer.add_token_list([*tokens, *(f"[PAD{i}]" for i in padding)])
    writer.add_token_types([*map(int, types), *(int(gguf.TokenType.UNUSED) for _ in padding)])
    SpecialVocab(directory, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


# -------------------------------------------------------------------------------------- tensors


def gguf_tensors(folded: Folded, dtype: str, arch: str) -> list[tuple[str, np.ndarray, Any]]:
    """``(GGUF name, data, GGML type)`` for every tensor, q/k permuted where ``arch`` rotates in llama's order."""
    permuted = arch == WIDE_ARCHITECTURE or ARCHITECTURES[folded.config.model_type][1]
    out = []
    for name, tensor in _named_tensors(folded):
        layer = int(name.split(".")[1]) if name.startswith("blk.") else None
        if permuted and layer is not None and name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = folded.layers[layer].heads if name.split(".")[-2] == "attn_q" else folded.layers[layer].kv_heads
            tensor = rotary_order(tensor, heads)
        out.append((name, *_encode(tensor, dtype)))
    return out


def _named_tensors(folded: Folded) -> list[tuple[str, torch.Tensor]]:
    """The tensors under their GGUF names; tied embeddings are written out as ``output.weight``."""
    tensors = folded.tensors
    out = [(TOP_NAMES[name], tensors[name]) for name in TOP_NAMES]
    out.append(("output.weight", tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])))
    prefix = folded.stack + "."
    for name, tensor in tensors.items():
        if not name.startswith(prefix):
            if name not in TOP_NAMES and name != "lm_head.weight":
                raise ExportError(f"tensor {name} has no GGUF name here")
            continue
        index, rest = name[len(prefix):].split(".", 1)
        module, kind = rest.rsplit(".", 1)
        if module not in LAYER_NAMES:
            raise ExportError(f"tensor {name} has no GGUF name here")
        out.append((f"blk.{index}.{LAYER_NAMES[module]}.{kind}", tensor))
    return out


def rotary_order(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's q/k rows (each head's two rotary halves) in llama.cpp's interleaved order:
    ``permute`` of llama.cpp's convert_hf_to_gguf.py."""
    rows = tensor.shape[0]
    return tensor.reshape(heads, 2, rows // heads // 2, *tensor.shape[1:]).swapaxes(1, 2).reshape(tensor.shape)


def _encode(tensor: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """The data and GGML type: 1-D tensors (norms, biases) stay f32, as llama.cpp's converter keeps
    them; q8_0 needs rows of whole 32-blocks (others fall back to f16)."""
    import gguf  # lazy: only a GGUF export needs gguf
    from gguf.quants import quantize  # lazy: only a GGUF export needs gguf

    data = tensor.detach().to(torch.float32).contiguous().numpy()
    if data.ndim == 1 or dtype == "f32":
        return data, gguf.GGMLQuantizationType.F32
    if dtype == "q8_0" and data.shape[-1] % 32 == 0:
        return quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), gguf.GGMLQuantizationType.F16
