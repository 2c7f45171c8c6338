"""``--train-data self``: the unpaired model's own answers, generated once, cached, and distilled on."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from lp_fx import LayerParallel
from lp_fx.tools import cli
from lp_fx.tools.training import self_text
from lp_fx.tools.data import training_chunks
from lp_fx.tools.training import finetune as ft, losses
from lp_fx.tools.cli import finetune as finetune_command
from lp_fx.tools.training.self_text import GenerationSettings, SelfTextError

from tests.helpers.models import VOCAB, hf_model

WORDS = "the cat sat on a mat and dog ran far away so it was good".split()
SPECIALS = ["<pad>", "<s>", "</s>", "[UNK]"]
TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)
PROMPTS = [
    "the cat sat", "a dog ran far away", "so it was good", "the mat", "a cat and a dog sat on the mat",
    "it ran", "the dog was good", "far away it sat", "a good mat", "so the cat ran", "the dog sat on a cat",
    "it was far",
]
SHORT = GenerationSettings(max_new_tokens=12, batch=4)


def chat_tokenizer(template: str | None = TEMPLATE, pad: str | None = "<pad>", eos: str | None = "</s>"):
    """A word-level tokenizer over the tiny model's whole vocabulary, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = SPECIALS + WORDS + ["user", "assistant", "."]
    vocab = {name: i for i, name in enumerate(names + [f"w{i}" for i in range(VOCAB - len(names))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token=pad, bos_token="<s>", eos_token=eos
    )
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_chat_model")
    chat_tokenizer().save_pretrained(path)
    hf_model("llama").save_pretrained(path)
    return path


def samples_of(tmp_path: Path, prompts=PROMPTS, settings=SHORT, model=None, tokenizer=None) -> list[dict]:
    return self_text.training_samples(
        model or hf_model("llama"), tokenizer or chat_tokenizer(), "tiny", prompts, settings, tmp_path / "c.jsonl",
        progress=False,
    )


def cache_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@torch.no_grad()
def greedy_without_cache(model, tokenizer, prompt: str, new_tokens: int) -> list[int]:
    """Reference: one prompt alone, the whole sequence run again for every new token."""
    ids = tokenizer(self_text.conversation_text(tokenizer, prompt), add_special_tokens=False, return_tensors="pt").input_ids
    out: list[int] = []
    for _ in range(new_tokens):
        token = int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


# -------------------------------------------------------------------------------- generation


def test_batched_answers_with_the_kv_cache_equal_a_plain_greedy_loop(tmp_path):
    model, tokenizer = hf_model("llama"), chat_tokenizer()
    samples = samples_of(tmp_path, model=model, tokenizer=tokenizer)
    assert {len(tokenizer(p, add_special_tokens=False).input_ids) for p in PROMPTS} != {1}  # batches are padded
    for sample in samples:
        reference = greedy_without_cache(model, tokenizer, sample["prompt"], SHORT.max_new_tokens)
        assert sample["answer"] == tokenizer.decode(reference, skip_special_tokens=True).strip()
        assert sample["tokens"] == len(reference)
        assert sample["finished"] == (len(reference) < SHORT.max_new_tokens)


def test_without_a_pad_token_batches_are_padded_with_the_end_of_sequence_token(tmp_path):
    with_pad = samples_of(tmp_path / "a", prompts=PROMPTS[:4])
    assert samples_of(tmp_path / "b", prompts=PROMPTS[:4], tokenizer=chat_tokenizer(pad=None)) == with_pad
    with pytest.raises(SelfTextError, match="neither a pad nor an end-of-sequence token"):
        samples_of(tmp_path / "c", prompts=PROMPTS[:4], tokenizer=chat_tokenizer(pad=None, eos=None))


def test_answers_are_cached_in_order_and_rendered_by_the_chat_template(tmp_path):
    tokenizer = chat_tokenizer()
    samples = samples_of(tmp_path, tokenizer=tokenizer)
    assert [s["prompt"] for s in samples] == PROMPTS
    header, *rows = cache_lines(tmp_path / "c.jsonl")
    assert header == {"format": self_text.CACHE_FORMAT, "model": "tiny", "settings": SHORT.cache_key()}
    assert {row["prompt"]: row for row in rows} == {s["prompt"]: s for s in samples}
    ids = self_text.conversations_ids(tokenizer, samples[:2])
    expected = "".join(f"<s> user {s['prompt']} </s> <s> assistant {s['answer']} </s> " for s in samples[:2])
    assert ids == tokenizer(expected, add_special_tokens=False).input_ids


def test_a_second_run_reads_the_cache_and_generates_only_new_prompts(tmp_path, monkeypatch):
    first = samples_of(tmp_path, prompts=PROMPTS[:8])
    asked: list[str] = []
    real = self_text.generate_batches

    def counting(model, tokenizer, prompts, settings, progress=True):
        asked.extend(prompts)
        return real(model, tokenizer, prompts, settings, progress)

    monkeypatch.setattr(self_text, "generate_batches", counting)
    assert samples_of(tmp_path, prompts=PROMPTS[:8]) == first and asked == []
    again = samples_of(tmp_path, prompts=PROMPTS)
    assert asked == PROMPTS[8:] and again[:8] == first
    assert len(cache_lines(tmp_path / "c.jsonl")) == 1 + len(PROMPTS)


def test_an_unfinished_last_line_is_dropped_and_generated_again(tmp_path):
    whole = samples_of(tmp_path, prompts=PROMPTS[:4])
    cache = tmp_path / "c.jsonl"
    text = cache.read_text()
    cache.write_text(text[: text.rstrip("\n").rfind("\n") + 1] + '{"prompt": "the ca')
    assert samples_of(tmp_path, prompts=PROMPTS[:4]) == whole
    assert len(cache_lines(cache)) == 5


def test_sampled_answers_follow_the_seed(tmp_path):
    settings = GenerationSettings(max_new_tokens=12, batch=4, temperature=1.0, seed=3)
    one = samples_of(tmp_path / "a", settings=settings)
    assert samples_of(tmp_path / "b", settings=settings) == one
    other = samples_of(tmp_path / "c", settings=GenerationSettings(max_new_tokens=12, batch=4, temperature=1.0, seed=4))
    assert [s["answer"] for s in other] != [s["answer"] for s in one]
    assert [s["answer"] for s in one] != [s["answer"] for s in samples_of(tmp_path / "d")]


def distill_loss_on(model, chunks: torch.Tensor) -> float:
    """KL of the model paired (1, 2) from the unpaired tiny model, over every chunk."""
    torch._dynamo.reset()
    student = torch.compile(model, backend=LayerParallel(pairs=[(1, 2)], inner="eager"))
    with torch.no_grad():
        return float(losses.distill_loss(losses.logits_of(student, chunks), losses.logits_of(hf_model("llama"), chunks)))


def test_the_student_loss_falls_on_the_self_generated_text(tmp_path):
    model, tokenizer = hf_model("llama"), chat_tokenizer()
    ids = self_text.conversations_ids(tokenizer, samples_of(tmp_path, model=model, tokenizer=tokenizer))
    chunks = training_chunks(ids, 32, 4)
    before = distill_loss_on(model, chunks)
    config = ft.FinetuneConfig(pairs=((1, 2),), steps=40, lr=3e-3, batch=2, seq_len=32, warmup=2, save_every=40,
                               inner="eager")
    ft.finetune(model, ids, config, tmp_path / "ckpt", progress=False)
    assert distill_loss_on(model, chunks) < 0.75 * before  # 0.50 measured


# ------------------------------------------------------------------------------------ bad input


def test_a_cache_made_otherwise_is_refused_naming_the_difference(tmp_path):
    samples_of(tmp_path, prompts=PROMPTS[:2])
    with pytest.raises(SelfTextError, match=r"made by model 'tiny' with \{'max_new_tokens': 12.*this run asks .*'max_new_tokens': 5"):
        samples_of(tmp_path, prompts=PROMPTS[:2], settings=GenerationSettings(max_new_tokens=5))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json\n", "line 1 is not valid JSON"),
        ('{"format": "other/1"}\n', "in format 'other/1'"),
        (json.dumps({"format": self_text.CACHE_FORMAT, "model": "tiny", "settings": SHORT.cache_key()})
         + '\n{"prompt": "the cat sat"}\n', "line 2 is not an answer"),
    ],
    ids=["not-json", "other-format", "not-an-answer"],
)
def test_an_unusable_cache_is_refused(tmp_path, content, message):
    (tmp_path / "c.jsonl").write_text(content)
    with pytest.raises(SelfTextError, match=message):
        samples_of(tmp_path)


def test_a_tokenizer_without_a_chat_template_is_refused(tmp_path):
    with pytest.raises(SelfTextError, match="tiny's tokenizer has no chat template"):
        samples_of(tmp_path, tokenizer=chat_tokenizer(template=None))


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "prompt file .* not found"), ("\n# only a comment\n  \n", "holds no instructions")],
)
def test_a_missing_or_empty_prompt_file_is_refused(tmp_path, content, message):
    path = tmp_path / "prompts.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SelfTextError, match=message):
        self_text.load_prompts(path)


def test_prompts_skip_comments_blanks_and_repeats(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# heading\nthe cat sat\n\n  a dog ran  \nthe cat sat\n")
    assert self_text.load_prompts(path) == ["the cat sat", "a dog ran"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"max_new_tokens": 0}, "max-new-tokens must be"), ({"batch": 0}, "batch must be"),
     ({"temperature": -1.0}, "temperature must be a finite number >= 0"),
     ({"temperature": float("nan")}, "temperature must be")],
)
def test_bad_generation_settings_are_refused(overrides, message):
    with pytest.raises(SelfTextError, match=message):
        GenerationSettings(**overrides)


def test_the_bundled_prompts_hold_a_few_hundred_and_not_the_demo_question():
    prompts = self_text.load_prompts(self_text.DEFAULT_PROMPTS)
    assert len(prompts) >= 200
    assert not [p for p in prompts if "capital" in p.lower()]


# ------------------------------------------------------------------------------------------ CLI


def cli_args(model: Path, data_dir: Path, tmp_path: Path, *extra: str) -> list[str]:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return ["finetune", "--model", str(model), "--data-dir", str(data_dir), "--window", "16", "--no-progress",
            "--inner", "eager", "--pairs", "1:3", "--train-data", "self", "--self-prompts", str(prompts), "--self-max-tokens", "12",
            "--steps", "1", "--batch", "2", "--seq-len", "16", "--eval-windows", "1", *extra]


def test_cli_self_distillation_writes_then_reuses_its_cache(chat_model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert cli.main(cli_args(chat_model_dir, data_dir, tmp_path, "--out", str(out))) == 0
    cache = tmp_path / "ckpt.self-text.jsonl"  # next to the checkpoint by default
    made = cache.read_text()
    assert len(made.splitlines()) == 1 + len(PROMPTS)
    assert "the unpaired model's greedy answers to 12 prompts" in capsys.readouterr().out
    record = json.loads((out / "train.json").read_text())["args"]
    assert record["train_data"] == "self" and record["cache"] == str(cache)
    assert record["self_text"]["conversations"] == len(PROMPTS)
    cache.write_text(made.replace('"answer": "', '"answer": "dog dog dog '))  # shows whether it is read back
    assert cli.main(cli_args(chat_model_dir, data_dir, tmp_path, "--out", str(out), "--overwrite")) == 0
    assert cache.read_text().count("dog dog dog") == len(PROMPTS)
    again = json.loads((out / "train.json").read_text())["args"]["self_text"]
    assert again["tokens"] == record["self_text"]["tokens"] + 3 * len(PROMPTS)


def test_cli_mixes_a_file_with_the_self_text_in_every_batch(chat_model_dir, data_dir, tmp_path, capsys):
    train = tmp_path / "train.txt"
    train.write_text(" ".join(["the cat sat on a mat and the dog ran far away"] * 40))
    out = tmp_path / "ckpt"
    args = cli_args(chat_model_dir, data_dir, tmp_path, "--train-data", str(train), "--out", str(out))
    assert cli.main(args) == 0
    assert "; each batch takes from each in equal shares" in capsys.readouterr().out
    record = json.loads((out / "train.json").read_text())["args"]
    assert record["train_data"] == ["self", str(train)] and record["self_text"]["conversations"] == len(PROMPTS)


@pytest.mark.parametrize(
    ("batch", "more", "message"),
    [
        ("2", ["--train-data", "self"], "--train-data self is given more than once"),
        ("2", ["--train-data", "TRAIN", "--train-data", "DIR/./train.txt"], "is given more than once (as "),
        ("1", ["--train-data", "TRAIN"], "2 training texts cannot share a batch of 1 sequences; give --batch 2"),
    ],
)
def test_cli_bad_mixtures_are_a_clear_error(chat_model_dir, data_dir, tmp_path, capsys, batch, more, message):
    train = tmp_path / "train.txt"
    train.write_text(" ".join(["the cat sat on a mat and the dog ran far away"] * 40))
    args = cli_args(chat_model_dir, data_dir, tmp_path, *[m.replace("TRAIN", str(train)).replace("DIR", str(tmp_path)) for m in more],
                    "--out", str(tmp_path / "o"))
    args[args.index("--batch") + 1] = batch
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.self-text.jsonl").exists()  # refused before the work


@pytest.mark.parametrize("given", [None, ["wikitext"]])
def test_train_data_defaults_to_and_wikitext_names_the_data_directorys_train_split(tmp_path, given):
    train = tmp_path / "wikitext-2" / "train.txt"
    train.parent.mkdir()
    train.write_text("the cat sat on a mat\n")
    args = argparse.Namespace(train_data=given, **{name: None for name in finetune_command.SELF_OPTIONS})
    [text] = finetune_command.training_texts(args, tmp_path / "o", tmp_path)
    assert text.path == train


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--self-temperature", "-1"], "temperature must be a finite number >= 0"),
        (["--self-prompts", "/nonexistent/prompts.txt"], "prompt file /nonexistent/prompts.txt not found"),
    ],
)
def test_cli_bad_self_options_are_a_clear_error(chat_model_dir, data_dir, tmp_path, capsys, extra, message):
    args = cli_args(chat_model_dir, data_dir, tmp_path, "--out", str(tmp_path / "o"))
    flag, value = extra
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += extra
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err


def test_cli_self_options_without_self_are_refused(model_dir, data_dir, tmp_path, capsys):
    args = ["finetune", "--model", str(model_dir), "--data-dir", str(data_dir), "--pairs", "1:3",
            "--cache", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "o")]
    assert cli.main(args) == 2
    assert "--cache is used only with --train-data self" in capsys.readouterr().err


def test_cli_self_refuses_a_model_without_a_chat_template(model_dir, data_dir, tmp_path, capsys):
    assert cli.main(cli_args(model_dir, data_dir, tmp_path, "--out", str(tmp_path / "o"))) == 2
    assert "tokenizer has no chat template" in capsys.readouterr().err
