"""Metric code on tiny random models: perplexity, retention, data errors (tasks: tests/evaluation/test_lm_eval_model.py)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
import torch

from lp_fx.tools import data
from lp_fx.tools.evaluation import compiled as serving
from lp_fx.tools.evaluation import retention
from lp_fx.tools.evaluation import scoring as evaluate
from lp_fx.report import GraphReport
from lp_fx.pairing import BASELINE, Pairing, Shuffle

from tests.helpers.models import VOCAB, hf_model
from tests.helpers.reference import eager_order, eager_pairing

SHARED_DATA = data.default_data_dir()


class CharTokenizer:
    """One token per character: enough for perplexity windows."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [1 + ord(char) % (VOCAB - 1) for char in text]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return hf_model("llama", layers=6)


def _reference_perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """An independent plain-PyTorch loop: log-softmax, gather, mean, exp."""
    nlls = []
    with torch.no_grad():
        for window in windows:
            logits = model(window[None]).logits[0]
            logprobs = torch.log_softmax(logits.double(), dim=-1)[:-1]
            nlls.append(-logprobs.gather(1, window[1:, None]).squeeze(1))
    return math.exp(torch.cat(nlls).mean().item())


def test_perplexity_matches_plain_loop(model: torch.nn.Module) -> None:
    torch.manual_seed(1)
    windows = evaluate.make_windows(torch.randint(0, VOCAB, (5 * 64 + 17,)), 64)
    assert windows.shape == (5, 64)
    result = evaluate.perplexity(serving.eager_logits(model), windows, progress=False)
    assert result.tokens == 5 * 63 and result.windows == 5
    assert result.ppl == pytest.approx(_reference_perplexity(model, windows), rel=1e-5)


def test_split_windows_halves_and_even_spacing() -> None:
    windows = torch.arange(10 * 4).view(10, 4)
    calib = evaluate.split_windows(windows, "calib")
    heldout = evaluate.split_windows(windows, "heldout")
    assert torch.equal(torch.cat([calib, heldout]), windows)
    picked = evaluate.split_windows(windows, "heldout", 3)
    assert picked[:, 0].tolist() == [20, 28, 36]
    with pytest.raises(ValueError, match="calib"):
        evaluate.split_windows(windows, "train")


def test_retention_ratios_and_means() -> None:
    base = {"wikitext": {"ppl": 10.0}, "piqa": {"acc": 0.5, "acc_norm": 0.6, "n": 9}}
    ours = {"wikitext": {"ppl": 12.0}, "piqa": {"acc": 0.4, "acc_norm": 0.6, "n": 9}}
    summary = retention.retention(ours, base)
    assert summary["per_metric"] == pytest.approx(
        {"wikitext/ppl": 1.2, "piqa/acc": 0.8, "piqa/acc_norm": 1.0}
    )
    assert summary["mean_acc"] == pytest.approx(0.8)


def _task(items: list[int], stderr: float | None, first_doc: int = 0) -> dict:
    return {"acc": sum(items) / len(items), "acc_stderr": stderr, "n": len(items),
            "items": {"doc_id": list(range(first_doc, first_doc + len(items))), "acc": [float(i) for i in items]}}


def test_acc_retention_error_is_paired_over_shared_items_else_propagated_as_independent() -> None:
    base_items, ours_items = [1, 1, 0, 1, 0, 1, 0, 0], [1, 1, 0, 0, 0, 1, 0, 0]  # one item lost: 0.5 -> 0.375
    same = [1, 0, 1, 0]
    base = {"piqa": _task(base_items, 0.19), "arc_easy": _task(same, 0.29), "wikitext": {"ppl": 10.0}}
    ours = {"piqa": _task(ours_items, 0.18), "arc_easy": _task(same, 0.29), "wikitext": {"ppl": 12.0}}
    summary = retention.retention(ours, base)
    assert summary["mean_acc"] == pytest.approx((0.75 + 1) / 2)
    # per task, the error of (ours - ratio * base) per item over the baseline's accuracy; averaged over 2 tasks
    differences = [p - 0.75 * b for p, b in zip(ours_items, base_items)]
    piqa = statistics.stdev(differences) / math.sqrt(8) / 0.5
    assert summary["mean_acc_stderr"] == pytest.approx(piqa / 2) and summary["mean_acc_stderr_paired"] is True
    ours["piqa"]["items"]["acc"].pop()  # a score missing: never a pairing of the first 7 items
    assert retention.retention(ours, base)["mean_acc_stderr_paired"] is False
    ours["piqa"]["items"]["doc_id"] = list(range(1, 9))  # other items: the errors as if independent
    independent = retention.retention(ours, base)
    piqa = math.sqrt(0.18**2 + (0.75 * 0.19) ** 2) / 0.5
    arc = math.sqrt(0.29**2 + 0.29**2) / 0.5
    assert independent["mean_acc_stderr"] == pytest.approx(math.hypot(piqa, arc) / 2)
    assert independent["mean_acc_stderr_paired"] is False and summary["mean_acc_stderr"] < independent["mean_acc_stderr"]
    del ours["piqa"]["items"]
    ours["piqa"]["acc_stderr"] = None
    assert "mean_acc_stderr" not in retention.retention(ours, base) and "mean_acc" in retention.retention(ours, base)


def test_subset_is_fixed_by_seed() -> None:
    items = list(range(100))
    assert data.subset(items, 10, seed=3) == data.subset(items, 10, seed=3)
    assert data.subset(items, 10, seed=3) != data.subset(items, 10, seed=4)
    assert data.subset(items, None, seed=3) is items


def test_missing_data_dir_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(data.DataError, match=str(missing)) as info:
        data.resolve_data_dir(missing)
    assert "wiki.test.raw" in str(info.value)


def test_missing_data_file_names_path_and_format(tmp_path: Path) -> None:
    with pytest.raises(data.DataError) as info:
        data.load_piqa(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "piqa" / "valid.jsonl") in message and "PIQA" in message


def test_prepare_and_run_eval_end_to_end(tmp_path: Path, model: torch.nn.Module) -> None:
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_text("hello world. " * 60)
    (tmp_path / "winogrande").mkdir()
    (tmp_path / "winogrande" / "winogrande.jsonl").write_text(
        '{"context_options": ["A so A", "A so B"], "continuation": "won.", "gold": 1}\n' * 3
    )
    spec = evaluate.EvalSpec(tmp_path, tasks=("wikitext", "winogrande"), window=64)
    prepared = evaluate.prepare(CharTokenizer(), spec)
    assert prepared.sizes() == {"winogrande": 3, "wikitext": 12}
    assert list(prepared.tasks.tasks) == ["winogrande"]  # scored by lm-eval (tests/evaluation/test_lm_eval_model.py)
    results = evaluate.run_eval(serving.eager_logits(model), prepared, progress=False)
    again = evaluate.run_eval(serving.eager_logits(model), prepared, progress=False)
    assert results == again
    assert list(results) == ["wikitext"] and results["wikitext"]["ppl"] > 1


def test_unknown_tasks_are_refused_naming_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tasks \\['mmlu'\\]; expected some of wikitext, lambada_text, arc_easy"):
        evaluate.prepare(CharTokenizer(), evaluate.EvalSpec(tmp_path, tasks=("wikitext", "mmlu")))


@pytest.mark.skipif(SHARED_DATA is None, reason="no ../shared/data")
@pytest.mark.parametrize("task", data.MC_TASKS)
def test_shared_data_readers(task: str) -> None:
    items = data.MC_TASKS[task](SHARED_DATA)
    assert len(items) > 1000
    assert all(0 <= item.gold < len(item.requests) for item in items)


@pytest.mark.parametrize(
    ("mode", "pairs"),
    [
        ("lp", ((1, 2), (3, 4))),
        ("block", ((1, 2), (4, 5))),
        ("block", ((1, 2), (3, 4))),
    ],
)
def test_perplexity_through_backend_matches_eager_reference(
    model: torch.nn.Module, mode: str, pairs: tuple
) -> None:
    """What the evaluator measures is the compiled, paired model, and it is the paired model."""
    torch.manual_seed(2)
    windows = evaluate.make_windows(torch.randint(0, VOCAB, (3 * 32,)), 32)
    pairing = Pairing("p", pairs)
    compiled = evaluate.perplexity(
        serving.compile_pairing(model, pairing, mode=mode), windows, progress=False
    )
    with eager_pairing(model, pairing.pairs, mode):
        expected = _reference_perplexity(model, windows)
    plain = _reference_perplexity(model, windows)
    assert compiled.ppl == pytest.approx(expected, rel=1e-4)
    assert abs(compiled.ppl - plain) > 1e-3 * plain


def test_a_pairing_switch_traces_once_and_each_pairing_matches_its_eager_reference(
    model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(5)
    windows = evaluate.make_windows(torch.randint(0, VOCAB, (2 * 32,)), 32)
    captured = []
    capture = serving.PairingSwitch._capture
    monkeypatch.setattr(serving.PairingSwitch, "_capture", lambda self, gm, ex: captured.append(gm) or capture(self, gm, ex))
    torch._dynamo.reset()
    switch = serving.PairingSwitch(model)
    with pytest.raises(ValueError, match="call set_pairing before scoring"):
        switch.logits(windows[:1])
    for pairs in [((1, 2), (3, 4)), (), ((2, 3),), ((1, 2), (3, 4))]:
        switch.set_pairing(Pairing("p", pairs))
        with eager_pairing(model, pairs, "lp"):
            expected = _reference_perplexity(model, windows)
        assert evaluate.perplexity(switch.logits, windows, progress=False).ppl == pytest.approx(expected, rel=1e-4), pairs
    assert len(captured) == 1  # one Dynamo trace served every pairing


def test_a_pairing_switch_refuses_a_pairing_the_backend_did_not_apply(
    model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch._dynamo.reset()
    switch = serving.PairingSwitch(model)
    switch.set_pairing(Pairing("p", ((1, 2),)))
    switch.logits(torch.zeros(1, 32, dtype=torch.long))
    make_backend = serving.make_backend

    class Forgetful:  # a backend that leaves the pairs out of its graphs and says so in its reports
        def __init__(self, *args, **kwargs) -> None:
            self.backend = make_backend(*args, **kwargs)
            self.reports = self.backend.reports

        def __call__(self, gm, example_inputs):
            compiled = self.backend(gm, example_inputs)
            self.reports[-1].pairs_rewritten.clear()
            return compiled

    monkeypatch.setattr(serving, "make_backend", Forgetful)
    with pytest.raises(RuntimeError, match=r"pairing 'q': not rewritten as asked: \[\(\(3, 4\), 'lp'\)\]"):
        switch.set_pairing(Pairing("q", ((3, 4),)))


def test_baseline_through_backend_matches_plain(model: torch.nn.Module) -> None:
    torch.manual_seed(3)
    windows = evaluate.make_windows(torch.randint(0, VOCAB, (2 * 32,)), 32)
    compiled = evaluate.perplexity(
        serving.compile_pairing(model, BASELINE), windows, progress=False
    )
    assert compiled.ppl == pytest.approx(_reference_perplexity(model, windows), rel=1e-5)


def test_perplexity_of_a_shuffle_is_that_of_the_reordered_model(model: torch.nn.Module) -> None:
    torch.manual_seed(4)
    windows = evaluate.make_windows(torch.randint(0, VOCAB, (2 * 32,)), 32)
    shuffle = Shuffle(1, 5, seed=1)
    compiled = evaluate.perplexity(
        serving.compile_pairing(model, Pairing("s", shuffle=shuffle)), windows, progress=False
    )
    with eager_order(model, [0, *shuffle.order, 5]):
        expected = _reference_perplexity(model, windows)
    assert shuffle.order != (1, 2, 3, 4)
    assert compiled.ppl == pytest.approx(expected, rel=1e-4)
    assert abs(compiled.ppl - _reference_perplexity(model, windows)) > 1e-3 * compiled.ppl


def test_a_shuffle_the_graph_did_not_apply_is_refused() -> None:
    pairing = Pairing("s", shuffle=Shuffle(0, 4, 1))
    with pytest.raises(RuntimeError, match=r"not rewritten as asked: \[\('shuffle'"):
        serving.check_rewritten([GraphReport(index=0)], pairing, "lp")
    serving.check_rewritten([GraphReport(index=0, shuffled=Shuffle(0, 4, 1).order)], pairing, "lp")


class _BosTokenizer:
    """Words to ids; like Gemma's tokenizer, it starts a text with a <bos> (id 1) unless told not to."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [1] * add_special_tokens + [len(word) + 1 for word in text.split()]


def test_windows_start_as_the_tokenizer_starts_a_text(tmp_path: Path) -> None:
    """Gemma 3 scores several times worse without the <bos> it always saw first; SmolLM2's tokenizer adds none."""
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_text("a bb ccc dddd " * 6)
    assert evaluate.text_prefix(_BosTokenizer()) == [1]
    windows = evaluate.wikitext_windows(_BosTokenizer(), tmp_path, window=5)
    assert windows.tolist() == [[1, 2, 3, 4, 5]] * 6
    assert evaluate.make_windows([2, 3, 4, 5, 6], 3).tolist() == [[2, 3, 4]]  # no prefix: as before
    with pytest.raises(ValueError, match="at most 2 tokens"):
        evaluate.make_windows([7], 3, prefix=[1])
