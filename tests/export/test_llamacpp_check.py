"""Exports run in llama.cpp itself (llama-cpp-python, the optional ``llamacpp`` extra; skipped
without it): logits and greedy tokens equal the ``layer_parallel`` pass on tiny models, and on
SmolLM2 (``-m slow``) perplexity within 0.5 % (f32) / 1 % (q8_0) of the pass's."""

from __future__ import annotations

import json

import pytest
import torch

from lp_fx.tools.speed import llamacpp
from lp_fx.pairing import Pairing
from lp_fx.tools.evaluation.compiled import make_backend
from lp_fx.tools.export import llamacpp_check
from lp_fx.tools.export.fold import Source
from lp_fx.tools.export.write import export

from tests.helpers.bpe import BPE_VOCAB, PAIRS, bpe_model

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llamacpp

NEW_TOKENS = 16


CASES = [(arch, modes) for arch in ("llama", "qwen2") for modes in (["lp", "lp"], ["prune", "merge"], [])]
# Gemma 3 (tied head, sliding layers of window 4 among global ones; its lp pairs do not fold: post-norm)
CASES += [("gemma3", ["prune", "merge"]), ("gemma3", [])]


class GgmlGelu(torch.nn.Module):
    """GELU (tanh) as ggml computes it on CPU: looked up in a table of fp16 inputs and outputs.
    Without it Gemma's FFN alone puts the tiny model's logits ~1e-3 from llama.cpp's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()


def as_ggml_computes(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        if getattr(getattr(module, "config", None), "hidden_activation", None) == "gelu_pytorch_tanh":
            module.act_fn = GgmlGelu()
    return model


@pytest.mark.parametrize(("arch", "modes"), CASES)
def test_llamacpp_computes_what_the_pass_computes(tmp_path, bpe_dir, arch, modes):  # noqa: F811
    model = as_ggml_computes(bpe_model(arch, tied=arch == "gemma3"))
    pairing = Pairing("tiny", tuple(PAIRS[: len(modes)]), tuple(modes))
    out = tmp_path / "m.gguf"
    export(model, pairing.pairs, modes, out, Source("tiny", bpe_dir))
    llm = llamacpp.open_gguf(out, threads=2, n_ctx=64, f32_cache=True)
    tokens = torch.randint(1, BPE_VOCAB, (12,), generator=torch.Generator().manual_seed(5))
    paired = torch.compile(model, backend=make_backend(pairing, "lp", "eager"))
    with torch.no_grad():
        expected = paired(tokens[None], use_cache=False).logits[0]
    got = torch.from_numpy(llamacpp.logits(llm, tokens.tolist()))
    # Gemma 3: 1e-6 of the largest logit over the first 4 tokens (its window), ~1.1e-4 past it
    # (a window one token off moves them by ~1)
    assert (got - expected).abs().max() <= (2e-4 if arch == "gemma3" else 1e-4) * expected.abs().max()
    torch._dynamo.reset()
    assert llamacpp.greedy(llm, tokens[:6].tolist(), NEW_TOKENS) == llamacpp_check.pass_greedy(model, pairing, tokens[None, :6], NEW_TOKENS)


def test_check_measures_the_pass_and_llamacpp_on_the_same_windows(tmp_path, bpe_model_dir):  # noqa: F811
    """``python -m lp_fx.tools.speed.llamacpp``'s check, end to end on the tiny model: the unpaired model
    and a pairing, exported in f32, give llama.cpp the pass's perplexity and greedy tokens."""
    text = tmp_path / "data" / "wikitext-2-raw" / "wiki.test.raw"
    text.parent.mkdir(parents=True)
    text.write_text("the cat sat on the mat and the dog ran far away\n" * 40)
    result = llamacpp_check.check(str(bpe_model_dir), ["1:3"], ["f32"], windows=2, tokens=6, threads=2,
                            data_dir=str(tmp_path / "data"), window=32)
    assert [row["pairing"] for row in result["pairings"]] == ["baseline", "1:3"] and result["window"] == 32
    for row in result["pairings"]:
        f32 = row["llamacpp"]["f32"]
        assert abs(f32["rel_diff"]) <= 1e-4 and f32["greedy_matched"] == 6, row
    assert result["pairings"][0]["pass_ppl"] != result["pairings"][1]["pass_ppl"]  # the pairing did something


@pytest.mark.slow
def test_smollm2_in_llamacpp_equals_the_pass(capsys):
    result = llamacpp_check.check("smollm2", ["14:28", "docs/results/plan_smollm2_7pairs_v1.json"], ["f32", "q8_0"],
                            windows=8, tokens=32, threads=2, data_dir=None)
    for row in result["pairings"]:
        f32, q8 = row["llamacpp"]["f32"], row["llamacpp"]["q8_0"]
        assert abs(f32["rel_diff"]) <= 0.005 and abs(q8["rel_diff"]) <= 0.01, row
        # f32: the same 32 tokens, or a first difference where the pass itself has a near tie
        assert f32["greedy_matched"] == 32 or abs(f32["pass_margin_at_divergence"]) <= 1e-2, row


def test_bench_gives_each_export_a_ratio_to_the_unpaired_one_of_its_dtype(tmp_path, bpe_dir):  # noqa: F811
    from lp_fx.tools import cli

    paths = []
    for dtype in ("f32", "q8_0"):
        for pairs, modes in (([], []), (PAIRS, ["lp", "lp"])):
            paths.append(tmp_path / f"{dtype}_{len(pairs)}.gguf")
            export(bpe_model(), pairs, modes, paths[-1], Source("tiny", bpe_dir), dtype=dtype)
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--llamacpp", *map(str, paths), "--tokens", "4", "--rounds", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(m["dtype"], m["layers"], len(m["tokens_per_s"])) for m in result["models"]] == [
        ("f32", 6, 2), ("f32", 4, 2), ("q8_0", 6, 2), ("q8_0", 4, 2)
    ]
    ratios = result["ratio_to_unpaired"]
    assert ratios[str(paths[0])] == 1.0 and ratios[str(paths[2])] == 1.0 and ratios[str(paths[1])] > 0
