"""lm-evaluation-harness as the task scorer: the local tasks, the ``lp_fx`` model class, the commands.

A tiny local task set (a few items of each format, generated here) and the tiny model of
conftest; nothing is downloaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lp_fx.tools import cli, data
from lp_fx.tools.evaluation import lm_eval_tasks
from lp_fx.pairing import Pairing
from lp_fx.tools.evaluation.lm_eval_tasks import LOCAL_TASKS, TASKS_DIR, harness_name

from tests.helpers.models import VOCAB, hf_model
from tests.helpers.reference import eager_pairing

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = data.default_data_dir()
PAIRING = Pairing("1:3", ((1, 2),))


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def task_dir(data_dir: Path) -> Path:
    """conftest's data directory plus a few items of every local task format (its words)."""
    _jsonl(data_dir / "arc_easy" / "test.jsonl", [
        {"id": f"e{i}", "question": {"stem": f"the cat sat on {word}", "choices": [
            {"text": "the mat", "label": "A", "para": "ignored"}, {"text": f"a {word}", "label": "B", "para": ""},
            {"text": "so far", "label": "C", "para": ""}]}, "answerKey": "AB"[i % 2]}
        for i, word in enumerate(["a dog", "it", "the mat"])
    ])
    _jsonl(data_dir / "arc_challenge" / "arc_challenge_test.jsonl", [
        {"index": i, "id": f"c{i}", "question": f"the dog ran {word}",
         "options": [{"label": "A", "text": "far away"}, {"label": "B", "text": word}], "answer": "B"}
        for i, word in enumerate(["so", "on a mat"])
    ])
    _jsonl(data_dir / "piqa" / "valid.jsonl", [{"goal": "the cat", "sol1": "sat on a mat", "sol2": "ran far away"}] * 3)
    (data_dir / "piqa" / "valid-labels.lst").write_text("0\n1\n0\n")
    (data_dir / "hellaswag").mkdir(exist_ok=True)
    item = ["Cats: the cat sat on a mat. it", "2", "was good.", "ran.", "sat so far.", "and the dog."]
    (data_dir / "hellaswag" / "hellaswag_val_full.txt").write_text("\n".join(item * 2) + "\n")
    _jsonl(data_dir / "boolq" / "boolq.jsonl", [
        {"query": "Passage: the cat sat on a mat\nQuestion: the cat sat?", "choices": ["no", "yes"], "gold": 1},
        {"query": "Passage: the dog ran far\nQuestion: the dog sat?", "choices": ["no", "yes"], "gold": 0},
    ])
    _jsonl(data_dir / "lambada" / "lambada_openai.jsonl", [
        {"context": "the cat sat on a", "continuation": "mat"}, {"context": "the dog ran far", "continuation": "away"},
    ])
    return data_dir


@pytest.fixture(scope="module")
def tiny(model_dir: Path):
    from lp_fx.tools.models import load_model

    return load_model(str(model_dir), progress=False)


# ------------------------------------------------------------------------------------- layout


def test_importing_lp_fx_and_the_cli_does_not_load_lm_eval() -> None:
    code = "import sys, lp_fx, lp_fx.tools.cli\nprint(sorted(m for m in sys.modules if m.split('.')[0] == 'lm_eval'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_a_yaml_for_every_local_task_and_the_package_ships_them() -> None:
    assert sorted(path.stem for path in TASKS_DIR.glob("*.yaml")) == sorted(map(harness_name, LOCAL_TASKS))
    assert '"lm_tasks/*.yaml"' in (REPO / "pyproject.toml").read_text()


# Fields that decide what is scored and how; the dataset fields are ours by design.
DEFINITION = ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice")
# lm-eval's own task, and the fields of ours that differ from it on purpose (see the YAML comments).
LM_EVAL_TASKS = {
    "arc_easy": ("arc/arc_easy.yaml", ()),
    "arc_challenge": ("arc/arc_easy.yaml", ()),  # lm-eval's arc_challenge includes arc_easy
    "piqa": ("piqa/piqa.yaml", ()),
    "hellaswag": ("hellaswag/hellaswag.yaml", ()),
    "boolq": ("super_glue/boolq/default.yaml", ()),
    "lambada": ("lambada/lambada_openai.yaml", ()),
    "winogrande": ("winogrande/default.yaml", ("doc_to_text", "doc_to_target", "doc_to_choice")),
}


@pytest.mark.parametrize("task", LOCAL_TASKS)
def test_prompts_and_metrics_are_lm_evals_own(task: str) -> None:
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    theirs_path, differ = LM_EVAL_TASKS[task]
    theirs = load_yaml(Path(lm_eval.__file__).parent / "tasks" / theirs_path, resolve_func=False)
    ours = load_yaml(TASKS_DIR / f"{harness_name(task)}.yaml", resolve_func=False)
    for key in DEFINITION:
        if key not in differ:
            assert ours.get(key) == theirs.get(key), key
    assert [m["metric"] for m in ours["metric_list"]] == [m["metric"] for m in theirs["metric_list"]]


# ------------------------------------------------------------------------------------ local tasks


def _requests(task: object, count: int | None = None) -> list[tuple[str, str]]:
    """The ``(context, continuation)`` pairs lm-eval scores for the task's first ``count`` documents."""
    pairs = []
    for doc in list(task.eval_docs)[:count]:
        instances = task.construct_requests(doc, task.fewshot_context(doc, 0))
        pairs += [instance.args for instance in (instances if isinstance(instances, list) else [instances])]
    return pairs


def test_the_local_formats_become_lm_evals_requests(task_dir: Path) -> None:
    suite = lm_eval_tasks.load_suite(LOCAL_TASKS, task_dir)
    assert suite.sizes == {"arc_easy": 3, "arc_challenge": 2, "piqa": 3, "hellaswag": 2, "winogrande": 5, "boolq": 2,
                           "lambada": 2}
    requests = {name: _requests(task, 1) for name, task in suite.tasks.items()}
    assert requests["arc_easy"] == [("Question: the cat sat on a dog\nAnswer:", f" {text}")
                                    for text in ("the mat", "a a dog", "so far")]
    assert requests["arc_challenge"][1] == ("Question: the dog ran so\nAnswer:", " so")
    assert requests["piqa"] == [("Question: the cat\nAnswer:", " sat on a mat"), ("Question: the cat\nAnswer:", " ran far away")]
    assert requests["hellaswag"][0] == ("Cats: the cat sat on a mat. it", " was good.")
    assert requests["winogrande"] == [("the cat sat so the cat", " ran far."), ("the cat sat so the dog", " ran far.")]
    assert requests["boolq"] == [("the cat sat on a mat\nQuestion: the cat sat?\nAnswer:", f" {a}") for a in ("no", "yes")]
    assert requests["lambada"] == [("the cat sat on a", " mat")]
    golds = {name: task.doc_to_target(task.eval_docs[0]) for name, task in suite.tasks.items() if name != "lambada"}
    assert golds == {"arc_easy": 0, "arc_challenge": 1, "piqa": 0, "hellaswag": 2, "winogrande": "ran far.", "boolq": 1}


def test_limit_picks_the_seeded_subset_of_the_earlier_scorer(task_dir: Path) -> None:
    suite = lm_eval_tasks.load_suite(["winogrande"], task_dir, limit=3, seed=7)
    assert suite.samples == {"winogrande": data.subset(list(range(5)), 3, 7)} and suite.sizes == {"winogrande": 3}


def test_a_missing_file_or_task_is_named(tmp_path: Path) -> None:
    with pytest.raises(data.DataError, match=str(tmp_path / "piqa" / "valid.jsonl")):
        lm_eval_tasks.load_suite(["piqa"], tmp_path)
    with pytest.raises(ValueError, match="unknown tasks \\['mmlu'\\]; the local lm-eval tasks are arc_easy"):
        lm_eval_tasks.load_suite(["mmlu"], tmp_path)


@pytest.mark.skipif(SHARED_DATA is None, reason="no ../shared/data")
@pytest.mark.parametrize("task", LOCAL_TASKS)
def test_on_the_shared_data_lm_eval_scores_what_the_earlier_scorer_did(task: str) -> None:
    """The requests lm-eval builds from the local copies are those of the hand-written scorer this
    replaced (its readers are still in lp_fx.tools.data), but for BoolQ, whose prompt is lm-eval's
    (no ``Passage:`` label), and the whole data set is read."""
    suite = lm_eval_tasks.load_suite([task], SHARED_DATA)
    before = data.load_lambada(SHARED_DATA) if task == "lambada" else data.MC_TASKS[task](SHARED_DATA)
    assert suite.sizes[task] == len(before)
    earlier = [(item.context, item.target) for item in before[:20]] if task == "lambada" else \
        [request for item in before[:20] for request in item.requests]
    if task == "boolq":
        earlier = [(context.removeprefix("Passage: "), answer) for context, answer in earlier]
    assert _requests(suite.tasks[task], 20) == earlier


def test_metric_names_and_missing_standard_errors() -> None:
    values = {"alias": "lp_lambada", "perplexity,none": 3.5, "perplexity_stderr,none": 0.25, "acc,none": 0.5,
              "acc_stderr,none": "N/A"}
    assert lm_eval_tasks._metrics(values, 4) == {"ppl": 3.5, "ppl_stderr": 0.25, "acc": 0.5, "acc_stderr": None, "n": 4}


# ------------------------------------------------------------------------------- the model class


def _reference_loglikelihood(model: torch.nn.Module, tokenizer: object, context: str, continuation: str) -> tuple[float, bool]:
    """Plain PyTorch: the continuation's tokens after the context's, summed log-probabilities."""
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    ids = torch.tensor([tokenizer.encode(context + continuation, add_special_tokens=False)])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)[len(context_ids) - 1 :]
    target = ids[0, len(context_ids) :]
    return logprobs.gather(1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())


PAIRS = [("the cat sat", " on the mat"), ("the dog", " ran"), ("the dog", " sat"), ("a mat and a dog ran far away so", " it was good"),
         ("so", " it")]


def test_loglikelihoods_are_those_of_the_eager_reference_pairing(tiny) -> None:
    from lm_eval.api.instance import Instance

    from lp_fx.tools.evaluation.lm_eval_model import LayerParallelLM

    lm = LayerParallelLM(tiny.model, tokenizer=tiny.tokenizer, pairs=PAIRING, mode="block", batch_size=2)
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)], disable_tqdm=True)
    with eager_pairing(tiny.model, PAIRING.pairs, "block"):
        expected = [_reference_loglikelihood(tiny.model, tiny.tokenizer, *pair) for pair in PAIRS]
    plain = [_reference_loglikelihood(tiny.model, tiny.tokenizer, *pair) for pair in PAIRS]
    for (ll, greedy), (want, want_greedy) in zip(got, expected):
        assert ll == pytest.approx(want, abs=1e-4) and greedy == want_greedy
    assert any(abs(ll - base) > 1e-3 for (ll, _), (base, _) in zip(got, plain)), "the pairing should change the scores"


def _full_vocabulary_tokenizer() -> object:
    """A word-level tokenizer with a word for every id of the tiny models, so any generated id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", eos_token=f"w{VOCAB - 1}")


def test_generation_is_that_of_the_eager_reference_pairing() -> None:
    from lm_eval.api.instance import Instance

    from lp_fx.tools.evaluation.lm_eval_model import LayerParallelLM

    model, tokenizer = hf_model("llama"), _full_vocabulary_tokenizer()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    lm = LayerParallelLM(model, tokenizer=tokenizer, pairs=PAIRING, batch_size=2)
    prompts = ["w5 w9 w33 w4", "w7 w100 w12 w3 w3 w60 w2"]
    requests = [Instance("generate_until", {}, (prompt, {"until": ["w127"], "max_gen_toks": 8, "do_sample": False}), i)
                for i, prompt in enumerate(prompts)]
    got = lm.generate_until(requests, disable_tqdm=True)
    assert "forward" not in vars(model), "the paired forward is installed for the call only"
    with eager_pairing(model, PAIRING.pairs, "lp"):
        expected = [_greedy(model, tokenizer, prompt) for prompt in prompts]
    assert got == expected and all(len(text.split()) == 8 for text in got)
    assert expected != [_greedy(model, tokenizer, prompt) for prompt in prompts], "the pairing should change the text"


def _greedy(model: torch.nn.Module, tokenizer: object, prompt: str) -> str:
    ids = torch.tensor([tokenizer.encode(prompt)])
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"pairs": "1:3", "plan": "p.json"}, "give one of pairs, plan, checkpoint"),
        ({"dtype": "float16"}, "unknown model_args ['dtype']"),
        ({"pairs": "2:6"}, "range 2:6 is out of range: the model has 4 layers"),
    ],
)
def test_bad_model_args_are_refused_naming_what_is_valid(tiny, args: dict, message: str) -> None:
    from lp_fx.tools.evaluation.lm_eval_model import LayerParallelLM

    with pytest.raises(ValueError, match=message.replace("[", "\\[").replace("]", "\\]")):
        LayerParallelLM(tiny.model, tokenizer=tiny.tokenizer, **args)


# ---------------------------------------------------------------------------------- the commands


def test_the_table_shows_standard_errors_and_survives_a_zero_baseline() -> None:
    from lp_fx.tools.cli.common import format_table

    results = {
        "baseline": {"piqa": {"acc": 0.0, "acc_stderr": 0.0, "n": 3}, "wikitext": {"ppl": 10.0, "windows": 2}},
        "1:3": {"piqa": {"acc": 1 / 3, "acc_stderr": 0.3333, "n": 3}, "wikitext": {"ppl": 12.0, "windows": 2}},
    }
    rows = {line.split()[0]: line for line in format_table(["baseline", "1:3"], results).splitlines()}
    assert rows["piqa/acc"].split()[2:] == ["0", "±", "0", "0.3333", "±", "0.33", "(n/a)"]
    assert rows["wikitext/ppl"].split()[2:] == ["10", "12", "(1.200)"]


def test_the_lm_eval_command_refuses_bad_model_args_in_one_line_with_status_2(
    model_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As ``lp-fx-lm-eval --model lp_fx --model_args pretrained=...,pairs=2-4``. lm-eval's log handler,
    made once per process, keeps the stream of the test that made it: this run logs only warnings and
    makes none."""
    import lm_eval.utils

    from lp_fx.tools.cli import lm_eval as lm_eval_cli

    monkeypatch.setenv("LMEVAL_LOG_LEVEL", "WARNING")
    monkeypatch.setattr(lm_eval.utils, "_LOGGING_CONFIGURED", True)
    monkeypatch.setattr(sys, "argv", ["lp-fx-lm-eval"])
    capsys.readouterr()
    code = lm_eval_cli.main(["--model", "lp_fx", "--model_args", f"pretrained={model_dir},pairs=2-4",
                             "--tasks", "lp_piqa", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        "lp-fx-lm-eval: error: pair (2, 4) is not two consecutive layers: valid pairs look like (i, i + 1), e.g. (2, 3)"
    )


def test_eval_command_python_api_and_lm_eval_command_line_agree(
    model_dir: Path, task_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``lp-fx eval --tasks`` (standard errors in the table and the JSON), ``simple_evaluate(model="lp_fx")``
    and ``lp-fx-lm-eval --model lp_fx`` give the same accuracy for the same pairing and items."""
    import lm_eval

    import lp_fx.tools.evaluation.lm_eval_model  # noqa: F401  (registers "lp_fx" in lm-eval's model registry)
    from lp_fx.tools.cli import lm_eval as lm_eval_cli

    out = tmp_path / "eval.json"
    assert cli.main(["eval", "--model", str(model_dir), "--data-dir", str(task_dir), "--no-progress", "--window", "16",
                     "--tasks", "wikitext,piqa,lambada", "--pairs", "1:3", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "piqa/acc [3]" in table and "±" in table
    saved = json.loads(out.read_text())
    paired = saved["pairings"][1]["results"]
    assert set(paired["piqa"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "items"}
    assert set(paired["lambada"]) == {"ppl", "ppl_stderr", "acc", "acc_stderr", "n", "items"}
    for task in ("piqa", "lambada"):  # each item's acc, by document: their mean is lm-eval's acc
        items = paired[task]["items"]
        assert items["doc_id"] == list(range(paired[task]["n"]))
        assert sum(items["acc"]) / len(items["acc"]) == pytest.approx(paired[task]["acc"])
    assert "mean_acc_stderr" in saved["pairings"][1]["retention"]
    assert saved["task_scorer"].startswith("lm-evaluation-harness ")

    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": str(task_dir)})
    python = lm_eval.simple_evaluate(model="lp_fx", model_args={"pretrained": str(model_dir), "pairs": "1-2"},
                                     tasks=["lp_piqa"], task_manager=manager, device="cpu", batch_size=8)
    assert python["results"]["lp_piqa"]["acc_norm,none"] == paired["piqa"]["acc_norm"]

    folder = tmp_path / "harness"
    lm_eval_cli.main(["--model", "lp_fx", "--model_args", "pretrained=" + str(model_dir) + ",pairs=1:3",
                      "--tasks", "lp_piqa", "--metadata", json.dumps({"data_dir": str(task_dir)}),
                      "--device", "cpu", "--batch_size", "8", "--output_path", str(folder)])
    written = json.loads(next(folder.rglob("results_*.json")).read_text())
    assert written["results"]["lp_piqa"]["acc_norm,none"] == paired["piqa"]["acc_norm"]
    assert written["config"]["pairing"]["pairs"] == [[1, 2]]


@pytest.mark.parametrize(
    ("argv", "local"),
    [
        (["--model", "lp_fx", "--tasks", "lp_piqa,lp_arc_easy"], True),
        (["--model", "lp_fx", "--tasks=lp_fx"], True),
        (["--model", "lp_fx", "--tasks", "lp_piqa,hellaswag"], False),  # lm-eval's own task: its index is needed
        (["--model", "lp_fx", "--tasks", "lp_piqa", "--include_path", "elsewhere"], False),
        (["--model", "lp_fx"], False),
    ],
)
def test_lm_eval_command_asks_for_lm_evals_own_task_index_only_for_its_tasks(argv, local):
    from lp_fx.tools.cli import lm_eval as lm_eval_cli

    assert lm_eval_cli.only_local_tasks(argv) is local


def test_without_lm_evals_own_tasks_a_task_manager_indexes_only_the_local_folder_and_only_inside():
    """Building lm-eval's index of its own tasks takes ~20 s a run; local tasks do not need it."""
    import lm_eval.tasks

    from lp_fx.tools.cli import lm_eval as lm_eval_cli
    from lp_fx.tools.evaluation.lm_eval_tasks import LOCAL_TASKS, TASKS_DIR, harness_name

    default = lm_eval.tasks.TaskManager
    with lm_eval_cli.task_index(local_only=True):
        manager = lm_eval.tasks.TaskManager(include_path=str(TASKS_DIR))
    assert isinstance(manager, default) and lm_eval.tasks.TaskManager is default
    assert set(manager.all_tasks) == {harness_name(task) for task in LOCAL_TASKS} | {"lp_fx"}  # and their tag
