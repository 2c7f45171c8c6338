"""``lp-fx gpu-check``'s smallest path on a tiny model, on the CPU: what the device run does, so that it
cannot rot before a GPU is lent (the device run itself: scripts/gpu_check.sh, docs/gpu_check.md)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from lp_fx.tools import cli, gpu_check


def _argv(model_dir: Path, data_dir: Path, out: Path, plan: Path | str, *more: str) -> list[str]:
    """The smallest run: fp32 only, batch 1, the eager inner compiler (Inductor is the device run's)."""
    return ["gpu-check", "--model", str(model_dir), "--data-dir", str(data_dir), "--out", str(out), "--device", "cpu",
            "--start", "0", "--end", "4", "--plan", str(plan), "--window", "16", "--windows", "2", "--tokens", "2",
            "--rounds", "1", "--inner", "eager", "--dtypes", "fp32", "--quick", *more]


@pytest.fixture
def plan(tmp_path: Path) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"version": 1, "num_layers": 4, "pairs": [[0, 1], [2, 3]], "modes": ["block", "lp"]}))
    return path


def test_each_phase_writes_the_json_and_table_with_figures_that_match_the_eager_reference(
    model_dir, data_dir, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    written = []
    write = gpu_check.write_outputs

    def record_each_write(run):
        write(run)
        written.append([phase["name"] for phase in json.loads((out / gpu_check.JSON_NAME).read_text())["phases"]])
        assert (out / gpu_check.TABLE_NAME).read_text().count("| load | ok |") == 1

    monkeypatch.setattr(gpu_check, "write_outputs", record_each_write)
    assert cli.main(_argv(model_dir, data_dir, out, "none")) == 0
    after_load = [["load"]] * 4  # and after each of the three correctness rows
    assert written == [*after_load, ["load", "correctness fp32"], ["load", "correctness fp32", "speed fp32 batch 1"]]
    record = json.loads((out / gpu_check.JSON_NAME).read_text())
    rows = record["correctness"]
    assert [row["pairing"] for row in rows] == ["baseline", "lp 0:4", "block 0:4"]
    assert all(row["ok"] and row["relative_diff"] < 1e-5 and abs(row["ppl_relative_diff"]) < 1e-5 for row in rows)
    assert len({round(row["ppl_eager"], 6) for row in rows}) == 3  # three pairings, three models
    (speed,) = record["speed"]
    assert speed["batch"] == 1 and list(speed["ratio"]) == ["paired", "paired + fuse"]
    assert all(len(runs) == 1 for runs in speed["tokens_per_s"].values())
    ((before, after),) = speed["gemms_per_graph"]["paired + fuse"]  # the decode graph
    assert before - after == 2 * (14 - 4)  # two pairs, each 14 GEMMs -> 4
    table = (out / gpu_check.TABLE_NAME).read_text()
    assert "| fp32 | block 0:4 |" in table and "| fp32 | 1 | no | paired + fuse |" in table and f"{record['ideal']:.3f}" in table


def test_a_reference_that_is_not_the_pairing_is_caught(model_dir, data_dir, plan, tmp_path, monkeypatch, capsys):
    """The figures are real: against a reference that leaves the layers unpaired, every paired row
    fails (the unpaired row still passes), and the command exits 1 naming the phase."""
    out = tmp_path / "out"
    monkeypatch.setattr(gpu_check, "eager_pairing", lambda model, pairs, mode: contextlib.nullcontext(model))
    monkeypatch.setattr(gpu_check, "speed", lambda run, dtype, batch: None)
    with pytest.raises(SystemExit, match="phases failed: correctness fp32"):
        cli.main(_argv(model_dir, data_dir, out, plan))
    record = json.loads((out / gpu_check.JSON_NAME).read_text())
    assert [row["ok"] for row in record["correctness"]] == [True, False, False, False]
    assert record["phases"][1]["status"].startswith("failed: CheckFailed: lp 0:4, block 0:4, plan:")
    assert "**NO**" in (out / gpu_check.TABLE_NAME).read_text()


def test_a_plan_for_another_model_is_refused_before_anything_is_written(model_dir, data_dir, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"version": 1, "num_layers": 30, "pairs": [[14, 15]]}))
    out = tmp_path / "out"
    assert cli.main(_argv(model_dir, data_dir, out, plan)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lp-fx gpu-check: error:") and "30 layers" in err[0]
    assert not out.exists()
