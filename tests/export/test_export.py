"""``lp-fx export``: an lp pair folded into one wide stock decoder layer equals the pass; prune/merge
give a plain model with fewer layers; the GGUF holds the right names, shapes and per-layer arrays;
every refusal comes before anything is written."""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lp_fx import LayerParallel, LayerParallelError
from lp_fx.tools.export import write as ex
from lp_fx.tools.export import gguf_writer
from lp_fx.tools.export.fold import ExportError, Source, build_model, fold

from tests.helpers.models import VOCAB, hf_model
from tests.helpers.bpe import BPE_VOCAB, LAYERS, PAIRS, bpe_model, tiny

NEW_TOKENS = 16


def lp_pass(model, pairs=PAIRS, mode="lp"):
    return torch.compile(model, backend=LayerParallel(pairs=pairs, mode=mode, inner="eager", strict=True))


def ids(seed=0, batch=2, length=12):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens, use_cache=False).logits


def greedy(model, tokens):
    with torch.no_grad():
        return model.generate(tokens, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                              cache_implementation="static", pad_token_id=0)


# ----------------------------------------------------------------------- the wide model is the pass


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma"])
def test_wide_layers_equal_the_lp_pass(arch):
    model = tiny(arch)
    wide = build_model(fold(model, PAIRS, ["lp", "lp"]))
    layers = list(wide.model.layers)
    assert len(layers) == LAYERS - len(PAIRS)
    assert [type(layer) for layer in layers] == [type(model.model.layers[0])] * len(layers)  # stock layers
    assert [layer.self_attn.config.num_attention_heads for layer in layers] == [4, 8, 8, 4]
    assert [layer.mlp.gate_proj.out_features for layer in layers] == [128, 256, 256, 128]
    tokens = ids()
    expected = logits(lp_pass(model), tokens)
    assert (logits(wide, tokens) - expected).abs().max() <= 1e-4
    assert (logits(model, tokens) - expected).abs().max() > 0.1, "pairing should change a random tiny model"


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_wide_layers_generate_what_the_lp_pass_generates(arch):
    model = tiny(arch)
    wide = build_model(fold(model, PAIRS, ["lp", "lp"]))
    tokens = ids(seed=3, batch=1, length=6)
    got = greedy(wide, tokens)
    plain = greedy(model, tokens)
    model.forward = torch.compile(model.forward, backend=LayerParallel(pairs=PAIRS, inner="eager", strict=True))
    expected = greedy(model, tokens)
    assert got.shape[1] == tokens.shape[1] + NEW_TOKENS
    assert torch.equal(got, expected)
    assert not torch.equal(plain, expected)


def test_mixed_pairing_folds_each_pair_in_its_mode(tmp_path):
    model = tiny("llama", layers=8)
    pairs, modes = [(1, 2), (3, 4), (5, 6)], ["lp", "merge", "prune"]
    folded = fold(model, pairs, modes)
    assert [(layer.source, layer.how) for layer in folded.layers] == [
        ((0,), "layer"), ((1, 2), "lp"), ((3, 4), "merge"), ((5,), "layer"), ((7,), "layer")
    ]
    plan = {"num_layers": 8, "pairs": [list(p) for p in pairs], "modes": modes}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    compiled = torch.compile(model, backend=LayerParallel(plan=str(path), inner="eager", strict=True))
    tokens = ids()
    assert (logits(build_model(folded), tokens) - logits(compiled, tokens)).abs().max() <= 1e-4


def test_equal_per_head_norms_fold_and_different_ones_are_refused():
    model = tiny("qwen3")
    with torch.no_grad():  # spread() made every q/k norm different: make pair (1, 2)'s equal
        for name in ("q_norm", "k_norm"):
            getattr(model.model.layers[2].self_attn, name).weight.copy_(getattr(model.model.layers[1].self_attn, name).weight)
    tokens = ids()
    wide = build_model(fold(model, [(1, 2)], ["lp"]))
    assert (logits(wide, tokens) - logits(lp_pass(model, [(1, 2)]), tokens)).abs().max() <= 1e-4
    with pytest.raises(ExportError, match=r"pair \(3, 4\).*self_attn.q_norm.weight differs between layers 3 and 4"):
        fold(model, [(3, 4)], ["lp"])


def test_a_fine_tuned_checkpoint_is_folded_in_first(tmp_path, bpe_dir):
    from lp_fx.checkpoint import layer_parameter_names, pairing_record, save_checkpoint, unique_tensors

    model = bpe_model()
    trained = unique_tensors(model, layer_parameter_names(model, "model.layers", [1, 2]))
    changed = {name: t + 0.05 * torch.randn_like(t) for name, t in trained.items()}
    save_checkpoint(tmp_path / "ckpt", changed, pairing_record(model, [(1, 2)], ["lp"]), {"step": 1})
    out = tmp_path / "m.gguf"
    folded = ex.export(model, [(1, 2)], ["lp"], out, Source("tiny", bpe_dir), checkpoint=tmp_path / "ckpt")
    assert torch.equal(model.model.layers[1].self_attn.q_proj.weight, changed["model.layers.1.self_attn.q_proj.weight"])
    tokens = ids()
    assert (logits(build_model(folded), tokens) - logits(lp_pass(model, [(1, 2)]), tokens)).abs().max() <= 1e-4


def test_a_lora_checkpoint_is_merged_then_folded(tmp_path, bpe_dir):
    import copy

    from lp_fx.adapter import adapter_record
    from lp_fx.checkpoint import pairing_record, save_checkpoint
    from lp_fx.tools.training import lora

    model = bpe_model()
    adapted = copy.deepcopy(model)
    config = lora.add_adapters(adapted, lora.lora_targets(adapted, "model.layers", [1, 2], None), rank=2, alpha=4.0)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.05)
    pairing = {**pairing_record(model, [(1, 2)], ["lp"]), "adapter": adapter_record(config)}
    save_checkpoint(tmp_path / "ckpt", lora.adapter_tensors(adapted), pairing, {"step": 1}, config)
    folded = ex.export(model, [(1, 2)], ["lp"], tmp_path / "m.gguf", Source("tiny", bpe_dir), checkpoint=tmp_path / "ckpt")
    tokens = ids()  # the reference: peft computing the unmerged adapters inside the paired model
    assert (logits(build_model(folded), tokens) - logits(lp_pass(adapted, [(1, 2)]), tokens)).abs().max() <= 1e-4


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, bpe_dir):
    refused(tmp_path, tiny("llama"), [(1, 2)], ["lp"], r"the tokenizer has \d+ tokens, more than the model's vocabulary \(128\)",
            tokenizer=bpe_dir)


# -------------------------------------------------------------------------------- prune / merge: hf


@pytest.mark.parametrize("mode", ["prune", "merge"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])  # Gemma 3: its sliding and global layers alternate here
def test_hf_export_of_prune_and_merge_loads_and_equals_the_pass(tmp_path, bpe_dir, arch, mode):
    from transformers import AutoModelForCausalLM

    model = tiny(arch)
    out = tmp_path / "hf"
    ex.export(model, PAIRS, [mode, mode], out, Source("tiny", bpe_dir), fmt="hf")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.num_hidden_layers == LAYERS - len(PAIRS)
    assert loaded.config.lp_fx_export == {"pairs": [list(p) for p in PAIRS], "modes": [mode, mode]}
    tokens = ids()
    assert (logits(loaded, tokens) - logits(lp_pass(model, mode=mode), tokens)).abs().max() <= 1e-4


def test_hf_export_holds_the_tokenizer_with_its_chat_template_and_special_tokens(tmp_path, bpe_dir):
    from transformers import AutoTokenizer

    out = tmp_path / "hf"
    ex.export(bpe_model(), PAIRS, ["prune", "merge"], out, Source("tiny", bpe_dir), fmt="hf")
    source, exported = (AutoTokenizer.from_pretrained(path) for path in (bpe_dir, out))
    text = "the cat sat on the mat"
    assert exported(text).input_ids == source(text).input_ids and len(exported) == len(source)
    assert exported.chat_template == source.chat_template and "messages" in exported.chat_template
    assert (exported.eos_token, exported.bos_token) == (source.eos_token, source.bos_token) == ("<|endoftext|>",) * 2


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_hf_export_folder_has_the_permissions_mkdir_and_open_give(tmp_path, bpe_dir, umask):
    out = tmp_path / "hf"
    previous = os.umask(umask)
    try:
        ex.export(bpe_model(), PAIRS, ["prune", "prune"], out, Source("tiny", bpe_dir), fmt="hf")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    files = {path.name: stat.S_IMODE(path.stat().st_mode) for path in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= files.keys()
    assert files == dict.fromkeys(files, 0o666 & ~umask)


def test_an_export_removes_what_killed_exports_of_its_output_left(tmp_path, bpe_dir, caplog):
    """A SIGKILLed export leaves its temporary file (GGUF) or folder (hf) beside the output: the next
    export of that output removes those untouched for over an hour, and nothing else."""
    def leftover(name, folder=False, old=True, file_written_now=False):
        path = tmp_path / name
        file = path / "model.safetensors" if folder else path
        file.parent.mkdir(exist_ok=True)
        file.write_bytes(b"partial")
        hours_ago = time.time() - 2 * 3600
        for item in {path, file} if old else ():
            if not (item == file and file_written_now):
                os.utime(item, (hours_ago, hours_ago))
        return path

    killed = [leftover(".m.gguf.k1ll3d_a.tmp"), leftover(".m.gguf.k1ll3d_b.tmp", folder=True)]
    kept = [
        leftover(".m.gguf.wr1t1ng0.tmp", old=False),  # being written by a running export
        leftover(".m.gguf.wr1t1ng1.tmp", folder=True, file_written_now=True),  # a file in it is being written
        leftover(".m.a1b2c3d4.tmp"),  # another output's (m, not m.gguf)
        leftover(".m.gguf.x.tmp"),  # not a name mkstemp makes
        leftover("m.gguf.k1ll3d_c.tmp"),  # not hidden: not a temporary name
    ]
    caplog.set_level(logging.INFO, logger="lp_fx")
    ex.export(bpe_model(), PAIRS, ["lp", "lp"], tmp_path / "m.gguf", Source("tiny", bpe_dir))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.gguf", *(p.name for p in kept)])
    removed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("removing")]
    assert len(removed) == 2 and all(any(p.name in m for m in removed) for p in killed)


# ----------------------------------------------------------------------------------------- refusals


def refused(tmp_path, model, pairs, modes, match, **kwargs):
    out = tmp_path / "out" / ("m" if kwargs.get("fmt") == "hf" else "m.gguf")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(LayerParallelError, match=match):
        ex.export(model, pairs, modes, out, Source("tiny", kwargs.pop("tokenizer", None)), **kwargs)
    assert not out.exists()
    assert not out.parent.exists() or not list(out.parent.iterdir())  # no partial or temporary file
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


@pytest.mark.parametrize(("arch", "pairs", "modes", "match"), [
    ("llama", [(1, 2)], ["block"], r"pair \(1, 2\) has mode 'block', which is not one layer"),
    ("gemma3", [(1, 2)], ["lp"], r"pair \(1, 2\), lp: layer 1 \(Gemma3DecoderLayer\) is post-norm"),
    ("gpt2", [(1, 2)], ["lp"], r"layer 1 \(GPT2Block\) uses LayerNorm"),
    ("llama", [(2, 3), (5, 6)], ["lp", "lp"], r"pair \(5, 6\) is past the last layer: the model has 6 layers"),
    ("llama", [(1, 3)], ["lp"], r"pair \(1, 3\) is not two consecutive layers"),
])
def test_unfoldable_pairings_are_refused_before_anything_is_written(tmp_path, bpe_dir, arch, pairs, modes, match):
    model = hf_model(arch, layers=LAYERS) if arch in ("gemma3", "gpt2") else tiny(arch)
    refused(tmp_path, model, pairs, modes, match, tokenizer=bpe_dir)


def test_layers_of_different_shapes_are_refused(tmp_path, bpe_dir):
    from transformers.models.llama.modeling_llama import LlamaMLP

    model = tiny("llama")
    narrow = model.config.__class__(**{**model.config.to_dict(), "intermediate_size": 96})
    model.model.layers[2].mlp = LlamaMLP(narrow)
    refused(tmp_path, model, [(1, 2)], ["merge"], r"layers 1 and 2 differ in shape: mlp.down_proj.weight", tokenizer=bpe_dir)


@pytest.mark.parametrize(("arch", "modes", "kwargs", "match"), [
    ("llama", ["lp"], {"fmt": "hf"}, "an lp pairing has layers of two widths"),
    ("llama", ["prune"], {"fmt": "hf", "dtype": "q8_0"}, "dtype q8_0 is a GGUF type"),
    ("llama", ["lp"], {"dtype": "bf16"}, "dtype 'bf16': expected one of f32, f16, q8_0"),
    ("mistral", ["lp"], {}, "sliding-window attention"),
    ("gemma", ["lp"], {}, "model type 'gemma' has no GGUF writer here"),
    ("gemma3", ["prune"], {}, r"scales attention scores by 1/sqrt\(256\), not 1/sqrt\(head size 16\)"),
    ("llama", ["lp"], {"tokenizer": None}, "no tokenizer to copy"),
    ("llama", ["prune"], {"fmt": "hf", "tokenizer": None}, "no tokenizer to copy: an hf export holds its model's"),
])
def test_outputs_that_cannot_hold_the_export_are_refused(tmp_path, bpe_dir, arch, modes, kwargs, match):
    refused(tmp_path, tiny(arch), [(1, 2)], modes, match, **{"tokenizer": bpe_dir, **kwargs})


def test_a_failed_write_leaves_the_previous_file_and_no_partial_one(tmp_path, bpe_dir, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous")

    def fail(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf_writer, "gguf_tensors", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        ex.export(bpe_model(), PAIRS, ["lp", "lp"], out, Source("tiny", bpe_dir))
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


# --------------------------------------------------------------------------------------------- gguf


def read(path: Path):
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def test_gguf_of_wide_layers_is_deci_with_per_layer_widths(tmp_path, bpe_dir):
    model = bpe_model(tied=True)
    out = tmp_path / "m.gguf"
    folded = ex.export(model, PAIRS, ["lp", "lp"], out, Source("tiny-bpe", bpe_dir))
    fields, tensors = read(out)
    assert fields["general.architecture"] == "deci"
    assert fields["deci.block_count"] == 4
    assert fields["deci.attention.head_count"] == [4, 8, 8, 4]
    assert fields["deci.attention.head_count_kv"] == [2, 4, 4, 2]
    assert fields["deci.feed_forward_length"] == [128, 256, 256, 128]
    assert fields["deci.attention.key_length"] == 16 and fields["deci.rope.dimension_count"] == 16
    assert json.loads(fields["lp_fx.pairing"]) == {"pairs": [[1, 2], [3, 4]], "modes": ["lp", "lp"]}
    assert json.loads(fields["lp_fx.layer_sources"]) == [[0], [1, 2], [3, 4], [5]]
    assert fields["lp_fx.source"] == "tiny-bpe"
    expected = {"token_embd.weight": (64, BPE_VOCAB), "output_norm.weight": (64,)}  # tied: no output.weight
    for i, layer in enumerate(folded.layers):
        w = layer.heads // 4
        expected.update({f"blk.{i}.attn_norm.weight": (64,), f"blk.{i}.ffn_norm.weight": (64,),
                         f"blk.{i}.attn_q.weight": (64, 64 * w), f"blk.{i}.attn_k.weight": (64, 32 * w),
                         f"blk.{i}.attn_v.weight": (64, 32 * w), f"blk.{i}.attn_output.weight": (64 * w, 64),
                         f"blk.{i}.ffn_gate.weight": (64, 128 * w), f"blk.{i}.ffn_up.weight": (64, 128 * w),
                         f"blk.{i}.ffn_down.weight": (128 * w, 64)})
    assert {name: tuple(int(d) for d in t.shape) for name, t in tensors.items()} == expected
    q = folded.tensors["model.layers.1.self_attn.q_proj.weight"]
    assert np.array_equal(tensors["blk.1.attn_q.weight"].data, gguf_writer.rotary_order(q, 8).numpy())
    assert np.all(tensors["blk.1.attn_norm.weight"].data == 1)
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == BPE_VOCAB and tokens[-1] == f"[PAD{BPE_VOCAB - 1}]" and tokens[0] == "<|endoftext|>"
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.merges"]
    assert fields["tokenizer.ggml.eos_token_id"] == 0 and "messages" in fields["tokenizer.chat_template"]


def test_gguf_of_prune_keeps_the_source_architecture(tmp_path, bpe_dir):
    for arch, name, bias in (("llama", "llama", False), ("qwen2", "qwen2", True), ("gemma3", "gemma3", False)):
        out = tmp_path / f"{arch}.gguf"
        folded = ex.export(bpe_model(arch), PAIRS, ["prune", "merge"], out, Source("tiny", bpe_dir))
        fields, tensors = read(out)
        assert fields["general.architecture"] == name
        assert fields[f"{name}.block_count"] == 4 and fields[f"{name}.attention.head_count"] == 4
        assert ("blk.0.attn_q.bias" in tensors) == bias and "output.weight" in tensors  # untied head
        q = folded.tensors["model.layers.2.self_attn.q_proj.weight"]
        permuted = gguf_writer.rotary_order(q, 4) if name == "llama" else q  # qwen2, gemma3 rotate HF's halves
        assert np.array_equal(tensors["blk.2.attn_q.weight"].data, permuted.numpy())


def test_gguf_of_gemma3_lists_each_kept_layers_attention_type_and_stores_norms_as_one_plus_w(tmp_path, bpe_dir):
    out = tmp_path / "g.gguf"
    folded = ex.export(bpe_model("gemma3", tied=True), PAIRS, ["prune", "merge"], out, Source("tiny", bpe_dir))
    fields, tensors = read(out)
    # layers 0, 1, 3, 5 kept: sliding, global, global, global (no period llama.cpp could assume)
    assert fields["gemma3.attention.sliding_window_pattern"] == [True, False, False, False]
    assert fields["gemma3.attention.sliding_window"] == 4
    assert fields["gemma3.rope.freq_base"] == 1e6 and fields["gemma3.rope.freq_base_swa"] == 1e4
    assert "output.weight" not in tensors  # tied
    for hf, name in (("model.layers.1.pre_feedforward_layernorm.weight", "blk.1.ffn_norm.weight"),
                     ("model.layers.1.post_attention_layernorm.weight", "blk.1.post_attention_norm.weight"),
                     ("model.layers.1.self_attn.k_norm.weight", "blk.1.attn_k_norm.weight"),
                     ("model.norm.weight", "output_norm.weight")):
        assert np.array_equal(tensors[name].data, (folded.tensors[hf] + 1).numpy()), name


@pytest.mark.parametrize(("dtype", "matrix_type", "tolerance"), [("f16", "F16", 2e-3), ("q8_0", "Q8_0", 2e-2)])
def test_gguf_dtypes_hold_the_weights(tmp_path, bpe_dir, dtype, matrix_type, tolerance):
    import gguf
    from gguf.quants import dequantize

    out = tmp_path / "m.gguf"
    folded = ex.export(bpe_model(), PAIRS, ["lp", "lp"], out, Source("tiny", bpe_dir), dtype=dtype)
    _, tensors = read(out)
    down = tensors["blk.1.ffn_down.weight"]
    assert down.tensor_type.name == matrix_type and tensors["blk.1.ffn_norm.weight"].tensor_type.name == "F32"
    values = dequantize(down.data, down.tensor_type).reshape(64, 256)
    expected = folded.tensors["model.layers.1.mlp.down_proj.weight"].numpy()
    assert np.abs(values - expected).max() <= tolerance * np.abs(expected).max()
    assert gguf.GGMLQuantizationType[matrix_type] == down.tensor_type


def test_rotary_order_interleaves_each_heads_halves():
    rows = torch.arange(2 * 8).float().unsqueeze(1)  # 2 heads of dimension 8: halves (0..3, 4..7)
    assert gguf_writer.rotary_order(rows, 2).squeeze(1).tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_tokenizer_fields_of_a_gguf_source_are_copied(tmp_path, bpe_dir):
    first, second = tmp_path / "a.gguf", tmp_path / "b.gguf"
    ex.export(bpe_model(), [], [], first, Source("tiny", bpe_dir))
    ex.export(bpe_model(), PAIRS, ["lp", "lp"], second, Source("a.gguf", first))
    a, b = (read(path)[0] for path in (first, second))
    tokenizer_a = {k: v for k, v in a.items() if k.startswith("tokenizer.")}
    assert tokenizer_a and tokenizer_a == {k: v for k, v in b.items() if k.startswith("tokenizer.")}
    assert a["general.architecture"] == "llama" and a["llama.block_count"] == LAYERS


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_exports_a_range_a_plan_and_the_baseline(tmp_path, bpe_model_dir, capsys):
    from lp_fx.tools import cli

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"num_layers": LAYERS, "pairs": [[1, 2], [3, 4]], "modes": ["lp", "merge"]}))
    runs = {"range": ["--pairs", "1:5"], "plan": ["--plan", str(plan)], "baseline": ["--pairs", "baseline"]}
    for name, spec in runs.items():
        assert cli.main(["export", "--model", str(bpe_model_dir), *spec, "--out", str(tmp_path / f"{name}.gguf")]) == 0
    assert "6 -> 4 layers (gguf, f32); wide layers (1, 2)->8h/256, (3, 4)->8h/256" in capsys.readouterr().out
    fields = {name: read(tmp_path / f"{name}.gguf")[0] for name in runs}
    assert fields["range"]["deci.attention.head_count"] == [4, 8, 8, 4]
    assert fields["plan"]["deci.attention.head_count"] == [4, 8, 4, 4]
    assert fields["baseline"]["general.architecture"] == "llama" and fields["baseline"]["llama.block_count"] == LAYERS


def test_cli_writes_a_hugging_face_folder_for_merge(tmp_path, bpe_model_dir):
    from transformers import AutoModelForCausalLM

    from lp_fx.tools import cli

    out = tmp_path / "merged"
    args = ["export", "--model", str(bpe_model_dir), "--pairs", "1-2", "--mode", "merge", "--format", "hf",
            "--dtype", "f16", "--out", str(out)]
    assert cli.main(args) == 0
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.num_hidden_layers == LAYERS - 1 and loaded.dtype == torch.float16


@pytest.mark.parametrize(("extra", "message"), [
    (["--pairs", "1-2", "--mode", "block"], "pair (1, 2) has mode 'block', which is not one layer"),
    (["--pairs", "1:5", "--format", "hf"], "an lp pairing has layers of two widths"),
    ([], "give --pairs, --plan or --checkpoint"),
    (["--pairs", "1-2", "--checkpoint", "nowhere"], "checkpoint directory nowhere does not exist"),
])
def test_cli_refusals_are_one_line_and_write_nothing(tmp_path, bpe_model_dir, capsys, extra, message):
    from lp_fx.tools import cli

    out = tmp_path / "out" / "m.gguf"
    assert cli.main(["export", "--model", str(bpe_model_dir), *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err  # (above it, transformers' progress bar while the model loads)
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("lp-fx export: error: ") and message in last, err
    assert not out.exists() and (not out.parent.exists() or not list(out.parent.iterdir()))


def test_cli_takes_the_pairing_of_a_checkpoint_and_refuses_another(tmp_path, bpe_model_dir, capsys):
    from lp_fx.tools import cli
    from lp_fx.checkpoint import layer_parameter_names, pairing_record, save_checkpoint, unique_tensors

    model = bpe_model()
    trained = unique_tensors(model, layer_parameter_names(model, "model.layers", [3, 4]))
    save_checkpoint(tmp_path / "ckpt", trained, pairing_record(model, [(3, 4)], ["lp"]), {"step": 1})
    common = ["export", "--model", str(bpe_model_dir), "--checkpoint", str(tmp_path / "ckpt")]
    assert cli.main([*common, "--out", str(tmp_path / "a.gguf")]) == 0
    assert read(tmp_path / "a.gguf")[0]["deci.attention.head_count"] == [4, 4, 4, 8, 4]
    assert cli.main([*common, "--pairs", "1-2", "--out", str(tmp_path / "b.gguf")]) == 2
    assert "was trained for pairs [(3, 4)] modes ['lp'], not 1-2 [(1, 2)]" in capsys.readouterr().err
    assert not (tmp_path / "b.gguf").exists()


def folder_contents(folder: Path) -> dict[str, bytes | str]:
    """Every file's bytes and every link's target under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): os.readlink(p) if p.is_symlink() else p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_symlink() or p.is_file()}


@pytest.fixture
def sources(tmp_path) -> dict[str, str]:
    """An lp and a block checkpoint (fine-tuning's modes) for pair (3, 4), and plans with and without modes."""
    from lp_fx.checkpoint import layer_parameter_names, pairing_record, save_checkpoint, unique_tensors

    model = bpe_model()
    trained = unique_tensors(model, layer_parameter_names(model, "model.layers", [3, 4]))
    for mode in ("lp", "block"):
        save_checkpoint(tmp_path / f"ckpt_{mode}", trained, pairing_record(model, [(3, 4)], [mode]), {"step": 1})
    (tmp_path / "plan_modes.json").write_text(json.dumps({"num_layers": LAYERS, "pairs": [[3, 4]], "modes": ["prune"]}))
    (tmp_path / "plan_plain.json").write_text(json.dumps({"num_layers": LAYERS, "pairs": [[3, 4]]}))
    return {name: str(tmp_path / name) for name in ("ckpt_lp", "ckpt_block", "plan_modes.json", "plan_plain.json")}


FIXES_MODES = "a checkpoint's pairing fixes its modes (lp); drop --mode"


@pytest.mark.parametrize(("extra", "message"), [
    (["--checkpoint", "ckpt_lp", "--mode", "prune"], FIXES_MODES),
    (["--checkpoint", "ckpt_lp", "--mode", "lp"], FIXES_MODES),
    (["--checkpoint", "ckpt_lp", "--pairs", "3-4", "--mode", "prune"], FIXES_MODES),
    (["--checkpoint", "ckpt_lp", "--plan", "plan_plain.json", "--mode", "prune"], FIXES_MODES),
    (["--plan", "plan_modes.json", "--mode", "lp"], "the plan gives each pair its mode (prune); drop --mode"),
    (["--checkpoint", "ckpt_lp", "--plan", "plan_modes.json"], "was trained for pairs [(3, 4)] modes ['lp'], not plan_modes"),
    (["--checkpoint", "ckpt_block", "--pairs", "3-4"], "pair (3, 4) has mode 'block', which is not one layer"),
])
def test_cli_refuses_a_mode_or_pairing_other_than_the_checkpoint_or_plan_fixes(tmp_path, bpe_model_dir, sources, capsys,
                                                                               extra, message):
    from lp_fx.tools import cli

    extra = [sources.get(arg, arg) for arg in extra]
    before = folder_contents(tmp_path)
    out = tmp_path / "out" / "m.gguf"
    assert cli.main(["export", "--model", str(bpe_model_dir), *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("lp-fx export: error: ") and message in last, err
    assert folder_contents(tmp_path) == before  # nothing written, checkpoints and plans as they were


@pytest.mark.parametrize(("extra", "modes"), [
    (["--checkpoint", "ckpt_lp"], ["lp"]),
    (["--checkpoint", "ckpt_lp", "--pairs", "3-4"], ["lp"]),
    (["--checkpoint", "ckpt_lp", "--plan", "plan_plain.json"], ["lp"]),
    (["--plan", "plan_modes.json"], ["prune"]),
    (["--plan", "plan_plain.json", "--mode", "merge"], ["merge"]),
    (["--plan", "plan_plain.json"], ["lp"]),
    (["--pairs", "3-4", "--mode", "merge"], ["merge"]),
    (["--pairs", "3-4"], ["lp"]),
])
def test_cli_exports_each_pair_in_the_mode_its_source_gives(tmp_path, bpe_model_dir, sources, extra, modes):
    from lp_fx.tools import cli

    out = tmp_path / "m.gguf"
    assert cli.main(["export", "--model", str(bpe_model_dir), *[sources.get(a, a) for a in extra], "--out", str(out)]) == 0
    fields = read(out)[0]
    assert json.loads(fields["lp_fx.pairing"]) == {"pairs": [[3, 4]], "modes": modes}
    assert fields["general.architecture"] == ("deci" if modes == ["lp"] else "llama")


def test_cli_hf_export_is_a_model_that_lp_fx_eval_runs(tmp_path, model_dir, data_dir, capsys):
    from transformers import AutoTokenizer

    from lp_fx.tools import cli

    out = tmp_path / "pruned"
    assert cli.main(["export", "--model", str(model_dir), "--pairs", "1-2", "--mode", "prune", "--format", "hf",
                     "--out", str(out)]) == 0
    source, exported = (AutoTokenizer.from_pretrained(path) for path in (model_dir, out))
    assert exported("the cat sat .").input_ids == source("the cat sat .").input_ids
    assert (exported.eos_token, exported.unk_token) == (source.eos_token, source.unk_token)
    results = tmp_path / "eval.json"
    assert cli.main(["eval", "--model", str(out), "--data-dir", str(data_dir), "--tasks", "wikitext", "--window", "16",
                     "--no-progress", "--out", str(results)]) == 0, capsys.readouterr().err
    assert json.loads(results.read_text())["num_layers"] == 3


def test_cli_eval_of_a_deci_export_says_it_runs_in_llama_cpp(tmp_path, bpe_dir, data_dir, capsys, monkeypatch):
    from lp_fx.tools import cli

    monkeypatch.setenv("LP_FX_CACHE", str(tmp_path / "cache"))
    wide = tmp_path / "wide.gguf"
    ex.export(bpe_model(), PAIRS, ["lp", "lp"], wide, Source("tiny", bpe_dir))
    results = tmp_path / "eval.json"
    assert cli.main(["eval", "--model", str(wide), "--data-dir", str(data_dir), "--tasks", "wikitext",
                     "--out", str(results)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lp-fx eval: error: "), err
    assert "runs in llama.cpp (`lp-fx bench --llamacpp`), not in transformers" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide.gguf"]  # no results, no converted copy


def test_bench_llamacpp_refuses_a_dtype_without_its_unpaired_export(tmp_path, bpe_dir, capsys):
    from lp_fx.tools import cli

    paths = {}
    for name, pairs, modes, dtype in (("base", [], [], "f32"), ("lp", PAIRS, ["lp", "lp"], "f32"), ("lp8", PAIRS, ["lp", "lp"], "q8_0")):
        paths[name] = tmp_path / f"{name}.gguf"
        ex.export(bpe_model(), pairs, modes, paths[name], Source("tiny", bpe_dir), dtype=dtype)
    args = ["bench", "--llamacpp", *map(str, paths.values()), "--json", str(tmp_path / "b.json")]
    assert cli.main(args) == 2
    assert "no unpaired export (`lp-fx export --pairs baseline`) among the GGUFs for dtype(s) q8_0" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_divergence_margin_is_the_pass_logit_gap_where_two_greedy_runs_first_differ():
    from lp_fx.tools.export.llamacpp_check import divergence_margin

    def logits_fn(ids):  # the next token's logits depend on the sequence length only
        out = torch.zeros(1, ids.shape[1], 8)
        out[0, -1, ids.shape[1] % 8] = 2.0
        out[0, -1, (ids.shape[1] + 1) % 8] = 1.5
        return out

    assert divergence_margin(logits_fn, [1, 2], [2, 3, 4], [2, 3, 4]) is None
    assert divergence_margin(logits_fn, [1, 2], [2, 3, 4], [2, 4, 4]) == pytest.approx(0.5)  # prompt + 1 token: 3 vs 4


def test_pass_greedy_takes_the_argmax_even_when_it_is_the_end_of_sequence_token():
    from lp_fx.pairing import BASELINE
    from lp_fx.tools.export.llamacpp_check import pass_greedy

    model = bpe_model()
    tokens = ids(seed=2, batch=1, length=5)
    expected = []
    for _ in range(6):  # argmax of a full forward at every step, as llama.cpp's greedy() takes it
        expected.append(int(logits(model, torch.cat([tokens, torch.tensor([expected], dtype=torch.long)], 1))[0, -1].argmax()))
    model.generation_config.eos_token_id = expected[1]
    assert pass_greedy(model, BASELINE, tokens, 6) == expected


def test_gemma3_without_a_rope_base_for_its_sliding_layers_is_refused(tmp_path, bpe_dir):
    model = bpe_model("gemma3")
    model.config.rope_parameters = {"full_attention": {"rope_type": "default", "rope_theta": 1e6}}
    refused(tmp_path, model, [(1, 2)], ["prune"], r"gives its sliding layers no RoPE base", tokenizer=bpe_dir)
