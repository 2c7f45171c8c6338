"""`lp-fx eval / plan / sweep` end to end on a tiny local HF model directory and tiny data files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lp_fx.tools import cli

from .conftest import WORDS

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
    code = cli.main(["eval", *_common(model_dir, data_dir), "--tasks", "wikitext", "--pairs", str(plan),
                     "--out", str(tmp_path / "eval.json")])
    assert code == 2
    assert "30 layers" in capsys.readouterr().err


def test_missing_data_dir_is_named(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "no_data"
    code = cli.main(["eval", "--model", str(model_dir), "--data-dir", str(missing), "--tasks", "wikitext",
                     "--out", str(tmp_path / "eval.json")])
    assert code == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "wiki.test.raw" in err


def test_bad_pairing_spec_is_an_error(
    model_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = cli.main(["eval", *_common(model_dir, data_dir), "--tasks", "wikitext", "--pairs", "3:6",
                     "--out", str(tmp_path / "eval.json")])
    assert code == 2
    assert "odd" in capsys.readouterr().err


def test_results_go_into_new_folders_which_are_created(model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "new" / "folder" / "eval.json"
    assert cli.main(["eval", *_common(model_dir, data_dir), "--tasks", "wikitext", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["pairings"][0]["name"] == "baseline"


def test_unwritable_destination_fails_before_the_work(
    model_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("the model was loaded before the destination was checked"))
    for command in (["eval", "--tasks", "wikitext"], ["sweep"], ["plan", "--num-pairs", "1"]):
        code = cli.main([*command, *_common(model_dir, data_dir), "--out", str(blocker / "out.json")])
        assert code == 2
        assert f"cannot write to {blocker}" in capsys.readouterr().err


def test_cli_output_has_no_import_noise(model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    """transformers imports torchao, which logs "Failed to load ….so" lines on a CPU build."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "lp_fx.tools.cli", "eval", *_common(model_dir, data_dir), "--tasks", "wikitext",
         "--out", str(tmp_path / "eval.json")],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "Failed to load" not in done.stderr and "register_constant" not in done.stderr
