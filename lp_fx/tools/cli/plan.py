"""``lp-fx plan``: choose pairs by measured sensitivity, on one gated graph."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from lp_fx.pairing import save_plan
from lp_fx.tools.evaluation import scoring as evaluate
from lp_fx.tools.planning import scorers as plan_scorers
from lp_fx.tools.planning import search as planner
from lp_fx.tools.cli import common as options
from lp_fx.tools.cli.common import add_command, RESULTS, PairedModelArgs, writable
from lp_fx.tools.console import say
from lp_fx.tools.options import option, options_from, positive_float, positive_int
from lp_fx.tools.planning.options import SearchOptions


@dataclass(frozen=True)
class PlanArgs(PairedModelArgs):
    """``lp-fx plan``'s options."""

    num_pairs: int | None = option(None, parse=positive_int)
    """how many pairs to choose"""
    max_ppl_ratio: float | None = option(None, parse=positive_float)
    """budget: stop before calibration perplexity exceeds this × baseline (e.g. 1.1)"""
    search: SearchOptions = option(factory=SearchOptions)
    out: str = option(str(RESULTS / "plan.json"))
    """plan file, accepted by options={'plan': ...} (folders are created)"""


def register(subparsers: argparse._SubParsersAction) -> None:
    add_command(
        subparsers, "plan", "choose disjoint pairs by measured perplexity cost on calibration text", PlanArgs, run,
    )


def run(args: argparse.Namespace) -> None:
    if args.num_pairs is None and args.max_ppl_ratio is None:
        raise ValueError("give --num-pairs, --max-ppl-ratio, or both")
    writable(args.out)
    loaded, data_dir = options.load(args)
    most = loaded.num_layers // 2
    if args.num_pairs is not None and args.num_pairs > most:
        raise ValueError(f"--num-pairs {args.num_pairs}: a {loaded.num_layers}-layer model has at most {most} disjoint pairs")
    windows, screen_windows = (
        evaluate.wikitext_windows(loaded.tokenizer, data_dir, args.window, "calib", count)
        for count in (args.calib_windows, args.screen_windows)
    )
    say(f"model {loaded.name} ({loaded.num_layers} layers); calibration: {windows.shape[0]} "
        f"windows of {args.window} tokens from the first half of WikiText-2 raw test "
        f"({screen_windows.shape[0]} for single pairs)")
    scorer = plan_scorers.GatedScorer(loaded.model, windows, args.modes, args.inner)
    measure, screen = plan_scorers.calibration_measures(scorer, windows, screen_windows, options_from(SearchOptions, args).margin)
    plan = planner.make_plan(
        measure,
        loaded.num_layers,
        loaded.name,
        num_pairs=args.num_pairs,
        max_ppl_ratio=args.max_ppl_ratio,
        modes=args.modes,
        refine=args.refine,
        passes=args.passes,
        calibration={"split": "calib", "windows": int(windows.shape[0]),
                     "screen_windows": int(screen_windows.shape[0]), "window": args.window},
        verify=plan_scorers.compiled_scorer(loaded.model, windows, args.inner),
        screen=screen,
        progress=not args.no_progress,
    )
    plan["search"]["graphs_compiled"] = scorer.compiles
    share = scorer.share_run()
    if share is not None:
        plan["search"]["share_of_graph_run"] = round(share, 3)
    calib, search = plan["calibration"], plan["search"]
    say(f"pairs {plan['pairs']} modes {plan['modes']}")
    say(f"calibration ppl: baseline {calib['baseline_ppl']:.3f}, plan {calib['plan_ppl']:.3f} "
        f"(compiled plainly: {calib['plan_ppl_plain']:.3f})")
    lazily = f", {share:.0%} of its nodes run per score" if share is not None else ""
    raced = (f"; {search['trials_dropped']} trials dropped after part of the windows (race margin "
             f"{search['race_margin']:.1%})" if "race_margin" in search else "")
    say(f"{search['pairings_scored']} pairings scored with {search['graphs_compiled']} compiled graph(s){lazily} "
        f"in {search['seconds']:.0f} s{raced}")
    save_plan(plan, args.out)
    say(f"wrote {args.out}")
    problem = planner.plain_disagreement(plan)
    if problem:
        raise ValueError(f"{problem}: do not trust {args.out}")
