"""``lp-fx gpu-check``'s smallest path on a tiny model, on the CPU: what the device run does, so that it
cannot rot before a GPU is lent (the device run itself: scripts/gpu_check.sh, docs/tools/gpu_check.md)."""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from lp_fx.tools import cli
from lp_fx.tools.device_check import phases, report
from lp_fx.tools.device_check.options import FULL, QUICK, CheckOptions
from tests.helpers.bpe import bpe_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, bpe_dir) -> Path:
    """A local Hugging Face folder of a 2-layer tiny model with a byte-level BPE tokenizer (llama.cpp
    reads its export): every compile of the run is of the smallest model that has a pair."""
    path = tmp_path_factory.mktemp("two_layers")
    for item in bpe_dir.iterdir():
        shutil.copy(item, path)
    bpe_model(layers=2).save_pretrained(path)
    return path


def _argv(model_dir: Path, data_dir: Path, out: Path, plan: Path | str, *more: str) -> list[str]:
    """The smallest run: --quick (fp32 on a CPU, batch 1), tiny windows and generations, the eager
    inner compiler (Inductor is the device run's)."""
    return ["gpu-check", "--model", str(model_dir), "--data-dir", str(data_dir), "--out", str(out), "--device", "cpu",
            "--start", "0", "--end", "2", "--plan", str(plan), "--window", "16", "--windows", "2", "--tokens", "2",
            "--rounds", "1", "--inner", "eager", "--quick", *more]


@pytest.fixture
def plan(tmp_path: Path) -> Path:
    """A plan for the 2-layer model, its pair in a mode of its own."""
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"version": 1, "num_layers": 2, "pairs": [[0, 1]], "modes": ["block"]}))
    return path


def test_each_phase_writes_the_json_and_table_with_figures_that_match_the_eager_reference(
    model_dir, data_dir, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    written = []
    write = report.write_outputs

    def record_each_write(folder, record):
        write(folder, record)
        written.append([phase["name"] for phase in json.loads((out / report.JSON_NAME).read_text())["phases"]])
        assert (out / report.TABLE_NAME).read_text().count("| load | ok |") == 1

    monkeypatch.setattr(report, "write_outputs", record_each_write)
    assert cli.main(_argv(model_dir, data_dir, out, "none")) == 0
    after_load = [["load"]] * 4  # and after each of the three correctness rows
    correct = ["load", "correctness fp32"]
    assert written == [*after_load, correct, [*correct, "speed fp32 batch 1"], [*correct, "speed fp32 batch 1", "llama.cpp"]]
    record = json.loads((out / report.JSON_NAME).read_text())
    rows = record["correctness"]
    assert [row["pairing"] for row in rows] == ["baseline", "lp 0:2", "block 0:2"]
    assert all(row["ok"] and row["relative_diff"] < 1e-5 and abs(row["ppl_relative_diff"]) < 1e-5 for row in rows)
    assert len({round(row["ppl_eager"], 6) for row in rows}) == 3  # three pairings, three models
    (speed,) = record["speed"]
    assert speed["batch"] == 1 and list(speed["ratio"]) == ["paired", "paired + fuse"]
    assert speed["shared_options"] == {"cudagraphs": False}  # the unpaired row went through the backend too
    assert all(len(runs) == 1 for runs in speed["tokens_per_s"].values())
    ((before, after),) = speed["gemms_per_graph"]["paired + fuse"]  # the decode graph
    assert before - after == 14 - 4  # the pair's 14 GEMMs -> 4
    llamacpp = record["phases"][-1]["status"]
    if not llama_cpp_importable():
        assert llamacpp.startswith("skipped: llama_cpp")
    else:
        assert llamacpp == "ok" and record["llamacpp"]["layers"] == [2, 1]
    table = (out / report.TABLE_NAME).read_text()
    assert "| fp32 | block 0:2 |" in table and "| fp32 | 1 | no | paired + fuse |" in table
    assert f"{record['ideal']:.3f}" in table and record["ideal"] == 2 / 1


def test_a_reference_that_is_not_the_pairing_is_caught(model_dir, data_dir, plan, tmp_path, monkeypatch):
    """The figures are real: against a reference that leaves the layers unpaired, every paired row
    fails (the unpaired row still passes), and the command exits 1 naming the phase."""
    out = tmp_path / "out"
    monkeypatch.setattr(phases, "eager_pairing", lambda model, pairs, modes: contextlib.nullcontext(model))
    monkeypatch.setattr(phases, "speed", lambda run, dtype, batch: None)
    with pytest.raises(SystemExit) as exit_:
        cli.main(_argv(model_dir, data_dir, out, plan, "--no-llamacpp"))
    assert str(exit_.value) == f"lp-fx gpu-check: phases failed: correctness fp32 (see {out / report.JSON_NAME})"
    record = json.loads((out / report.JSON_NAME).read_text())
    assert [row["ok"] for row in record["correctness"]] == [True, False, False, False]
    assert record["phases"][1]["status"].startswith("failed: CheckFailed: lp 0:2, block 0:2, plan:")
    assert record["phases"][-1]["status"] == "skipped: --no-llamacpp"
    assert "**NO**" in (out / report.TABLE_NAME).read_text()


def test_a_plan_for_another_model_is_refused_before_anything_is_written(model_dir, data_dir, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"version": 1, "num_layers": 30, "pairs": [[14, 15]]}))
    out = tmp_path / "out"
    assert cli.main(_argv(model_dir, data_dir, out, plan)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lp-fx gpu-check: error:") and "30 layers" in err[0]
    assert not out.exists()


@pytest.mark.parametrize(("device", "first", "other"), [("cpu", "fp32", "bf16"), ("cuda", "bf16", "fp32")])
def test_the_full_run_times_the_first_dtype_at_batch_1_and_8_and_checks_the_other_after(device, first, other):
    """bf16 is the GPU's serving dtype, fp32 a CPU's (most have no bf16 units); what --quick leaves out
    is the second dtype and batch 8, and what it shortens only its sizes, given values winning."""
    import torch

    def names(options: CheckOptions) -> list[str]:
        run = phases.Run("model", options, torch.device(device), record={})
        return [name for name, _ in phases.phases(run)]

    assert names(CheckOptions()) == [f"correctness {first}", f"speed {first} batch 1", f"speed {first} batch 8",
                                     f"correctness {other}", "llama.cpp"]
    assert names(CheckOptions(quick=True)) == [f"correctness {first}", f"speed {first} batch 1", "llama.cpp"]
    assert names(CheckOptions(dtypes=("fp32",)))[:2] == ["correctness fp32", "speed fp32 batch 1"]
    assert CheckOptions(quick=True, rounds=7).sizes() == replace(QUICK, rounds=7)
    assert CheckOptions().sizes() == FULL and FULL.windows > QUICK.windows and FULL.tokens > QUICK.tokens


def llama_cpp_importable() -> bool:
    """As the phase decides: by importing it (a package that is found but fails to import is skipped too)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True
