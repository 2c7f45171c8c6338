"""The benchmark's own logic (the timing itself needs torchrun and the real model: `lp-fx bench`)."""

import argparse

import pytest

from lp_fx.tools.bench import Variant, _argv, add_arguments, ratio_to_first, table, variants


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
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
