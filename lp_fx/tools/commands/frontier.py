"""``lp-fx frontier``: speed against quality for every budget Δ, contiguous vs planned vs planned + fine-tuned."""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

import torch

from lp_fx.tools import frontier
from lp_fx.tools.arguments import index_list, int_at_least, non_negative_int, positive_int
from lp_fx.tools.commands import options
from lp_fx.tools.commands.options import RESULTS, add_model_options, new_file, writable
from lp_fx.tools.console import say
from lp_fx.tools.files import atomic_write
from lp_fx.tools.model_identity import model_identity


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "frontier", help="speed against quality for every budget Δ: contiguous, planned and fine-tuned pairs; "
        "JSON after every point, a Markdown table and a PNG",
    )
    add_model_options(parser, mode=False)
    parser.add_argument("--budgets", type=index_list, default=list(frontier.DEFAULT_BUDGETS),
                        help="comma-separated even Δ, the layers paired (Δ/2 pairs); default 2,4,...,14")
    parser.add_argument("--contiguous-start", type=non_negative_int, default=None,
                        help="first layer of every contiguous range start:start+Δ (default: the middle start of "
                        "`lp-fx sweep --transforms`, 14 on 30 layers, so Δ=14 is the demo's 14:28)")
    parser.add_argument("--ppl-windows", type=positive_int, default=16,
                        help="evenly spaced windows of the held-out half of WikiText-2 and of the LAMBADA text")
    parser.add_argument("--tasks", default="arc_easy,piqa,hellaswag,winogrande",
                        help=f"comma-separated, from: {', '.join(frontier.TASK_NAMES)}; 'none' for perplexity only")
    parser.add_argument("--limit", type=positive_int, default=500, help="items per task (fixed-seed subset)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the --limit subsets")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="batch size for task scoring")
    parser.add_argument("--plan-modes", default="lp,block", help="modes the planner considers per pair: lp, block or lp,block")
    parser.add_argument("--calib-windows", type=positive_int, default=4,
                        help="planner: windows from the first half of WikiText-2 on which each set is scored")
    parser.add_argument("--screen-windows", type=positive_int, default=2, help="planner: windows for single pairs")
    parser.add_argument("--refine", type=positive_int, default=3, help="planner: candidates tried at each step")
    parser.add_argument("--passes", type=non_negative_int, default=2, help="planner: rounds of swapping")
    options.add_race_options(parser)
    parser.add_argument("--finetune-steps", type=non_negative_int, default=100,
                        help="steps of distillation for the planned pairing of each budget (0: no fine-tuned curve)")
    parser.add_argument("--finetune-train", default="paired", choices=["paired", "all"],
                        help="what the fine-tuning trains: the paired layers (default) or every parameter")
    parser.add_argument("--variants", type=parse_variants, default=None,
                        help=f"comma-separated, from: {', '.join(frontier.VARIANTS)} (default: all; finetuned only "
                        "with --finetune-steps); the baseline is always measured. Another --variants on --resume "
                        "adds its points to the same JSON")
    parser.add_argument("--speed-inner", default="inductor", choices=["inductor", "aot_eager", "eager"],
                        help="compiler of the timed variants (unpaired, paired, paired + fuse)")
    parser.add_argument("--speed-tokens", type=int_at_least(2), default=32,
                        help="tokens generated per timed run (decode speed is timed from the first to the last)")
    parser.add_argument("--speed-rounds", type=non_negative_int, default=5,
                        help="interleaved timing rounds (0: no speed measured)")
    parser.add_argument("--llamacpp", action="store_true",
                        help="also time each lp pairing exported to llama.cpp against the unpaired export")
    parser.add_argument("--out", default=str(RESULTS / "frontier.json"), help="JSON, rewritten after every point")
    parser.add_argument("--table", default=None, help="Markdown table (default: --out with .md)")
    parser.add_argument("--plot", default=None, help="PNG of speedup against retention (default: --out with .png)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--resume", action="store_true", help="continue the run in --out: measure what it lacks")
    which.add_argument("--overwrite", action="store_true", help="start again, replacing --out")
    parser.set_defaults(func=run)


def parse_tasks(spec: str) -> tuple[str, ...]:
    """``none`` or comma-separated task names."""
    if spec.strip() == "none":
        return ()
    tasks = tuple(dict.fromkeys(task.strip() for task in spec.split(",") if task.strip()))
    unknown = [task for task in tasks if task not in frontier.TASK_NAMES]
    if unknown or not tasks:
        raise ValueError(f"--tasks {spec!r}: unknown {', '.join(map(repr, unknown)) or 'empty list'}; "
                         f"give 'none' or some of {', '.join(frontier.TASK_NAMES)}")
    return tasks


def parse_variants(spec: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(variant.strip() for variant in spec.split(",") if variant.strip()))


def parse_modes(spec: str) -> tuple[str, ...]:
    from lp_fx.tools.planner import MODES

    modes = tuple(dict.fromkeys(mode.strip() for mode in spec.split(",") if mode.strip()))
    if not modes or set(modes) - set(MODES):
        raise ValueError(f"--plan-modes {spec!r}: give some of {', '.join(MODES)}")
    return modes


def check_llamacpp() -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        from lp_fx.tools.llamacpp import INSTALL

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
    from lp_fx.tools import frontier_report, frontier_speed, sweep

    tasks, modes = parse_tasks(args.tasks), parse_modes(args.plan_modes)
    variants = frontier.check_variants(args.variants, args.finetune_steps)
    if args.llamacpp:
        check_llamacpp()
    out, table_path, plot_path = outputs(args)
    loaded, data_dir = options.load(args)
    start = args.contiguous_start if args.contiguous_start is not None else sweep.default_starts(loaded.num_layers)[-1]
    budgets = frontier.check_budgets(args.budgets, loaded.num_layers, start)
    settings = frontier.FrontierOptions(
        model=loaded.name, num_layers=loaded.num_layers, contiguous_start=start, window=args.window,
        ppl_windows=args.ppl_windows, tasks=tasks, limit=args.limit, seed=args.seed, batch_size=args.batch_size,
        inner=args.inner, plan_modes=modes, calib_windows=args.calib_windows, screen_windows=args.screen_windows,
        refine=args.refine, passes=args.passes, race_margin=options.race_margin(args), finetune_steps=args.finetune_steps,
        finetune_train=args.finetune_train, speed_inner=args.speed_inner,
        speed_tokens=args.speed_tokens, speed_rounds=args.speed_rounds, llamacpp=args.llamacpp,
    )
    identity = model_identity(loaded.model)
    result = frontier.resume_result(out, settings, identity) if args.resume else frontier.new_result(settings, identity)
    say(f"model {loaded.name} ({loaded.num_layers} layers): budgets Δ={list(budgets)}, contiguous ranges from layer "
        f"{start}, variants {', '.join(variants)}, tasks {', '.join(tasks) or 'none'}, fine-tuning "
        f"{args.finetune_steps} steps ({args.finetune_train}); "
        f"{len(frontier.measured(result))} points already in {out}")
    runner = frontier.Frontier(loaded.model, loaded.tokenizer, loaded.name, data_dir, settings, out, result,
                               progress=not args.no_progress)
    with contextlib.ExitStack() as stack:
        if args.speed_rounds:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory())) if args.llamacpp else None
            llamacpp = _llamacpp_bench(args, folder, loaded.name) if folder else None
            runner.speed = frontier_speed.SpeedBench(loaded.tokenizer, args.speed_inner, args.speed_tokens,
                                                     args.speed_rounds, llamacpp)
        result = runner.run(budgets, variants)
    say(f"wrote {out} ({result['runs'][-1]['wall_s']:.0f} s this run; planning: {result['planner'] or 'none'})")
    table = frontier_report.frontier_table(result)
    atomic_write(table_path, lambda tmp: tmp.write_text(table + "\n", encoding="utf-8"))
    say(table)
    say(f"wrote {table_path}")
    frontier_report.plot_frontier(result, new_file(plot_path), f"{loaded.name}: speed against quality per budget Δ")
    say(f"wrote {plot_path}")


def _llamacpp_bench(args: argparse.Namespace, folder: Path, name: str):
    """Exports into ``folder`` (a temporary one: an f32 GGUF is the model's size), timed in llama.cpp."""
    from lp_fx.tools.export import Source
    from lp_fx.tools.frontier_speed import LlamaCppBench
    from lp_fx.tools.models import resolve_model_path

    directory, gguf_file = resolve_model_path(args.model)
    source = Source(name, directory / gguf_file if gguf_file else directory)
    return LlamaCppBench(folder, source, torch.get_num_threads(), args.speed_tokens,
                         args.speed_rounds)
