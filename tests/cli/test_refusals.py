"""The ``lp-fx`` commands check every argument and pairing before any work, find their data from
any working directory, and print no third-party import noise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import lp_fx
from lp_fx.tools import cli, data
from lp_fx import checkpoint
from lp_fx.tools.evaluation import scoring as evaluate
from lp_fx.tools.cli import common as options

from tests.helpers.models import hf_model
from tests.helpers.words import WORDS

NOISE = ("Failed to load", "register_constant", "_pytree", "Detected no triton")


def _common(model_dir: Path, data_dir: Path) -> list[str]:
    return ["--model", str(model_dir), "--data-dir", str(data_dir), "--window", "16", "--no-progress"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """A results folder that already holds an earlier eval.json."""
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "eval.json").write_text('{"earlier": true}\n')
    return folder


def _refused(args: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run ``lp-fx``: it must exit with rc 2 and one line on stderr; that line."""
    capsys.readouterr()  # what came before (a test's own model loading)
    with pytest.raises(SystemExit) as exit_info:
        code = cli.main(args)
        raise SystemExit(code)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture
def refused_eval(
    model_dir: Path, data_dir: Path, results: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., str]:
    """``refused_eval(*args)`` runs ``lp-fx eval --tasks wikitext *args`` on the tiny model, which
    must be refused in one line before anything is measured or written; returns that line."""
    monkeypatch.setattr(evaluate, "run_eval", lambda *a, **k: pytest.fail("measured before the arguments were checked"))

    def run(*args: str) -> str:
        before = _snapshot(results)
        err = _refused(["eval", *_common(model_dir, data_dir), "--tasks", "wikitext", *args,
                        "--out", str(results / "eval.json")], capsys)
        assert _snapshot(results) == before
        return err

    return run


# ------------------------------------------------------------------------ numbers (item 10)


def _bad_values(command: str, option: str, valid: str, *values: str) -> list:
    """One case per value: ``command`` (its words) with ``option value`` is refused naming ``valid``."""
    return [pytest.param(command.split(), option, value, valid, id=f"{command.split()[0]} {option} {value}")
            for value in values]


@pytest.mark.parametrize(
    ("command", "option", "value", "valid"),
    [
        *_bad_values("eval --tasks wikitext", "--ppl-windows", "integer >= 1", "0", "-1"),
        *_bad_values("eval --tasks wikitext", "--ppl-windows", "not a whole number", "many"),
        *_bad_values("eval --tasks winogrande", "--limit", "integer >= 1", "0", "-3"),
        *_bad_values("eval --tasks wikitext", "--window", "integer >= 2", "0", "1"),
        *_bad_values("eval --tasks winogrande", "--batch-size", "integer >= 1", "0"),
        *_bad_values("sweep", "--ppl-windows", "integer >= 1", "0"),
        *_bad_values("sweep", "--seeds", "integer >= 1", "0"),
        *_bad_values("sweep", "--starts", "comma-separated integers >= 0", "2,x"),
        *_bad_values("sweep", "--deltas", "comma-separated integers >= 0", "-2"),
        *_bad_values("plan", "--num-pairs", "integer >= 1", "0"),
        *_bad_values("plan --num-pairs 1", "--calib-windows", "integer >= 1", "0"),
        *_bad_values("plan --num-pairs 1", "--screen-windows", "integer >= 1", "-1"),
        *_bad_values("plan --num-pairs 1", "--refine", "integer >= 1", "0"),
        *_bad_values("plan --num-pairs 1", "--passes", "integer >= 0", "-1"),
        *_bad_values("plan --num-pairs 1", "--race-margin", "finite number >= 0", "-0.1", "nan"),
        *_bad_values("plan", "--max-ppl-ratio", "finite number > 0", "0", "nan"),
        *_bad_values("finetune --pairs 1:3", "--eval-windows", "integer >= 1", "0"),
        *_bad_values("finetune --pairs 1:3", "--clip", "finite number > 0", "-1"),
        *_bad_values("frontier", "--speed-tokens", "integer >= 2", "0", "1"),  # 1 token: no decode step to time
        *_bad_values("frontier", "--speed-rounds", "integer >= 0", "-1"),
    ],
)
def test_bad_numbers_are_refused_while_parsing_naming_what_is_valid(
    model_dir: Path, data_dir: Path, results: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
    command: list[str], option: str, value: str, valid: str,
) -> None:
    monkeypatch.setattr(options, "load", lambda args: pytest.fail("the model was loaded before the options were checked"))
    before = _snapshot(results)
    out = ["--out", str(results / "eval.json")] if command[0] != "finetune" else ["--out", str(results / "ckpt")]
    err = _refused([*command, *_common(model_dir, data_dir), option, value, *out], capsys)
    assert option in err and valid in err
    assert _snapshot(results) == before


@pytest.mark.parametrize("command", ["plan --num-pairs 1", "frontier"])
def test_a_race_margin_with_no_race_is_refused_while_parsing(
    model_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
    command: str,
) -> None:
    monkeypatch.setattr(options, "load", lambda args: pytest.fail("the model was loaded before the options were checked"))
    args = [*command.split(), *_common(model_dir, data_dir), "--race-margin", "0.02", "--no-race",
            "--out", str(tmp_path / "out.json")]
    err = _refused(args, capsys)
    assert "--no-race" in err and "--race-margin" in err and "not allowed" in err
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize(
    ("option", "value", "valid"),
    [("--tokens", "1", "integer >= 2"), ("--rounds", "0", "integer >= 1"), ("--nproc", "0", "integer >= 1")],
)
def test_bench_refuses_bad_numbers_before_starting(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, option: str, value: str, valid: str
) -> None:
    from lp_fx.tools.cli import bench

    monkeypatch.setattr(bench, "bench", lambda args: pytest.fail("the benchmark started with a bad option"))
    err = _refused(["bench", option, value, "--json", str(tmp_path / "b.json")], capsys)
    assert option in err and valid in err


@pytest.mark.parametrize(
    ("command", "option", "work"),
    [(["bench"], "--json", "subprocess.call"), (["export", "--pairs", "baseline"], "--out", "lp_fx.tools.models.load_model")],
    ids=["bench", "export"],
)
def test_bench_and_export_refuse_an_unwritable_destination_before_the_work(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
    command: list[str], option: str, work: str,
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(work, lambda *a, **k: pytest.fail("the work started before the destination was checked"))
    err = _refused([*command, option, str(blocker / "out" / "result")], capsys)
    assert f"cannot write to {blocker}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


# --------------------------------------------------------------- pairings against the model (item 10)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("4-5", "pair (4, 5) is out of range: the model has 4 layers, valid indices 0..3"),
        ("2:6", "range 2:6 is out of range: the model has 4 layers, valid indices 0..3"),
        ("0:1000000000", "range 0:1000000000 is out of range: the model has 4 layers"),
        ("1-2,2-3", "overlap"),
        ("1-3", "not two consecutive layers"),
    ],
)
def test_a_pairing_that_does_not_fit_the_model_is_refused_before_the_baseline(
    refused_eval: Callable[..., str], spec: str, message: str
) -> None:
    assert message in refused_eval("--pairs", "0:2", "--pairs", spec)


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ({"num_layers": 4, "pairs": [[3, 4]]}, "pair (3, 4) is out of range: the model has 4 layers"),
        ({"num_layers": 4, "pairs": [[0, 1]], "modes": ["sideways"]}, "'sideways' is not valid"),
        ({"num_layers": 30, "pairs": [[14, 15]]}, "30 layers"),
    ],
)
def test_a_plan_that_does_not_fit_the_model_is_refused_before_the_baseline(
    refused_eval: Callable[..., str], tmp_path: Path, plan: dict, message: str
) -> None:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    assert message in refused_eval("--pairs", str(path))


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ({"num_layers": 4, "pairs": [[0, 1]], "modes": 5},
         "'modes' must be a list of one mode per pair (1 pairs), each one of 'lp', 'block', 'prune', 'merge'; got 5"),
        ({"num_layers": 4, "pairs": [[0, 1]], "mode": "block"}, "unknown key(s) 'mode'; a plan's keys are version, "
         "model, num_layers, pairs, modes, objective, calibration, search, candidates, steps"),
    ],
    ids=["modes-int", "unknown-key"],
)
@pytest.mark.parametrize("command", ["eval", "export", "finetune"])
def test_a_malformed_plan_file_is_refused_in_one_line_by_every_command(
    model_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
    command: str, plan: dict, message: str,
) -> None:
    """The refusal is the last line (``export`` shows the weight-loading bar before it)."""
    for work in ("lp_fx.tools.evaluation.scoring.run_eval", "lp_fx.tools.cli.export.export",
                 "lp_fx.tools.training.finetune.finetune"):
        monkeypatch.setattr(work, lambda *a, **k: pytest.fail("work began"))
    path, train, out = tmp_path / "plan.json", tmp_path / "train.txt", tmp_path / "out"
    path.write_text(json.dumps(plan))
    train.write_text(" ".join(WORDS * 20))
    args = {
        "eval": ["eval", *_common(model_dir, data_dir), "--tasks", "wikitext", "--pairs", str(path), "--out", str(out)],
        "export": ["export", "--model", str(model_dir), "--plan", str(path), "--out", str(out)],
        "finetune": ["finetune", *_common(model_dir, data_dir), "--plan", str(path), "--train-data", str(train),
                     "--out", str(out)],
    }[command]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"lp-fx {command}: error: plan file {path}: {message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "train.txt"]
    assert json.loads(path.read_text()) == plan


def _checkpoint_of(model: torch.nn.Module, directory: Path, pairs: list[list[int]]) -> Path:
    names = checkpoint.layer_parameter_names(model, "model.layers", [0, 1])
    tensors = checkpoint.unique_tensors(model, names)
    record = checkpoint.pairing_record(model, [tuple(p) for p in pairs], ["lp"] * len(pairs))
    checkpoint.save_checkpoint(directory, tensors, record, {"step": 0})
    return directory


def test_a_checkpoint_of_another_model_is_refused_before_the_baseline(
    refused_eval: Callable[..., str], tmp_path: Path
) -> None:
    other = _checkpoint_of(hf_model("llama", layers=6), tmp_path / "six_layers", [[0, 1]])
    err = refused_eval("--pairs", "0:2", "--checkpoint", str(other))
    assert "another model" in err and "6" in err and "4" in err


def test_a_checkpoint_whose_pairs_do_not_fit_the_model_is_refused_before_the_baseline(
    refused_eval: Callable[..., str], model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    bad = _checkpoint_of(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "ckpt", [[0, 1]])
    edited = json.loads((bad / checkpoint.PAIRING).read_text())
    edited["pairs"] = [[4, 5]]
    (bad / checkpoint.PAIRING).write_text(json.dumps(edited))
    err = refused_eval("--checkpoint", str(bad))
    assert "pair (4, 5) is out of range: the model has 4 layers, valid indices 0..3" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--window", "1000"], "window 1000: the text has 193 tokens"),
        (["--window", "100000"], "at most 2048 positions"),
        (["--tasks", ","], "no tasks given"),
        (["--pairs", "0:2", "--pairs", "0:2"], "'0:2' is given twice"),
        (["--split", "calib", "--window", "150"], "the calib half of 1 window of 150 tokens is empty"),
    ],
)
def test_windows_tasks_and_columns_that_cannot_be_measured_are_refused_before_the_baseline(
    refused_eval: Callable[..., str], extra: list[str], message: str
) -> None:
    assert message in refused_eval(*extra)


def test_a_refusal_creates_no_results_folder(
    model_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "new" / "eval.json"
    _refused(["eval", *_common(model_dir, data_dir), "--tasks", "wikitext", "--pairs", "4-5", "--out", str(out)], capsys)
    assert not (tmp_path / "new").exists()


def test_a_reason_given_on_several_lines_is_refused_on_one(
    model_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lp_fx.tools import models

    def tokenizer_error(*args: object, **kwargs: object) -> None:  # as transformers words a tokenizer it cannot build
        raise ValueError("Couldn't instantiate the backend tokenizer from one of: \n(1) a `tokenizers` library "
                         "serialization file, \n(2) a slow tokenizer instance to convert or \n\nYou need sentencepiece")

    monkeypatch.setattr(models, "load_model", tokenizer_error)
    err = _refused(["eval", *_common(model_dir, data_dir), "--tasks", "wikitext", "--out", str(tmp_path / "e.json")],
                   capsys)
    assert err == ("lp-fx eval: error: Couldn't instantiate the backend tokenizer from one of: (1) a `tokenizers` "
                   "library serialization file, (2) a slow tokenizer instance to convert or You need sentencepiece")


# ------------------------------------------------------------------------- the data directory (item 12)

REPO_DATA = (Path(lp_fx.__file__).resolve().parent.parent.parent / "shared" / "data").resolve()  # as found: links resolved


@pytest.mark.skipif(not REPO_DATA.is_dir(), reason="no ../shared/data next to this checkout")
def test_eval_finds_the_data_next_to_the_repository_from_any_working_directory(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(data.DATA_VARIABLE, raising=False)
    monkeypatch.chdir(tmp_path)
    assert data.resolve_data_dir(None) == REPO_DATA
    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(model_dir), "--tasks", "wikitext", "--window", "16", "--ppl-windows", "1",
            "--no-progress", "--out", str(out)]
    assert cli.main(args) == 0
    assert json.loads(out.read_text())["spec"]["data_dir"] == str(REPO_DATA)


def test_lp_fx_data_is_read_first(model_dir: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(data.DATA_VARIABLE, str(data_dir))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(model_dir), "--tasks", "wikitext", "--window", "16", "--no-progress", "--out", str(out)]
    assert cli.main(args) == 0
    assert json.loads(out.read_text())["spec"]["data_dir"] == str(data_dir)


def test_lp_fx_data_that_is_not_a_directory_is_named(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nowhere"
    monkeypatch.setenv(data.DATA_VARIABLE, str(missing))
    err = _refused(["eval", "--model", str(model_dir), "--tasks", "wikitext", "--out", str(tmp_path / "e.json")], capsys)
    assert f"LP_FX_DATA={missing}" in err and "not a directory" in err


# ------------------------------------------------------------------------------ third-party noise


def _stderr_of(*argv: str) -> str:
    """The standard error of ``python *argv``, which must succeed."""
    env = {k: v for k, v in os.environ.items() if k != "TORCH_LOGS"}
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_loading_a_model_as_the_demo_does_prints_no_import_noise(model_dir: Path) -> None:
    """The demo logs at INFO: torchao's "Failed to load …_C_mxfp8" lines and torch's pytree
    deprecation warnings (both logged when transformers imports torchao) must not show."""
    err = _stderr_of(
        "-c",
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        f"from lp_fx.tools.models import load_model; load_model({str(model_dir)!r})\n"
        "logging.getLogger('torchao').warning('a later torchao warning')\n"
    )
    assert not [line for line in err.splitlines() if any(noise in line for noise in NOISE)], err
    assert "a later torchao warning" in err  # only the import-time lines are dropped


def test_the_cli_run_as_a_module_prints_no_import_noise_even_verbose(model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    """transformers imports torchao, which logs "Failed to load ….so" lines on a CPU build; ``-v``
    (INFO) shows everything the default (WARNING) shows and more."""
    args = ["eval", *_common(model_dir, data_dir), "--tasks", "wikitext", "-v", "--out", str(tmp_path / "e.json")]
    err = _stderr_of("-m", "lp_fx.tools.cli", *args)
    assert not [line for line in err.splitlines() if any(noise in line for noise in NOISE)], err
