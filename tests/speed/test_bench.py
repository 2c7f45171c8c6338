"""The benchmark's own logic (the timing itself needs torchrun and the real model: `lp-fx bench`)."""

import argparse

import pytest

from lp_fx.tools.cli.bench import BenchArgs, _argv
from lp_fx.tools.options import add_options
from lp_fx.tools.speed.ranks import Variant, table, variants
from lp_fx.tools.speed.single import gemm_launches_per_token, single_table, single_variants
from lp_fx.tools.speed.timing import compile_variant, generate, ratio_to_first


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_options(parser, BenchArgs)
    return parser.parse_args(argv)


def test_arguments_survive_the_relaunch_under_torchrun():
    args = _parse(["--start", "4", "--end", "10", "--modes", "block", "--quantize", "int8", "--no-single",
                   "--prompt", "a 'quoted' prompt", "--rounds", "2"])
    assert _parse(_argv(args)) == args


def test_ratio_is_the_median_of_per_round_ratios():
    """A slow spell of the machine in round 2 hits both variants; per-round ratios cancel it."""
    tp = Variant("TP", {}, tokens_per_s=[10.0, 2.0, 9.0])
    lp = Variant("TP+LP lp", {}, tokens_per_s=[12.0, 2.4, 12.5])
    assert ratio_to_first(lp, tp) == pytest.approx(1.2)  # the ratio of medians: 12 / 9 = 1.33


def test_table_reports_ratio_ideal_and_memory():
    todo = variants(14, 28, ["lp"], "inductor", single=False)
    assert [v.name for v in todo] == ["TP", "TP+LP lp"]
    assert all(v.options["free_weights"] for v in todo)
    for v, speeds in zip(todo, ([5.0, 5.0], [6.0, 6.0])):
        v.tokens_per_s, v.collectives, v.resident_bytes = speeds, [60, 60], 2**20 * 300
    lines = table(todo, num_layers=30, delta=14).splitlines()
    assert "1.200" in lines[2] and "1.304" in lines[2] and "300" in lines[2]


def test_single_device_table_gives_ratios_to_inductor_and_gemms_to_unfused_lp():
    todo = single_variants(14, 28, ["lp"])
    assert [v.name for v in todo] == ["Inductor", "LP lp", "LP lp + fuse"]
    assert todo[0].options is None and todo[2].options["fuse"] and not todo[1].options.get("fuse")
    for v, speed, gemms in zip(todo, (10.0, 10.0, 12.0), (211.0, 211.0, 141.0)):
        v.tokens_per_s, v.gemms_per_token, v.resident_bytes = [speed, speed], gemms, 2**20 * 500
    lines = single_table(todo).splitlines()
    assert "1.200" in lines[3] and "141.0" in lines[3] and "0.668" in lines[3]


def test_profiler_counts_fewer_gemm_launches_per_token_with_fuse():
    """Tiny Llama, pairs (1, 2) and (3, 4) of 6 layers: 7 GEMMs per layer + the head = 43 per
    token unfused; fused, each pair runs 4 instead of 14: 23."""
    import torch

    from tests.helpers.models import hf_model

    model = hf_model("llama", layers=6)
    ids = torch.tensor([[5, 6, 7, 8]])
    counts = {}
    for v in single_variants(1, 5, ["lp"], inner="aot_eager")[1:]:
        copy_, backend = compile_variant(model, v.options)
        generate(copy_, ids, 4)
        counts[v.name] = gemm_launches_per_token(copy_, ids, 4)
        torch._dynamo.reset()
    assert counts == {"LP lp": 43.0, "LP lp + fuse": 23.0}


def test_an_odd_range_is_refused_in_one_line_before_torchrun_starts(monkeypatch, capsys, tmp_path):
    import subprocess

    from lp_fx.tools import cli

    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("torchrun started with an odd range"))
    code = cli.main(["bench", "--start", "3", "--end", "4", "--json", str(tmp_path / "bench.json")])
    err = capsys.readouterr().err
    assert code == 2 and "end - start = 1 is odd" in err and "Traceback" not in err


def test_variants_are_warmed_up_then_timed_interleaved_and_generate_what_eager_does():
    """Two variants through the shared timing helpers: every variant that runs here is noted and
    timed once per round, the ranks' barrier runs after each, and the unpaired copy generates the
    eager model's tokens (a variant this rank does not run is neither compiled nor timed)."""
    import torch

    from lp_fx.tools.speed.timing import compile_and_warm_up, time_interleaved

    from tests.helpers.models import hf_model

    model = hf_model("llama", layers=4)
    ids = torch.tensor([[5, 6, 7, 8]])
    todo = [Variant("plain", {"inner": "eager"}), Variant("paired", {"inner": "eager", "pairs": [(1, 2)]}),
            Variant("elsewhere", {"inner": "eager"}, distributed=False)]
    noted, barriers = [], []
    compiled = compile_and_warm_up(model, todo, ids, 4, lambda v, copy_, backend: noted.append(v.name),
                                   runs_here=lambda v: v.distributed, after_each=lambda: barriers.append(1))
    texts = time_interleaved(compiled, todo, ids, 4, rounds=3, after_each=lambda: barriers.append(1))
    assert noted == ["plain", "paired"] and sorted(compiled) == ["paired", "plain"]
    assert [len(v.tokens_per_s) for v in todo] == [3, 3, 0] and len(barriers) == 3 + 3 * 3
    assert all(v.resident_bytes for v in todo[:2]) and todo[2].resident_bytes is None
    with torch.no_grad():
        eager = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(texts["plain"], eager) and texts["paired"].shape == eager.shape


def test_decode_only_compiles_just_the_one_token_graph_and_generates_what_eager_does():
    """``decode_only``: the prompt runs eagerly, so the backend compiles ONE graph (the decode
    step, one token in) where it compiles two without it; an unpaired variant still generates
    exactly the eager model's tokens, so nothing the decode step is given is lost on the way."""
    import torch

    from tests.helpers.models import hf_model

    model = hf_model("llama", layers=2)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        eager = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, cache_implementation="static")
    graphs = {}
    for decode_only in (False, True):
        torch._dynamo.reset()
        copy_, backend = compile_variant(model, {"inner": "eager"}, decode_only=decode_only)
        out, _ = generate(copy_, ids, 5)
        graphs[decode_only] = len(backend.reports)
        assert torch.equal(out, eager)
    torch._dynamo.reset()
    assert graphs == {False: 2, True: 1}


def test_generate_times_the_variants_own_compile_where_transformers_would_compile_the_forward():
    """On CUDA with a static cache, transformers' ``generate`` compiles the forward itself
    (``torch.compile(mode="reduce-overhead")``); its Dynamo then traces through the variant's compiled
    forward and the layer_parallel backend never runs. Here that auto-compile is switched on for the
    CPU (the compile config's ``_compile_all_devices``, an eager backend): the variant's backend must
    still compile the decode step, with its pair rewritten."""
    import torch
    from transformers import CompileConfig

    from tests.helpers.models import hf_model

    model = hf_model("llama", layers=2)
    auto = CompileConfig(backend="eager")
    auto._compile_all_devices = True  # what a CUDA device does without it
    model.generation_config.compile_config = auto
    copy_, backend = compile_variant(model, {"inner": "eager", "pairs": [(0, 1)]}, decode_only=True)
    generate(copy_, torch.tensor([[5, 6, 7, 8]]), 3)
    assert [report.pairs_rewritten for report in backend.reports] == [[((0, 1), "lp")]]
