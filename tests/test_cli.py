"""`lp-fx eval / plan / sweep` end to end on a tiny local HF model directory and tiny data files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lp_fx import cli

from .models import hf_model

WORDS = "the cat sat on a mat and dog ran far away so it was good".split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_model")
    vocab = {"[UNK]": 0, **{word: i + 1 for i, word in enumerate(WORDS + ["."])}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(path)
    hf_model("llama", layers=4).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data")
    (path / "wikitext-2-raw").mkdir()
    text = " ".join(WORDS[(i * 7) % len(WORDS)] for i in range(16 * 12)) + " ."
    (path / "wikitext-2-raw" / "wiki.test.raw").write_text(text)
    (path / "winogrande").mkdir()
    row = {"context_options": ["the cat sat so the cat", "the cat sat so the dog"], "continuation": "ran far.", "gold": 1}
    (path / "winogrande" / "winogrande.jsonl").write_text((json.dumps(row) + "\n") * 5)
    return path


def _common(model_dir: Path, data_dir: Path) -> list[str]:
    return ["--model", str(model_dir), "--data-dir", str(data_dir), "--window", "16", "--no-progress"]


def test_plan_then_eval_with_the_plan(model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    assert cli.main(["plan", *_common(model_dir, data_dir), "--num-pairs", "1", "--calib-windows", "2",
                     "--out", str(plan)]) == 0
    saved = json.loads(plan.read_text())
    assert saved["num_layers"] == 4 and len(saved["pairs"]) == 1 and len(saved["candidates"]) == 3
    out = tmp_path / "eval.json"
    args = ["eval", *_common(model_dir, data_dir), "--tasks", "wikitext,winogrande", "--limit", "3",
            "--pairs", "1:3", "--pairs", str(plan), "--out", str(out)]
    assert cli.main(args) == 0
    first = json.loads(out.read_text())
    names = [p["name"] for p in first["pairings"]]
    assert names == ["baseline", "1:3", "plan"]
    assert first["sizes"] == {"winogrande": 3, "wikitext": 12}
    assert first["pairings"][1]["pairs"] == [[1, 2]]
    assert "wikitext/ppl" in first["pairings"][2]["retention"]["per_metric"]


def test_sweep_writes_json_and_plot(model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    out, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    args = ["sweep", *_common(model_dir, data_dir), "--starts", "1", "--ppl-windows", "2",
            "--out", str(out), "--plot", str(plot)]
    assert cli.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["start"], r["delta"], r["effective_depth"]) for r in rows] == [(1, 2, 3)]
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_plan_for_another_model_is_refused(
    model_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"model": "big", "num_layers": 30, "pairs": [[14, 15]]}))
    code = cli.main(["eval", *_common(model_dir, data_dir), "--tasks", "wikitext", "--pairs", str(plan)])
    assert code == 2
    assert "30 layers" in capsys.readouterr().err


def test_missing_data_dir_is_named(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "no_data"
    code = cli.main(["eval", "--model", str(model_dir), "--data-dir", str(missing), "--tasks", "wikitext"])
    assert code == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "wiki.test.raw" in err


def test_bad_pairing_spec_is_an_error(model_dir: Path, data_dir: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli.main(["eval", *_common(model_dir, data_dir), "--tasks", "wikitext", "--pairs", "3:6"])
    assert code == 2
    assert "odd" in capsys.readouterr().err
