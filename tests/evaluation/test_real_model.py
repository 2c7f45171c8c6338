"""Real-model checks on the bundled SmolLM2-135M-Instruct (slow: run with -m slow)."""

from __future__ import annotations

import pytest

from lp_fx.tools import data, models
from lp_fx.pairing import BASELINE, Pairing
from lp_fx.tools.evaluation import scoring as evaluate
from lp_fx.tools.evaluation.compiled import compile_pairing, eager_logits

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2() -> models.LoadedModel:
    return models.load_model("smollm2")


def test_baseline_perplexity_is_plausible_and_reproducible(smollm2: models.LoadedModel) -> None:
    data_dir = data.resolve_data_dir(None)
    windows = evaluate.wikitext_windows(smollm2.tokenizer, data_dir, 512, "heldout", 2)
    logits_fn = compile_pairing(smollm2.model, BASELINE)
    first = evaluate.perplexity(logits_fn, windows, progress=False)
    second = evaluate.perplexity(logits_fn, windows, progress=False)
    assert first == second
    assert 10 < first.ppl < 60  # a 135M model on WikiText-2, dequantized Q4_1


def test_contiguous_pairing_costs_perplexity(smollm2: models.LoadedModel) -> None:
    data_dir = data.resolve_data_dir(None)
    windows = evaluate.wikitext_windows(smollm2.tokenizer, data_dir, 512, "heldout", 1)
    base = evaluate.perplexity(eager_logits(smollm2.model), windows, progress=False)
    paired = evaluate.perplexity(
        compile_pairing(smollm2.model, Pairing("14:28", ((14, 15), (16, 17)))),
        windows,
        progress=False,
    )
    assert base.ppl < paired.ppl < 3 * base.ppl


def test_the_converted_smollm2_folder_holds_the_ggufs_model(smollm2: models.LoadedModel) -> None:
    """What every load reads (the converted folder) against transformers reading the GGUF itself."""
    from tests.helpers.model_files import assert_same_model, direct

    reference = direct(models.smollm2_gguf())
    assert_same_model(smollm2, reference)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    tokenizer = reference[0]
    assert (smollm2.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            == tokenizer.apply_chat_template(messages, add_generation_prompt=True))
