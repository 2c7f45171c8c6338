"""A :class:`~lp_fx.tools.export.fold.Folded` model as a GGUF file that llama.cpp loads.

Wide layers (``lp`` pairs) are written with llama.cpp's ``deci`` architecture, which takes a head
count, KV-head count and FFN width per layer; a pairing without them (prune, merge, none) keeps the
source's architecture (``llama`` for Llama and Mistral, ``qwen2``, ``gemma3``). q and k rows go in the
order llama.cpp's rotary embedding expects for ``llama``/``deci`` (the permutation llama.cpp's
``convert_hf_to_gguf.py`` applies); ``qwen2`` and ``gemma3`` rotate Hugging Face's halves and keep
them. ``gemma3`` layers keep their own attention type: the file lists which layers slide
(``attention.sliding_window_pattern``, one flag per layer), since a pruned model no longer follows
the 5 : 1 period llama.cpp assumes otherwise; its norms are stored as ``1 + w``, as llama.cpp's
converter stores Gemma's. A tied output head is not written: llama.cpp reads ``token_embd``. The
tokenizer is copied: the ``tokenizer.*`` fields of a source GGUF as they are, or a byte-level BPE
``tokenizer.json`` of a Hugging Face folder (tokens, merges, special ids, chat template).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lp_fx.files import atomic_write
from lp_fx.tools.export.fold import ExportError, Folded, Source, config_head_dim

log = logging.getLogger(__name__)

LLAMA_LAYER_NAMES = {
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
GEMMA3_LAYER_NAMES = {
    **LLAMA_LAYER_NAMES,
    "post_attention_layernorm": "post_attention_norm",  # sandwich norms: the attention output's
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}


@dataclass(frozen=True)
class GgufArchitecture:
    """How llama.cpp's architecture ``name`` holds a model of one Hugging Face ``model_type``."""

    name: str
    permuted: bool  # q/k rows in llama's interleaved rotary order
    layer_names: Mapping[str, str]
    norm_offset: float = 0.0  # stored norm weight = offset + w (Gemma's norms compute rms(x) * (1 + w))
    sliding: bool = False  # computes sliding-window layers, per-layer flags read from the file


LLAMA = GgufArchitecture("llama", True, LLAMA_LAYER_NAMES)
ARCHITECTURES = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": GgufArchitecture("qwen2", False, LLAMA_LAYER_NAMES),
    "gemma3_text": GgufArchitecture("gemma3", False, GEMMA3_LAYER_NAMES, norm_offset=1.0, sliding=True),
}
WIDE = GgufArchitecture("deci", True, LLAMA_LAYER_NAMES)  # per-layer widths; rotary in llama's order
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}


# ------------------------------------------------------------------------------------- checks


def check_gguf(config: Any, source: Source, wide: bool = False) -> None:
    """Refuse a model this writer cannot express in llama.cpp (with ``wide`` layers: in ``deci``), or
    a tokenizer it cannot copy."""
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        raise ExportError(
            f"model type {kind!r} has no GGUF writer here; supported: {', '.join(ARCHITECTURES)} "
            "(other models: --format hf with prune/merge pairs)"
        )
    arch = WIDE if wide else ARCHITECTURES[kind]
    if _sliding(config) and not arch.sliding:
        raise ExportError(
            f"this {kind} model uses sliding-window attention, which llama.cpp's {arch.name} architecture "
            "does not compute: the GGUF would differ from the model on long inputs"
        )
    ropes = _ropes(config)
    for rope in ropes.values():
        if rope.get("rope_type", "default") != "default":
            raise ExportError(f"rope scaling {rope.get('rope_type')!r} is not written by this exporter (default RoPE only)")
    if arch.sliding and _sliding(config) and "rope_theta" not in ropes.get("sliding_attention", {}):
        raise ExportError(f"this {kind} model's config gives its sliding layers no RoPE base "
                          "(rope_parameters['sliding_attention']['rope_theta']): the GGUF would rotate them wrongly")
    problem = _attention_problem(config)
    if problem:
        raise ExportError(f"this {kind} model {problem}, which llama.cpp's {arch.name} architecture does not compute")
    if source.tokenizer is None:
        raise ExportError("no tokenizer to copy: give the model as a GGUF file or a Hugging Face folder with tokenizer.json")
    tokens = _gguf_token_count(source.tokenizer) if source.tokenizer.suffix == ".gguf" else _hf_vocab(source.tokenizer).vocab_size
    if tokens > config.vocab_size:
        raise ExportError(
            f"{source.tokenizer}: the tokenizer has {tokens} tokens, more than the model's vocabulary ({config.vocab_size})"
        )


def _attention_problem(config: Any) -> str | None:
    """What of the model's attention or head a GGUF here cannot say: llama.cpp scales scores by
    1/sqrt(head size) and caps no logits."""
    scalar = getattr(config, "query_pre_attn_scalar", None)
    head_dim = config_head_dim(config)
    if scalar is not None and scalar != head_dim:
        return f"scales attention scores by 1/sqrt({scalar}), not 1/sqrt(head size {head_dim})"
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, name, None) is not None:
            return f"caps logits ({name} = {getattr(config, name)})"
    return None


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


def _ropes(config: Any) -> dict[str, dict]:
    """RoPE parameters by attention type (Gemma 3 gives its sliding and global layers their own
    base); a model with one set gives it for ``full_attention``."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if rope and all(isinstance(value, Mapping) for value in rope.values()):
        return {kind: dict(value) for kind, value in rope.items()}
    return {"full_attention": rope}


def _rope_theta(config: Any, kind: str = "full_attention") -> float:
    return float(_ropes(config).get(kind, {}).get("rope_theta") or getattr(config, "rope_theta"))


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
    arch = gguf_architecture(folded)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, arch.name)
        _add_hyperparameters(writer, folded, dtype, arch)
        _add_metadata(writer, folded, source)
        _add_tokenizer(writer, source.tokenizer, config.vocab_size)
        for name, array, qtype in gguf_tensors(folded, dtype, arch):
            writer.add_tensor(name, array, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(path, write)


def gguf_architecture(folded: Folded) -> GgufArchitecture:
    """The llama.cpp architecture ``folded`` is written as."""
    return WIDE if folded.wide else ARCHITECTURES[folded.config.model_type]


def _add_hyperparameters(writer: Any, folded: Folded, dtype: str, arch: GgufArchitecture) -> None:
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
    if arch.sliding:
        writer.add_sliding_window(int(config.sliding_window))
        writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in config.layer_types])
        writer.add_rope_freq_base_swa(_rope_theta(config, "sliding_attention"))
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


def gguf_tensors(folded: Folded, dtype: str, arch: GgufArchitecture) -> list[tuple[str, np.ndarray, Any]]:
    """``(GGUF name, data, GGML type)`` for every tensor, q/k permuted where ``arch`` rotates in
    llama's order, norm weights stored as ``arch`` reads them."""
    out = []
    for name, tensor in _named_tensors(folded, arch):
        layer = int(name.split(".")[1]) if name.startswith("blk.") else None
        if name.endswith("norm.weight") and arch.norm_offset:
            tensor = tensor + arch.norm_offset
        if arch.permuted and layer is not None and name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = folded.layers[layer].heads if name.split(".")[-2] == "attn_q" else folded.layers[layer].kv_heads
            tensor = rotary_order(tensor, heads)
        out.append((name, *_encode(tensor, dtype)))
    return out


def _named_tensors(folded: Folded, arch: GgufArchitecture) -> list[tuple[str, torch.Tensor]]:
    """The tensors under their GGUF names; a head tied to the embeddings is not written (llama.cpp
    reads ``token_embd``, as for the files its converter writes)."""
    tensors = folded.tensors
    out = [(TOP_NAMES[name], tensors[name]) for name in TOP_NAMES]
    if not getattr(folded.config, "tie_word_embeddings", False):
        out.append(("output.weight", tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])))
    prefix = folded.stack + "."
    for name, tensor in tensors.items():
        if not name.startswith(prefix):
            if name not in TOP_NAMES and name != "lm_head.weight":
                raise ExportError(f"tensor {name} has no GGUF name here")
            continue
        index, rest = name[len(prefix):].split(".", 1)
        module, kind = rest.rsplit(".", 1)
        if module not in arch.layer_names:
            raise ExportError(f"tensor {name} has no GGUF name in llama.cpp's {arch.name} architecture")
        out.append((f"blk.{index}.{arch.layer_names[module]}.{kind}", tensor))
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
