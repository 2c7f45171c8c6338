"""``lp-fx frontier``: speed against quality for every budget Δ, contiguous vs planned vs planned + fine-tuned."""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass
import tempfile
from pathlib import Path

from lp_fx.files import atomic_write
from lp_fx.model_identity import model_identity
from lp_fx.tools.cli import common as options
from lp_fx.tools.cli.common import add_command, RESULTS, new_file, writable
from lp_fx.tools.console import say
from lp_fx.tools.evaluation import sweep
from lp_fx.tools.frontier import points, report, results
from lp_fx.tools.frontier.options import FrontierOptions
from lp_fx.tools.frontier.run import TASK_NAMES, Frontier
from lp_fx.tools.frontier.speed import LlamaCppBench, SpeedBench
from lp_fx.config import INNER_COMPILERS
from lp_fx.tools.cli.common import ModelArgs
from lp_fx.tools.evaluation.options import TaskOptions
from lp_fx.tools.options import index_list, int_at_least, non_negative_int, option, options_from, positive_int
from lp_fx.tools.planning.options import SearchOptions
from lp_fx.tools.training.finetune import TRAIN_SETS
from lp_fx.tools.speed.llamacpp import INSTALL


def parse_variants(spec: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(variant.strip() for variant in spec.split(",") if variant.strip()))


@dataclass(frozen=True)
class FrontierArgs(ModelArgs):
    """``lp-fx frontier``'s options: the planner's and the evaluation's embedded, and its own."""

    budgets: list[int] = option(factory=lambda: list(points.DEFAULT_BUDGETS), parse=index_list)
    """comma-separated even Δ, the layers paired (Δ/2 pairs); default 2,4,...,14"""
    contiguous_start: int | None = option(None, parse=non_negative_int)
    """first layer of every contiguous range start:start+Δ (default: the middle start of `lp-fx sweep
    --transforms`, 14 on 30 layers, so Δ=14 is the demo's 14:28)"""
    ppl_windows: int = option(16, parse=positive_int)
    """evenly spaced windows of the held-out half of WikiText-2 and of the LAMBADA text"""
    scoring: TaskOptions = option(factory=lambda: TaskOptions(tasks="arc_easy,piqa,hellaswag,winogrande", limit=500))
    search: SearchOptions = option(factory=SearchOptions, renames={"modes": "plan_modes"})
    finetune_steps: int = option(100, parse=non_negative_int)
    """steps of distillation for the planned pairing of each budget (0: no fine-tuned curve)"""
    finetune_train: str = option("paired", choices=TRAIN_SETS)
    """what the fine-tuning trains: the paired layers (default) or every parameter"""
    variants: tuple[str, ...] | None = option(None, parse=parse_variants)
    """comma-separated, from: contiguous, planned, finetuned (default: all; finetuned only with
    --finetune-steps); the baseline is always measured. Another --variants on --resume adds its points to
    the same JSON"""
    speed_inner: str = option("inductor", choices=INNER_COMPILERS)
    """compiler of the timed variants (unpaired, paired, paired + fuse)"""
    speed_tokens: int = option(32, parse=int_at_least(2))
    """tokens generated per timed run (decode speed is timed from the first to the last)"""
    speed_rounds: int = option(5, parse=non_negative_int)
    """interleaved timing rounds (0: no speed measured)"""
    llamacpp: bool = option(False)
    """also time each lp pairing exported to llama.cpp against the unpaired export"""
    out: str = option(str(RESULTS / "frontier.json"))
    """JSON, rewritten after every point"""
    table: str | None = option(None)
    """Markdown table (default: --out with .md)"""
    plot: str | None = option(None)
    """PNG of speedup against retention (default: --out with .png)"""
    resume: bool = option(False, exclusive="which")
    """continue the run in --out: measure what it lacks"""
    overwrite: bool = option(False, exclusive="which")
    """start again, replacing --out"""


def register(subparsers: argparse._SubParsersAction) -> None:
    add_command(
        subparsers, "frontier", "speed against quality for every budget Δ: contiguous, planned and fine-tuned pairs; "
        "JSON after every point, a Markdown table and a PNG", FrontierArgs, run,
    )


def parse_tasks(spec: str) -> tuple[str, ...]:
    """``none`` or comma-separated task names."""
    if spec.strip() == "none":
        return ()
    tasks = tuple(dict.fromkeys(task.strip() for task in spec.split(",") if task.strip()))
    unknown = [task for task in tasks if task not in TASK_NAMES]
    if unknown or not tasks:
        raise ValueError(f"--tasks {spec!r}: unknown {', '.join(map(repr, unknown)) or 'empty list'}; "
                         f"give 'none' or some of {', '.join(TASK_NAMES)}")
    return tasks


def check_llamacpp() -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise ValueError(f"--llamacpp: {INSTALL}") from None


def outputs(args: argparse.Namespace) -> tuple[Path, str, str]:
    out = Path(args.out)
    if out.exists() and not (args.resume or args.overwrite):
        raise ValueError(f"{out} exists: give --resume to continue that run, or --overwrite to start again")
    if args.resume and not out.is_file():
        raise ValueError(f"--resume: {out} does not exist; run without --resume to start")
    table, plot = args.table or str(out.with_suffix(".md")), args.plot or str(out.with_suffix(".png"))
    writable(str(out), table, plot)
    return out, table, plot


def run(args: argparse.Namespace) -> None:
    tasks = parse_tasks(args.tasks)
    variants = points.check_variants(args.variants, args.finetune_steps)
    if args.llamacpp:
        check_llamacpp()
    out, table_path, plot_path = outputs(args)
    loaded, data_dir = options.load(args)
    start = args.contiguous_start if args.contiguous_start is not None else sweep.default_starts(loaded.num_layers)[-1]
    budgets = points.check_budgets(args.budgets, loaded.num_layers, start)
    settings = FrontierOptions(
        model=loaded.name, num_layers=loaded.num_layers, contiguous_start=start, window=args.window,
        ppl_windows=args.ppl_windows, tasks=tasks, limit=args.limit, seed=args.seed, batch_size=args.batch_size,
        inner=args.inner, search=options_from(SearchOptions, args, {"modes": "plan_modes"}), finetune_steps=args.finetune_steps,
        finetune_train=args.finetune_train, speed_inner=args.speed_inner,
        speed_tokens=args.speed_tokens, speed_rounds=args.speed_rounds, llamacpp=args.llamacpp,
    )
    identity = model_identity(loaded.model)
    result = results.resume_result(out, settings, identity) if args.resume else results.new_result(settings, identity)
    say(f"model {loaded.name} ({loaded.num_layers} layers): budgets Δ={list(budgets)}, contiguous ranges from layer "
        f"{start}, variants {', '.join(variants)}, tasks {', '.join(tasks) or 'none'}, fine-tuning "
        f"{args.finetune_steps} steps ({args.finetune_train}); "
        f"{len(results.measured(result))} points already in {out}")
    runner = Frontier(loaded.model, loaded.tokenizer, loaded.name, data_dir, settings, out, result,
                               progress=not args.no_progress)
    with contextlib.ExitStack() as stack:
        if args.speed_rounds:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory())) if args.llamacpp else None
            llamacpp = LlamaCppBench.of_model(args.model, loaded.name, folder, args.speed_tokens,
                                              args.speed_rounds) if folder else None
            runner.speed = SpeedBench(loaded.tokenizer, args.speed_inner, args.speed_tokens,
                                                     args.speed_rounds, llamacpp)
        result = runner.run(budgets, variants)
    say(f"wrote {out} ({result['runs'][-1]['wall_s']:.0f} s this run; planning: {result['planner'] or 'none'})")
    table = report.frontier_table(result)
    atomic_write(table_path, lambda tmp: tmp.write_text(table + "\n", encoding="utf-8"))
    say(table)
    say(f"wrote {table_path}")
    report.plot_frontier(result, new_file(plot_path), f"{loaded.name}: speed against quality per budget Δ")
    say(f"wrote {plot_path}")
