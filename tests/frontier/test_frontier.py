"""``lp-fx frontier``: budgets, one gated scorer for every plan, JSON after every point, resume, table, plot."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lp_fx.tools import cli, models
from lp_fx.tools.evaluation import scoring as evaluate
from lp_fx.tools.evaluation.compiled import eager_logits
from lp_fx.tools.frontier import run as frontier
from lp_fx.tools.frontier import report as frontier_report
from lp_fx.tools.cli import frontier as frontier_command
from lp_fx.tools.frontier import speed as frontier_speed
from lp_fx.tools.planning import scorers as plan_scorers
from lp_fx.tools.frontier import gated, points, results
from lp_fx.tools.frontier.options import FrontierOptions
from lp_fx.pairing import Pairing
from lp_fx.model_identity import model_identity
from lp_fx.tools.planning.options import SearchOptions

from tests.helpers.words import WORDS
from tests.helpers.models import hf_model
from tests.helpers.bpe import PAIRS, bpe_model
from tests.helpers.reference import eager_pairing


@pytest.fixture(scope="module")
def six_layers(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's tokenizer with a 6-layer model: two pairs leave the planner a choice."""
    path = tmp_path_factory.mktemp("six_layers")
    shutil.copytree(model_dir, path, dirs_exist_ok=True)
    hf_model("llama", layers=6).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def frontier_data(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny data plus what the frontier also reads: LAMBADA passages and a training text."""
    path = tmp_path_factory.mktemp("frontier_data")
    shutil.copytree(data_dir, path, dirs_exist_ok=True)
    (path / "lambada").mkdir()
    rows = [{"context": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(12)), "continuation": "dog"}
            for i in range(16)]
    (path / "lambada" / "lambada_openai.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (path / "wikitext-2").mkdir()
    (path / "wikitext-2" / "train.txt").write_text(" ".join(WORDS[(i * 5) % len(WORDS)] for i in range(4000)) + " .\n")
    return path


def _args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["frontier", "--model", str(model_dir), "--data-dir", str(data), "--window", "16", "--no-progress",
            "--inner", "eager",
            "--ppl-windows", "2", "--calib-windows", "2", "--screen-windows", "1", "--plan-modes", "lp",
            "--contiguous-start", "0", "--speed-inner", "eager", "--speed-tokens", "3", "--speed-rounds", "1",
            "--out", str(out), *extra]


def _points(out: Path) -> list[tuple[str, int]]:
    return [(p["variant"], p["delta"]) for p in json.loads(out.read_text())["points"]]


def test_frontier_measures_every_variant_and_writes_table_and_plot(
    six_layers: Path, frontier_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "frontier.json"
    args = _args(six_layers, frontier_data, out, "--budgets", "4", "--tasks", "winogrande", "--limit", "3",
                 "--finetune-steps", "1", "--finetune-train", "all")
    assert cli.main(args) == 0
    result = json.loads(out.read_text())
    assert _points(out) == [("baseline", 0), ("contiguous", 4), ("planned", 4), ("finetuned", 4)]
    base, contiguous, planned, finetuned = result["points"]
    assert contiguous["pairing"]["pairs"] == [[0, 1], [2, 3]] and contiguous["ideal_speedup"] == pytest.approx(1.5)
    assert len(planned["pairing"]["pairs"]) == 2 and planned["backend_options"]["plan"].endswith("delta_4.json")
    for point in (contiguous, planned):
        assert set(point["speed"]["ratio"]) == {"paired", "paired + fuse"}
        assert set(point["speed"]["tokens_per_s"]) == {"unpaired", "paired", "paired + fuse", "pruned"}
        assert point["speed"]["ideal_measured"] > 0 and "layer_share" in point["speed"]
    # the budget's two pairings were timed in one run, against one unpaired copy
    assert contiguous["speed"]["tokens_per_s"]["unpaired"] == planned["speed"]["tokens_per_s"]["unpaired"]
    assert contiguous["speed"]["timed_with"] == [planned["pairing"]["name"]]
    assert planned["speed"]["timed_with"] == [contiguous["pairing"]["name"]]
    assert contiguous["tasks"]["winogrande"]["n"] == 3 and "acc_stderr" in contiguous["tasks"]["winogrande"]
    assert finetuned["finetune"]["args"]["steps"] == 1 and finetuned["speed"]["measured_for"] == "planned"
    assert finetuned["finetune"]["args"]["train"] == "all" and result["options"]["finetune_train"] == "all"
    assert finetuned["finetune"]["args"]["inner"] == "eager"  # trained through the run's --inner compiler
    assert finetuned["pairing"]["pairs"] == planned["pairing"]["pairs"]
    assert finetuned["ppl"]["wikitext"]["ppl"] != planned["ppl"]["wikitext"]["ppl"]  # it trained
    calib = result["plans"]["4"]["calibration"]
    assert calib["plan_ppl_plain"] == pytest.approx(calib["plan_ppl"], rel=1e-3)  # gated graph = plain compile
    _check_against_eager_references(six_layers, frontier_data, result, [base, contiguous, planned])
    assert base["ppl"]["wikitext"]["windows"] == 2 and base["ppl"]["lambada_text"]["windows"] == 2
    table = out.with_suffix(".md").read_text()
    assert table.count("\n") == 2 + 4 and "| 4 | 4 | 1.500× | planned |" in table and "±" in table
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _check_against_eager_references(model_dir: Path, data: Path, result: dict, points: list[dict]) -> None:
    """The perplexities of points scored on the gated graph equal each pairing's eager reference."""
    loaded = models.load_model(str(model_dir), progress=False)
    runner = frontier.Frontier(loaded.model, loaded.tokenizer, loaded.name, data, FrontierOptions.from_json(result["options"]),
                               Path("unused.json"), result, progress=False)
    for point in points:
        pairing = Pairing("eager", tuple(map(tuple, point["pairing"]["pairs"])), tuple(point["pairing"].get("modes", ())))
        for text, windows in runner.windows.items():
            assert point["ppl"][text]["ppl"] == pytest.approx(_eager_ppl(loaded.model, pairing, windows), rel=1e-5), \
                (point["variant"], text)
        check = point["ppl_check"]
        assert check["windows"] == "calib" and check["gated_ppl"] == pytest.approx(check["plain_ppl"], rel=1e-5)
        assert point["seconds"] >= check["seconds"] > 0  # a point's time counts its scoring on the gated graph


def _eager_ppl(model: torch.nn.Module, pairing: Pairing, windows: torch.Tensor) -> float:
    """The perplexity of ``pairing`` run eagerly (:func:`eager_pairing`, no compile)."""
    with eager_pairing(model, pairing.pairs, pairing.modes_or("lp")):
        return evaluate.perplexity(eager_logits(model), windows, progress=False).ppl


def test_json_after_every_point_resume_measures_the_rest_and_one_gated_graph_plans_every_budget(
    six_layers: Path, frontier_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scorers = []
    original = plan_scorers.GatedScorer.__init__
    monkeypatch.setattr(plan_scorers.GatedScorer, "__init__", lambda self, *a, **k: scorers.append(self) or original(self, *a, **k))
    timed = []  # the pairings of each speed run (real timing is checked in the test above)

    class Bench:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def measure(self, model, pairings):
            timed.append([pairing.name for pairing, _ in pairings])
            return [{"speed": {"ratio": {"paired": 1.0, "paired + fuse": 1.0}}} for _ in pairings]

    monkeypatch.setattr(frontier_command, "SpeedBench", Bench)
    windows_kept, forgotten = [], []  # after a window's scoring: how many windows' values are kept
    window_nll, forget = plan_scorers.GatedScorer.window_nll, plan_scorers.GatedScorer.forget

    def counting(self, pairing, window):
        nll = window_nll(self, pairing, window)
        if forgotten:
            windows_kept.append(len({entry[0] for graph in self.graphs for entry in graph.known}))
        return nll

    monkeypatch.setattr(plan_scorers.GatedScorer, "window_nll", counting)
    monkeypatch.setattr(plan_scorers.GatedScorer, "forget", lambda self: forgotten.append(1) or forget(self))
    out = tmp_path / "run.json"
    args = _args(six_layers, frontier_data, out, "--budgets", "2,4", "--tasks", "none", "--finetune-steps", "0")
    measure, calls = frontier.Frontier.measure, []

    def interrupted(self, variant, delta):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append((variant, delta))
        return measure(self, variant, delta)

    monkeypatch.setattr(frontier.Frontier, "measure", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.main(args)
    result = json.loads(out.read_text())
    assert _points(out) == calls == [("baseline", 0), ("contiguous", 2)]
    assert timed == [["0:2", "planned Δ=2"]]  # the budget's two pairings in one speed run
    assert len(scorers) == 1 and [run["graphs_compiled"] for run in result["planner"]] == [1]  # both budgets from one gated graph
    assert windows_kept and max(windows_kept) == 1  # the perplexities keep one window's values at a time
    assert [len(result["plans"][delta]["pairs"]) for delta in ("2", "4")] == [1, 2]
    assert cli.main(args) == 2  # the file is there: neither resumed nor overwritten silently
    calls.clear()
    monkeypatch.setattr(frontier.Frontier, "measure", lambda self, v, d: calls.append((v, d)) or measure(self, v, d))
    assert cli.main([*args, "--resume"]) == 0
    assert calls == [("planned", 2), ("contiguous", 4), ("planned", 4)]
    assert len(json.loads(out.read_text())["planner"]) == 1  # the plans were kept, not made again
    assert len(scorers) == 2  # the resumed run's perplexities: a gated graph again, planning nothing
    assert _points(out) == [("baseline", 0), ("contiguous", 2), ("planned", 2), ("contiguous", 4), ("planned", 4)]
    # the interruption lost the planned Δ=2 speed timed beside contiguous Δ=2: it was timed again, alone
    assert timed == [["0:2", "planned Δ=2"], ["planned Δ=2"], ["0:4", "planned Δ=4"]]


def test_pairings_the_gated_graph_does_not_gate_are_scored_by_their_plain_compile(
    six_layers: Path, frontier_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "block.json"  # contiguous pairs are lp; a graph gating only block cannot score them
    assert cli.main(_args(six_layers, frontier_data, out, "--plan-modes", "block", "--budgets", "2", "--tasks", "none",
                          "--finetune-steps", "0", "--speed-rounds", "0")) == 0
    base, contiguous, planned = json.loads(out.read_text())["points"]
    assert "ppl_check" in base and "ppl_check" in planned and "ppl_check" not in contiguous
    _check_against_eager_references(six_layers, frontier_data, json.loads(out.read_text()), [base, planned])
    loaded = models.load_model(str(six_layers), progress=False)
    windows = evaluate.wikitext_windows(loaded.tokenizer, frontier_data, 16, "heldout", 2, "wikitext")
    assert contiguous["ppl"]["wikitext"]["ppl"] == pytest.approx(
        _eager_ppl(loaded.model, Pairing.contiguous(0, 0 + 2, "lp"), windows), rel=1e-5)


def test_a_gated_graph_that_disagrees_with_the_plain_compile_stops_the_run() -> None:
    assert gated.check_gated("0:2", 10.0, 10.005) == {"windows": "calib", "gated_ppl": 10.0, "plain_ppl": 10.005}
    with pytest.raises(ValueError, match=r"0:2: the gated graph's calibration perplexity, 10.0000, differs from the "
                                         r"plain compile's, 10.1000, by more than 0.1%"):
        gated.check_gated("0:2", 10.0, 10.1)


def test_resume_refuses_a_json_made_with_other_options(
    six_layers: Path, frontier_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run.json"
    options = FrontierOptions(model=six_layers.name, num_layers=6, contiguous_start=0, window=16, ppl_windows=3)
    out.write_text(json.dumps(results.new_result(options, model_identity(hf_model("llama", layers=6)))))
    args = _args(six_layers, frontier_data, out, "--budgets", "2", "--tasks", "none", "--resume")
    assert cli.main(args) == 2
    error = capsys.readouterr().err
    assert "made with other options" in error and "ppl_windows: 3 -> 2" in error and "speed_rounds: 5 -> 1" in error
    assert json.loads(out.read_text())["points"] == []  # untouched


@pytest.mark.parametrize(("budgets", "message"), [
    ([3], "Δ=3 is not valid.*even Δ from 2 to 30"),
    ([0], "Δ=0 is not valid"),
    ([32], "Δ=32 is more than the model's 30 layers"),
    ([2, 18], r"contiguous range 14:32 ends past the model's 30 layers; from start 14 Δ may be at most 16"),
    ([4, 4], "Δ=4 is given more than once"),
    ([], "no budgets given"),
])
def test_budgets_are_checked_with_clear_errors(budgets: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        points.check_budgets(budgets, 30, 14)


def test_budgets_sorted_and_the_ideal_speedup_is_depth_over_effective_depth() -> None:
    assert points.check_budgets([14, 2, 8], 30, 14) == (2, 8, 14)
    assert frontier.ideal_speedup(30, 14) == pytest.approx(30 / 23)
    assert Pairing.contiguous(14, 14 + 4, "lp").pairs == ((14, 15), (16, 17))
    assert frontier.point_keys([2], frontier.check_variants(None, 0)) == [("baseline", 0), ("contiguous", 2), ("planned", 2)]


def test_variants_default_to_every_curve_and_a_chosen_few_keep_the_baseline() -> None:
    assert frontier.check_variants(None, 5) == ("contiguous", "planned", "finetuned")
    assert frontier.check_variants(("finetuned", "planned"), 5) == ("planned", "finetuned")
    assert frontier.point_keys([8, 14], ("finetuned",)) == [("baseline", 0), ("finetuned", 8), ("finetuned", 14)]
    with pytest.raises(ValueError, match="'tuned': give some of contiguous, planned, finetuned"):
        frontier.check_variants(("tuned",), 5)
    with pytest.raises(ValueError, match="needs fine-tuning steps"):
        frontier.check_variants(("finetuned",), 0)


def test_cli_refuses_bad_budgets_and_tasks_before_any_work(
    six_layers: Path, frontier_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "x.json"
    assert cli.main(_args(six_layers, frontier_data, out, "--budgets", "8")) == 2
    assert "Δ=8 is more than the model's 6 layers" in capsys.readouterr().err
    assert cli.main(_args(six_layers, frontier_data, out, "--tasks", "arc_easy,nope")) == 2
    assert "unknown 'nope'" in capsys.readouterr().err
    assert cli.main(_args(six_layers, frontier_data, out, "--budgets", "2,x")) == 2
    assert cli.main(_args(six_layers, frontier_data, out, "--variants", "finetuned", "--finetune-steps", "0")) == 2
    assert "needs fine-tuning steps" in capsys.readouterr().err
    assert not out.exists()


def test_a_record_made_before_an_option_existed_resumes_with_its_default(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    options = FrontierOptions(model="tiny", num_layers=6, contiguous_start=0, finetune_steps=100)
    old = results.new_result(options, TINY)
    del old["options"]["finetune_train"]  # written before --finetune-train existed: it trained the paired layers
    out.write_text(json.dumps(old))
    assert results.resume_result(out, options, TINY)["options"] == old["options"]
    with pytest.raises(ValueError, match="finetune_train: 'paired' -> 'all'"):
        results.resume_result(out, FrontierOptions(model="tiny", num_layers=6, contiguous_start=0, finetune_steps=100,
                                                    finetune_train="all"), TINY)


TINY = {"class": "LlamaForCausalLM", "weights": "0123456789abcdef"}  # an identity, as model_identity gives one


def _options_of_args(model: Path) -> FrontierOptions:
    """The options ``_args(model, ...) + --budgets 2 --tasks none`` runs with."""
    return FrontierOptions(
        model=model.name, num_layers=6, contiguous_start=0, window=16, ppl_windows=2, tasks=(), inner="eager",
        search=SearchOptions(modes=("lp",), calib_windows=2, screen_windows=1), finetune_steps=100, speed_inner="eager",
        speed_tokens=3, speed_rounds=1,
    )


def test_resume_refuses_another_model_under_the_same_folder_name_naming_both(
    six_layers: Path, frontier_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    other = tmp_path / "b" / six_layers.name  # b/model against a/model: the same config and name, other weights
    shutil.copytree(six_layers, other)
    torch.manual_seed(1)
    model = hf_model("llama", layers=6)
    type(model)(model.config).save_pretrained(other)
    out = tmp_path / "run.json"
    measured_on = model_identity(model)
    out.write_text(json.dumps(results.new_result(_options_of_args(six_layers), measured_on)))
    files = out.read_bytes()
    capsys.readouterr()  # the model's saving
    assert cli.main(_args(other, frontier_data, out, "--budgets", "2", "--tasks", "none", "--resume")) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    assert f"was measured on another model (LlamaForCausalLM with weights {measured_on['weights']}), this one is a " \
           "LlamaForCausalLM with weights " in error and "resume with the model it was measured on" in error
    assert out.read_bytes() == files and sorted(p.name for p in tmp_path.iterdir()) == ["b", "run.json"]


def test_a_record_made_before_the_model_identity_resumes_with_a_warning_and_records_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run.json"
    options = FrontierOptions(model="tiny", num_layers=6, contiguous_start=0)
    old = results.new_result(options, TINY)
    del old["model_identity"]
    out.write_text(json.dumps(old))
    assert results.resume_result(out, options, TINY)["model_identity"] == TINY
    assert "does not record the identity of its model" in caplog.text


def _point(variant: str, delta: int, ppl: float, acc: float | None, fuse: float | None) -> dict:
    point = {"variant": variant, "delta": delta, "effective_depth": 30 - delta // 2,
             "ideal_speedup": frontier.ideal_speedup(30, delta), "pairing": {"pairs": [[14, 15]] * (delta // 2)},
             "ppl": {"wikitext": {"ppl": ppl}, "lambada_text": {"ppl": 2 * ppl}}}
    if acc is not None:
        point["tasks"] = {"piqa": {"acc": acc, "acc_stderr": 0.02, "n": 500}}
    if fuse is not None:
        point["speed"] = {"ratio": {"paired": 1.0, "paired + fuse": fuse}, "ideal_measured": 1.2}
    return point


def test_table_gives_ratios_retention_with_its_error_and_the_ideal(tmp_path: Path) -> None:
    result = {"points": [_point("baseline", 0, 30.0, 0.5, None), _point("contiguous", 14, 60.0, 0.45, 1.25)]}
    table = frontier_report.frontier_table(result)
    row = table.splitlines()[-1]
    assert "| 14 | 23 | 1.304× | contiguous |" in row and "60.00 (×2.000)" in row
    assert row.endswith("| 1.000× | 1.250× | 1.200× | – |")  # paired, fused, the ideal measured, llama.cpp
    # no per-item scores: 0.45/0.5, the error as if independent, sqrt(0.02**2 + (0.9 * 0.02)**2) / 0.5
    assert "0.900 ± 0.054 indep." in row
    frontier_report.plot_frontier(result, tmp_path / "tasks.png")
    # per-item scores of the same 20 items (10 right, then 9 of them): the error of p - 0.9 b per item,
    # 0.1 (×9), -0.9 and 0 (×10): stdev sqrt(0.9 / 19), / sqrt(20) / 0.5
    for point, right in zip(result["points"], (10, 9)):
        point["tasks"]["piqa"]["items"] = {"doc_id": list(range(20)), "acc": [1] * right + [0] * (20 - right)}
    row = frontier_report.frontier_table(result).splitlines()[-1]
    assert "0.900 ± 0.097 |" in row
    without_tasks = {"points": [_point("baseline", 0, 30.0, None, None), _point("planned", 2, 33.0, None, None)]}
    (row,) = frontier_report.rows(without_tasks)[1:]
    assert row.retention is None and row.ppl_retention == pytest.approx(30 / 33)
    frontier_report.plot_frontier(without_tasks, tmp_path / "ppl.png")
    assert (tmp_path / "ppl.png").stat().st_size > 0 and (tmp_path / "tasks.png").stat().st_size > 0


@pytest.mark.llamacpp
def test_llamacpp_ratio_of_an_exported_pairing_against_the_unpaired_export(tmp_path: Path, bpe_dir: Path) -> None:
    pytest.importorskip("llama_cpp")
    from lp_fx.tools.export.fold import Source
    from lp_fx.tools.frontier.speed import LlamaCppBench

    bench = LlamaCppBench(tmp_path, Source("tiny", bpe_dir), threads=2, tokens=4, rounds=2)
    record = bench.ratio(bpe_model(), Pairing("p", tuple(PAIRS), ("lp", "lp")))
    assert record["layers"] == [6, 4] and record["ratio"] > 0
    assert [len(speeds) for speeds in record["tokens_per_s"].values()] == [2, 2]
    assert [path.name for path in tmp_path.iterdir()] == ["unpaired_f32.gguf"]  # the paired export is removed


def test_pairings_timed_together_need_distinct_names() -> None:
    """Each pairing's variants are named after it: two of one name would overwrite each other's copies."""

    pairing = Pairing("14:16", [(14, 15)], ("lp",))
    with pytest.raises(ValueError, match="distinct names"):
        frontier_speed.SpeedBench(tokenizer=None).one_device(None, [(pairing, {}), (pairing, {})])


def test_the_measured_ideal_is_the_pairs_pruned_and_gives_the_layers_share_of_a_step() -> None:
    """Pruning k of L alike layers saves k layers' time: a step of h + L·l becomes h + (L − k)·l."""
    head, layer, layers, pruned = 10.0, 2.0, 18, 4
    ideal = (head + layers * layer) / (head + (layers - pruned) * layer)
    assert frontier_speed.layer_share(ideal, layers, pruned) == pytest.approx(layers * layer / (head + layers * layer))
    variants = frontier_speed.paired_variants(Pairing("p", ((2, 3), (5, 6)), ("lp", "block")), {"plan": "p.json"},
                                              "eager", {"cudagraphs": True})
    assert variants["pruned"].options == {"pairs": [(2, 3), (5, 6)], "modes": ["prune", "prune"], "cudagraphs": True,
                                          "inner": "eager", "strict": True}
    assert variants["paired + fuse"].options == {"cudagraphs": True, "plan": "p.json", "inner": "eager", "strict": True,
                                                 "fuse": True}


def test_a_gemma3_pairing_its_fused_and_pruned_copies_are_timed_with_one_decode_graph_each(model_dir: Path) -> None:
    """Gemma 3's sliding-window cache counts its tokens in a Python int: each decode step compiled a
    graph of its own before, so a speed run timed compiles."""
    from transformers import AutoTokenizer

    bench = frontier_speed.SpeedBench(AutoTokenizer.from_pretrained(model_dir), inner="eager", tokens=6, rounds=2)
    pairing = Pairing("p", ((1, 2),), ("lp",))
    [record] = bench.one_device(hf_model("gemma3", layers=4), [(pairing, pairing.to_options())])
    assert set(record["tokens_per_s"]) == {"unpaired", "paired", "paired + fuse", "pruned"}
    assert all(len(graphs) <= 2 for graphs in record["gemms_per_graph"].values()), record["gemms_per_graph"]
    assert record["ideal_measured"] > 0


def test_a_pairing_without_pairs_is_refused_before_anything_is_compiled() -> None:
    """Its pruned copy would be the unpaired model and its layers' share a division by zero, after the whole run."""
    with pytest.raises(ValueError, match="'baseline' has no pairs"):
        frontier_speed.SpeedBench(tokenizer=None).one_device(None, [(Pairing("baseline"), {})])
