"""Tiny models whose vocabulary fits a tiny byte-level BPE tokenizer, with norms and biases spread
away from 1 and 0: what the export tests fold, write and read back."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers.models import VOCAB, hf_model, init_scale


PAIRS = [(1, 2), (3, 4)]


LAYERS = 6


BPE_VOCAB = 320  # the tiny BPE tokenizer has fewer tokens: the GGUF's list is padded to this


def spread(model: torch.nn.Module) -> torch.nn.Module:
    """Random matrices, and norm weights and biases away from 1 and 0, so that a norm folded into
    the wrong columns (or a bias dropped) changes the logits."""
    init_scale(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                centre = 1.0 if "norm" in name else 0.0
                p.copy_(centre + 0.3 * torch.randn(p.shape, generator=gen))
    return model


def tiny(arch: str, layers: int = LAYERS) -> torch.nn.Module:
    if arch == "gemma":  # Gemma (1): pre-norm RMSNorm computing x * (1 + w)
        import transformers as tf

        torch.manual_seed(0)
        config = tf.GemmaConfig(vocab_size=VOCAB, num_hidden_layers=layers, hidden_size=64, intermediate_size=128,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16)
        model = tf.GemmaForCausalLM(config).eval()
    elif arch == "qwen3":
        import transformers as tf

        torch.manual_seed(0)
        config = tf.Qwen3Config(vocab_size=VOCAB, num_hidden_layers=layers, hidden_size=64, intermediate_size=128,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16)
        model = tf.Qwen3ForCausalLM(config).eval()
    else:
        model = hf_model(arch, layers=layers)
    return spread(model)


def save_bpe_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    backend.train_from_iterator(["the cat sat on the mat and the dog ran far away\n"] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(path)
    return path


def bpe_model(arch: str = "llama", layers: int = LAYERS, tied: bool = False) -> torch.nn.Module:
    """A tiny model whose vocabulary fits the tiny BPE tokenizer; Gemma 3's sliding (window 4) and
    global layers alternate, not in its real 5 : 1 period."""
    import transformers as tf

    torch.manual_seed(0)
    config_class, model_class = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                                 "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
                                 "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM)}[arch]
    gemma3 = dict(sliding_window=4, query_pre_attn_scalar=16,
                  layer_types=["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2))
    config = config_class(vocab_size=BPE_VOCAB, num_hidden_layers=layers, hidden_size=64, intermediate_size=128,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=tied,
                          max_position_embeddings=256, rms_norm_eps=1e-5, **(gemma3 if arch == "gemma3" else {}))
    return spread(model_class(config).eval())
