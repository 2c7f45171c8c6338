"""``lp-fx sweep``: perplexity against Δ for contiguous ranges and the depth transforms."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from lp_fx.tools.evaluation import scoring as evaluate
from lp_fx.tools.evaluation import sweep
from lp_fx.tools.options import index_list, positive_int
from lp_fx.tools.console import say
from lp_fx.pairing import Pairing
from lp_fx.tools.models import parse_precisions, quantize_weights
from lp_fx.tools.cli import common as options
from lp_fx.tools.cli.common import (
    add_command, RESULTS, ModelArgs, eval_spec, new_file, spec_record, writable, write_results,
)
from lp_fx.tools.evaluation.options import PerplexityOptions, TaskOptions
from lp_fx.tools.options import option


@dataclass(frozen=True)
class SweepArgs(ModelArgs):
    """``lp-fx sweep``'s options."""

    scoring: TaskOptions = option(factory=lambda: TaskOptions(tasks="wikitext"))
    windows: PerplexityOptions = option(factory=lambda: PerplexityOptions(split="heldout", ppl_windows=8))
    transforms: str = option("lp")
    """comma-separated, from: lp, block, prune, merge, shuffle (lp, block: pairs; prune, merge: the second layer
    of each pair removed, merge folding it into the first; shuffle: the range run in a seeded random order)"""
    starts: list[int] | None = option(None, parse=index_list)
    """comma-separated start layers (default: 4 spread over the first half; with several transforms or
    shuffle, the last of them)"""
    deltas: list[int] | None = option(None, parse=index_list)
    """comma-separated even Δ values, the number of layers transformed (default: every one that fits; with
    several transforms or shuffle, every second one: 2, 6, 10, …)"""
    seeds: int = option(3, parse=positive_int)
    """shuffle: seeds per range (distinct orders)"""
    quantize: str = option("fp32")
    """weights, comma-separated, each run in turn on the one loaded model (e.g. fp32,int8) fp32, int8; int8:
    torchao Int8WeightOnlyConfig on every linear, applied after loading"""
    out: str = option(str(RESULTS / "sweep.json"))
    """JSON results (folders are created)"""
    plot: str = option(str(RESULTS / "sweep.png"))
    """PNG plot of perplexity against Δ"""


def register(subparsers: argparse._SubParsersAction) -> None:
    add_command(
        subparsers, "sweep", "perplexity against the number of layers transformed (contiguous ranges); JSON, table and PNG", SweepArgs, run,
    )


def run(args: argparse.Namespace) -> None:
    transforms = sweep.parse_transforms(args.transforms)
    precisions = parse_precisions(args.quantize)
    writable(args.out, args.plot)
    loaded, data_dir = options.load(args)
    spec = eval_spec(args, data_dir)
    prepared = evaluate.prepare(loaded.tokenizer, spec)
    starts, step = sweep.default_layout(loaded.num_layers, transforms)
    ranges = sweep.sweep_ranges(loaded.num_layers, args.starts or starts, args.deltas, step)
    points = sweep.sweep_points(loaded.num_layers, transforms, ranges, args.seeds)
    say(f"model {loaded.name}: {', '.join(transforms)} on the ranges (start, Δ) {ranges}, "
        f"{len(points)} points, weights {', '.join(precisions)}; sizes {prepared.sizes()}")
    for skip in sweep.unsupported(transforms, precisions):
        say(f"left out: {skip['transform']} with {skip['quantize']} weights ({skip['why']})")

    def measure(pairing: Pairing) -> dict:
        return evaluate.measure(loaded.model, loaded.tokenizer, pairing, prepared, inner=args.inner, progress=False)

    result = sweep.run_sweep(
        measure, loaded.num_layers, points, precisions, lambda precision: quantize_weights(loaded.model, precision),
        not args.no_progress,
    )
    result.update(model=loaded.name, transforms=list(transforms), seeds=args.seeds)
    result.update(spec=spec_record(spec), sizes=prepared.sizes())
    write_results(result, args.out)
    if "wikitext" in spec.tasks:
        measured = f"WikiText-2 ({args.split}), {prepared.sizes()['wikitext']} windows of {args.window} tokens"
        say(f"{measured}: perplexity; shuffle: mean [min–max] over seeds")
        say(sweep.sweep_table(result))
        sweep.plot_sweep(result, new_file(args.plot), f"{loaded.name}, {measured}")
        say(f"wrote {args.plot}")
