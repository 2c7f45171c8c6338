"""`lp-fx eval / plan / sweep` end to end on a tiny local HF model directory and tiny data files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lp_fx.tools import cli
from lp_fx.tools.planning import search as planner
from lp_fx.tools.cli import common as options


def _common(model_dir: Path, data_dir: Path) -> list[str]:
    return ["--model", str(model_dir), "--data-dir", str(data_dir), "--window", "16", "--no-progress"]


def test_plan_then_eval_with_the_plan(model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    assert cli.main(["plan", *_common(model_dir, data_dir), "--num-pairs", "1", "--calib-windows", "2",
                     "--screen-windows", "1", "--modes", "lp,block", "--passes", "1", "--out", str(plan)]) == 0
    saved = json.loads(plan.read_text())
    assert saved["num_layers"] == 4 and len(saved["pairs"]) == 1 and len(saved["candidates"]) == 6
    assert saved["modes"][0] in ("lp", "block") and saved["search"]["graphs_compiled"] == 1
    assert saved["search"]["race_margin"] == planner.RACE_MARGIN
    calib = saved["calibration"]
    assert (calib["windows"], calib["screen_windows"]) == (2, 1)
    assert calib["plan_ppl"] == pytest.approx(calib["plan_ppl_plain"], rel=1e-5)
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


def test_eval_with_fuse_measures_what_the_unfused_pairing_does(model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    results = {}
    for fuse in ([], ["--fuse"]):
        out = tmp_path / f"eval{len(fuse)}.json"
        args = ["eval", *_common(model_dir, data_dir), "--tasks", "wikitext", "--pairs", "0:4", *fuse, "--out", str(out)]
        assert cli.main(args) == 0
        results[bool(fuse)] = json.loads(out.read_text())
    assert results[True]["fuse"] and not results[False]["fuse"]
    ppl = {fuse: [p["results"]["wikitext"]["ppl"] for p in r["pairings"]] for fuse, r in results.items()}
    assert ppl[True] == pytest.approx(ppl[False], rel=1e-5)
    assert ppl[True][1] != pytest.approx(ppl[True][0])  # the pairing did something


def _sweep(model_dir: Path, data_dir: Path, tmp_path: Path, *options: str) -> dict:
    """``lp-fx sweep`` on the tiny model with ``options``; its JSON, after checking the PNG."""
    out, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    args = ["sweep", *_common(model_dir, data_dir), "--ppl-windows", "2", *options,
            "--out", str(out), "--plot", str(plot)]
    assert cli.main(args) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads(out.read_text())


def _ppl(results: dict) -> float:
    return results["wikitext"]["ppl"]


def test_sweep_writes_json_and_plot(model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    rows = _sweep(model_dir, data_dir, tmp_path, "--starts", "1")["rows"]
    assert [(r["transform"], r["start"], r["delta"], r["effective_depth"]) for r in rows] == [("lp", 1, 2, 3)]


def test_sweep_of_every_transform_in_one_json_and_table(
    model_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    result = _sweep(model_dir, data_dir, tmp_path, "--transforms", "lp,block,prune,merge,shuffle",
                    "--starts", "0", "--deltas", "4", "--seeds", "2")
    rows = result["rows"]
    assert [r["transform"] for r in rows] == ["lp", "block", "prune", "merge", "shuffle", "shuffle"]
    assert all((r["start"], r["end"], r["quantize"]) == (0, 4, "fp32") for r in rows)
    assert [r["effective_depth"] for r in rows] == [2, 2, 2, 2, 4, 4]
    shuffles = rows[4:]
    assert len({r["seed"] for r in shuffles}) == 2 and all(sorted(r["order"]) == [0, 1, 2, 3] for r in shuffles)
    assert len({tuple(r["order"]) for r in shuffles}) == 2
    baseline = _ppl(result["baselines"]["fp32"])
    assert all(_ppl(r["results"]) != pytest.approx(baseline) for r in rows)  # each transform did something
    table = capsys.readouterr().out
    assert "| start | Δ | L − Δ/2 | lp | block | prune | merge | shuffle |" in table
    assert "| 0 | 4 | 2 |" in table


def _int8_or_skip() -> None:
    """Skip when torchao cannot quantize a linear on this machine (its CPU kernels are optional)."""
    import torch

    try:
        from lp_fx.tools.models import quantize_weights

        quantize_weights(torch.nn.Sequential(torch.nn.Linear(64, 64)), "int8")
    except Exception as error:  # noqa: BLE001 - any failure means int8 cannot be measured here
        pytest.skip(f"torchao int8 weight-only quantization does not run on this CPU: {error}")


def test_eval_with_int8_weights_records_it(model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    _int8_or_skip()
    ppl = {}
    for precision in ("fp32", "int8"):
        out = tmp_path / f"{precision}.json"
        args = ["eval", *_common(model_dir, data_dir), "--tasks", "wikitext", "--pairs", "1:3",
                "--quantize", precision, "--out", str(out)]
        assert cli.main(args) == 0
        saved = json.loads(out.read_text())
        assert saved["quantize"] == precision
        ppl[precision] = [_ppl(p["results"]) for p in saved["pairings"]]
    assert ppl["int8"] != pytest.approx(ppl["fp32"], rel=1e-6)  # the weights really changed


def test_sweep_fp32_and_int8_in_one_run(
    model_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _int8_or_skip()
    result = _sweep(model_dir, data_dir, tmp_path, "--transforms", "lp,merge", "--starts", "1",
                    "--quantize", "int8,fp32")
    assert result["quantize"] == ["fp32", "int8"]  # fp32 first: quantizing is one-way
    rows = [(r["transform"], r["quantize"]) for r in result["rows"]]
    assert rows == [("lp", "fp32"), ("merge", "fp32"), ("lp", "int8")]
    assert _ppl(result["baselines"]["int8"]) != pytest.approx(_ppl(result["baselines"]["fp32"]), rel=1e-6)
    assert result["skipped"][0]["transform"] == "merge" and result["skipped"][0]["quantize"] == "int8"
    out = capsys.readouterr().out
    assert "left out: merge with int8 weights" in out and "| lp | merge | lp int8 |" in out


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["sweep", "--transforms", "lp,foo"], "valid transforms: lp, block, prune, merge, shuffle"),
        (["sweep", "--quantize", "fp16"], "expected a comma-separated list of fp32, int8"),
        (["sweep", "--transforms", "shuffle", "--seeds", "0"], "argument --seeds: 0 is not valid; give an integer >= 1"),
        (["eval", "--checkpoint", "ckpt", "--quantize", "int8"],
         "--checkpoint cannot be combined with --quantize int8"),
    ],
)
def test_bad_transforms_seeds_or_quantize_are_errors_before_the_work(
    model_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
    command: list[str], expected: str,
) -> None:
    monkeypatch.setattr(options, "load", lambda args: pytest.fail("the model was loaded before the options were checked"))
    code = cli.main([*command, *_common(model_dir, data_dir), "--out", str(tmp_path / "out.json")])
    assert code == 2
    assert expected in capsys.readouterr().err


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
    code = cli.main(["eval", *_common(model_dir, data_dir), "--tasks", "wikitext", "--pairs", "1:4",
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
    monkeypatch.setattr(options, "load", lambda args: pytest.fail("the model was loaded before the destination was checked"))
    for command in (["eval", "--tasks", "wikitext"], ["sweep"], ["plan", "--num-pairs", "1"]):
        code = cli.main([*command, *_common(model_dir, data_dir), "--out", str(blocker / "out.json")])
        assert code == 2
        assert f"cannot write to {blocker}" in capsys.readouterr().err
