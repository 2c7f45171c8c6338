"""Fine-tuning the paired layers through the compiled pairing; checkpoints; loading for serving."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import lp_fx
from lp_fx import LayerParallel
from lp_fx.tools import cli, data
from lp_fx.tools.data import TrainingTextError
from lp_fx.tools.training import finetune as ft
from lp_fx.checkpoint import CURRENT, PAIRING, RECORD, TENSORS, CheckpointError, load_finetuned

from tests.helpers.models import VOCAB, hf_model

# Its module-scoped fixture is costly: every test of this module runs in one pytest-xdist worker.
pytestmark = pytest.mark.xdist_group("test_finetune")

PAIRS = ((1, 2),)


def tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def config(**overrides) -> ft.FinetuneConfig:
    base = dict(pairs=PAIRS, steps=20, lr=3e-3, batch=2, seq_len=32, warmup=2, save_every=5, eval_every=10,
                inner="eager")  # the backward through AOTAutograd: tests/core/test_backward.py
    return ft.FinetuneConfig(**{**base, **overrides})


def compiled_logits(model, options, ids) -> torch.Tensor:
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(model, backend=LayerParallel(options, inner="aot_eager"))(ids, use_cache=False).logits


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[torch.nn.Module, dict, Path]:
    """The tiny Llama after 20 distillation steps on one repeated batch, and its checkpoint."""
    out = tmp_path_factory.mktemp("ckpt")
    model = hf_model("llama")
    held = tokens(64, seed=1).view(2, 32)
    record = ft.finetune(model, tokens(64), config(), out, heldout=held, progress=False)
    return model, record, out


def test_loss_falls_over_twenty_steps(trained):
    _, record, _ = trained
    losses = [point["loss"] for point in record["loss"]]
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0]
    assert [p["step"] for p in record["heldout"]] == [0, 10, 20]


def test_only_the_paired_layers_change(trained):
    model, _, _ = trained
    before = hf_model("llama").state_dict()
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    paired = {name for name in before if name.startswith(("model.layers.1.", "model.layers.2."))}
    assert changed and changed <= paired
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in paired)


def test_checkpoint_holds_only_the_trained_tensors_and_the_record(trained):
    model, record, out = trained
    from safetensors.torch import load_file

    saved = load_file(str(out / TENSORS))
    assert set(saved) == {n for n, _ in model.named_parameters() if n.startswith(("model.layers.1.", "model.layers.2."))}
    pairing = json.loads((out / PAIRING).read_text())
    assert pairing["pairs"] == [[1, 2]] and pairing["modes"] == ["lp"] and pairing["num_layers"] == 4
    assert json.loads((out / RECORD).read_text())["step"] == 20 == record["step"]


def test_save_load_serve_equals_the_trained_model(trained):
    model, _, out = trained
    ids = tokens(12, seed=3).view(1, 12)
    fresh = hf_model("llama")
    options = lp_fx.load_finetuned(fresh, out)
    assert options == {"stack": "model.layers", "pairs": [(1, 2)], "modes": ["lp"]}
    assert torch.equal(compiled_logits(fresh, options, ids), compiled_logits(model, options, ids))


def test_distillation_loss_is_zero_without_pairs(tmp_path):
    model = hf_model("llama")
    record = ft.finetune(model, tokens(64), config(pairs=(), train_layers=(1, 2), steps=1, warmup=0), tmp_path, progress=False)
    assert 0 <= record["loss"][0]["loss"] <= 1e-6  # the student is the teacher until the first update


def test_interrupted_run_leaves_an_earlier_checkpoint(tmp_path, monkeypatch):
    real_step, calls = ft._train_step, []

    def failing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt("stopped at step 8")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(ft, "_train_step", failing_step)
    model = hf_model("llama")
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(model, tokens(64), config(), tmp_path, progress=False)
    assert json.loads((tmp_path / RECORD).read_text())["step"] == 5
    current = os.readlink(tmp_path / CURRENT)  # no temporary left: the files, their links, the current folder
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CURRENT, PAIRING, RECORD, TENSORS, current])
    assert sorted(p.name for p in (tmp_path / current).iterdir()) == sorted([PAIRING, RECORD, TENSORS])
    assert "stack" in lp_fx.load_finetuned(hf_model("llama"), tmp_path)


def test_unpaired_control_trains_the_given_layers_with_next_token_loss(tmp_path):
    model = hf_model("llama")
    ft.finetune(model, tokens(64), config(pairs=(), train_layers=(1, 2), loss="lm", steps=3), tmp_path, progress=False)
    options = load_finetuned(hf_model("llama"), tmp_path)
    assert options["pairs"] == []


def test_detokenize_wikitext_reads_like_the_raw_text():
    tokenized = " = Valkyria = \n \n It is a well @-@ known game , released in 1 @,@ 000 copies ( 2011 ) . It 's <unk> good . \n"
    assert data.detokenize_wikitext(tokenized) == (
        "= Valkyria =\nIt is a well-known game, released in 1,000 copies (2011). It's good.\n"
    )
    assert data.looks_tokenized(tokenized) and not data.looks_tokenized("It is a well-known game.")


# ------------------------------------------------------------------------------------ bad input


def _corrupt(directory: Path) -> None:
    (directory / TENSORS).write_bytes(b"\x00\x01 not a safetensors file")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: None, r"made for another model: num_layers 4 .*this model has 6"),
        (lambda d: (d / TENSORS).unlink(), "trained.safetensors is missing"),
        (_corrupt, "not a valid safetensors file .*corrupt"),
        (lambda d: (d / PAIRING).write_text("{ not json"), "not valid JSON"),
    ],
    ids=["other-model", "missing-tensors", "corrupt-tensors", "corrupt-pairing"],
)
def test_unusable_checkpoint_is_refused_and_the_model_is_untouched(trained, tmp_path, damage, message):
    _, _, out = trained
    for name in (PAIRING, RECORD, TENSORS):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    damage(tmp_path)
    model = hf_model("llama", layers=6) if "other model" in message else hf_model("llama")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=message):
        load_finetuned(model, tmp_path)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


def test_missing_checkpoint_directory_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_finetuned(hf_model("llama"), tmp_path / "nope")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"steps": 0}, "steps must be a whole number >= 1"),
        ({"loss": "mse"}, "loss='mse' is not valid; choose one of 'distill', 'lm'"),
        ({"pairs": ((1, 3),)}, "not two consecutive layers"),
        ({"modes": ("lp", "block")}, "2 modes for 1 pairs"),
    ],
)
def test_bad_arguments_are_refused(overrides, message):
    with pytest.raises(lp_fx.LayerParallelError, match=message):
        config(**overrides)


def test_pairs_out_of_range_name_the_valid_layers(tmp_path):
    with pytest.raises(ft.FinetuneError, match=r"model.layers has 4 layers, valid indices 0..3"):
        ft.finetune(hf_model("llama"), tokens(64), config(pairs=((4, 5),)), tmp_path, progress=False)


def test_too_little_training_text_is_an_error(tmp_path):
    with pytest.raises(TrainingTextError, match="fewer than one batch"):
        ft.finetune(hf_model("llama"), tokens(40), config(), tmp_path, progress=False)


def test_mixed_batches_take_from_every_text_in_equal_shares():
    long = torch.arange(64).repeat_interleave(4)  # 64 chunks of 4 tokens, chunk i all i
    short = 1000 + torch.arange(3).repeat_interleave(4)  # 3 chunks: 1000, 1001, 1002
    batches = data.MixedBatches([long, short], seq_len=4, batch=5, seed=0)
    drawn = torch.stack([batches.next() for _ in range(10)])  # (10 batches, 5 sequences, 4 tokens)
    assert drawn[:, :3].lt(64).all() and drawn[:, 3:].ge(1000).all()  # 3 + 2 of 5: the first text takes the odd one
    assert set(drawn[:, 3:, 0].flatten().tolist()) == {1000, 1001, 1002}  # the short text repeated, not drowned


def test_mixed_batches_of_one_text_are_the_plain_batches():
    ids = tokens(40 * 8)
    mixed = data.MixedBatches([ids], seq_len=8, batch=4, seed=3)
    plain = data.Batches(data.training_chunks(ids, 8, 4), 4, 3)
    assert all(torch.equal(mixed.next(), plain.next()) for _ in range(25))


def test_more_texts_than_sequences_per_batch_is_an_error():
    with pytest.raises(TrainingTextError, match="3 training texts cannot share a batch of 2 sequences; give --batch 3"):
        data.MixedBatches([tokens(64)] * 3, seq_len=4, batch=2, seed=0)


def test_token_streams_tell_one_text_from_several():
    one = [5, 6, 7]
    assert data.token_streams(one) == [one]
    assert len(data.token_streams(torch.tensor(one))) == 1
    assert data.token_streams([one, [8, 9]]) == [one, [8, 9]]


# ------------------------------------------------------------------------------------------ CLI


def test_cli_finetune_then_eval_with_the_checkpoint(model_dir, data_dir, tmp_path, capsys):
    train = tmp_path / "train.txt"
    train.write_text(" ".join(["the cat sat on a mat and the dog ran far away"] * 40))
    out = tmp_path / "new" / "ckpt"  # parents are created
    common = ["--model", str(model_dir), "--data-dir", str(data_dir), "--window", "16", "--no-progress"]
    args = ["finetune", *common, "--inner", "eager", "--pairs", "1:3", "--train-data", str(train), "--steps", "4", "--batch", "2",
            "--seq-len", "16", "--eval-windows", "2", "--eval-every", "2", "--out", str(out)]
    assert cli.main(args) == 0
    assert (out / "loss.png").stat().st_size > 0
    assert "held-out perplexity" in capsys.readouterr().out
    result = tmp_path / "eval.json"
    assert cli.main(["eval", *common, "--tasks", "wikitext", "--pairs", "1:3", "--checkpoint", str(out),
                     "--out", str(result)]) == 0
    names = [p["name"] for p in json.loads(result.read_text())["pairings"]]
    assert names == ["baseline", "1:3", "finetuned:ckpt"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--steps", "0"], "steps must be a whole number >= 1"),
        (["--pairs", "8:10"], "valid indices 0..3"),
        (["--train-data", "/nonexistent/train.txt"], "training text /nonexistent/train.txt not found"),
        (["--train-data", "/"], "training text / is a directory"),
        (["--batch", "0"], "batch must be a whole number >= 1, got 0"),
    ],
)
def test_cli_finetune_bad_input_is_a_clear_error(model_dir, data_dir, tmp_path, capsys, extra, message):
    train = tmp_path / "train.txt"
    train.write_text(" ".join(["the cat sat on a mat"] * 40))
    args = ["finetune", "--model", str(model_dir), "--data-dir", str(data_dir), "--window", "16", "--no-progress",
            "--pairs", "1:3", "--train-data", str(train), "--seq-len", "16", "--batch", "2", "--out", str(tmp_path / "o")]
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err


def test_cli_eval_refuses_a_missing_checkpoint_before_the_work(model_dir, data_dir, tmp_path, capsys):
    args = ["eval", "--model", str(model_dir), "--data-dir", str(data_dir), "--window", "16", "--no-progress",
            "--tasks", "wikitext", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "e.json")]
    assert cli.main(args) == 2
    assert "does not exist" in capsys.readouterr().err
