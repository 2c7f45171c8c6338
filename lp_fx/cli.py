"""``lp-fx``: measure what pairing costs (``eval``), sweep Δ (``sweep``), choose pairs (``plan``).

Each subcommand is registered by one small ``add_*`` function listed in ``SUBCOMMANDS``; a new
subcommand is one more function there.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Callable, Sequence

from lp_fx import data, evaluate, planner, sweep
from lp_fx.evaluate import BASELINE, EvalSpec, Pairing

PAIR_LIST = re.compile(r"^\d+-\d+(,\d+-\d+)*$")
RANGE = re.compile(r"^(\d+):(\d+)$")


# ------------------------------------------------------------------------------ shared options


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="smollm2",
        help="'smollm2' (the bundled SmolLM2-135M-Instruct GGUF), a .gguf file or a local HF model directory",
    )
    parser.add_argument(
        "--data-dir", default=None,
        help="evaluation data directory (default: ../shared/data next to the repo or the cwd)",
    )
    parser.add_argument("--mode", default="lp", choices=["lp", "block"], help="pairing mode")
    parser.add_argument(
        "--inner", default="eager", choices=["eager", "aot_eager", "inductor"],
        help="compiler behind the layer_parallel backend (eager is fastest to compile)",
    )
    parser.add_argument("--window", type=int, default=512, help="perplexity window in tokens")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")


def _add_eval_options(parser: argparse.ArgumentParser, tasks: str, split: str, windows: int | None) -> None:
    parser.add_argument(
        "--tasks", default=tasks,
        help=f"comma-separated, from: {', '.join(evaluate.TASKS)} (wikitext = perplexity)",
    )
    parser.add_argument("--limit", type=int, default=None, help="items per task (fixed-seed subset)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the --limit subsets")
    parser.add_argument(
        "--split", default=split, choices=["all", "calib", "heldout"],
        help="perplexity windows: all, the first half (calib) or the second half (heldout)",
    )
    parser.add_argument(
        "--ppl-windows", type=int, default=windows,
        help="use this many evenly spaced windows of the split (default: all)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="batch size for task scoring")


def _eval_spec(args: argparse.Namespace, data_dir: Path) -> EvalSpec:
    return EvalSpec(
        data_dir=data_dir,
        tasks=tuple(task.strip() for task in args.tasks.split(",") if task.strip()),
        limit=args.limit,
        seed=args.seed,
        ppl_split=args.split,
        ppl_windows=args.ppl_windows,
        window=args.window,
        batch_size=args.batch_size,
    )


def _load(args: argparse.Namespace) -> tuple[object, Path]:
    from lp_fx.models import load_model

    data_dir = data.resolve_data_dir(args.data_dir)  # fail on a bad data dir before loading
    return load_model(args.model), data_dir


def parse_pairing(spec: str, num_layers: int) -> Pairing:
    """``baseline``, a range ``14:28``, pairs ``14-15,20-21``, or a plan file for this model."""
    if spec == "baseline":
        return BASELINE
    if match := RANGE.match(spec):
        from lp_fx.config import pairs_from_range

        return Pairing(spec, pairs_from_range(int(match[1]), int(match[2])))
    if PAIR_LIST.match(spec):
        pairs = tuple(tuple(map(int, pair.split("-"))) for pair in spec.split(","))
        return Pairing(spec, pairs)  # type: ignore[arg-type]
    plan = planner.load_plan(spec)
    planner.check_plan(plan, num_layers, spec)
    return planner.plan_pairing(plan, Path(spec).stem)


def _write_json(payload: dict, path: str) -> None:
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


# ------------------------------------------------------------------------------------- tables


def format_table(names: Sequence[str], results: dict[str, dict]) -> str:
    """Metrics as rows (``[n]`` = items or windows), pairings as columns; after the baseline,
    ``value (LP/baseline)``; then the mean accuracy retention."""
    values = {name: evaluate.metric_values(results[name]) for name in names}
    baseline = values[names[0]]
    rows: list[tuple[str, list[str]]] = []
    for task, metric in baseline:
        size = results[names[0]][task].get("n", results[names[0]][task].get("windows"))
        cells = [f"{baseline[(task, metric)]:.4g}"]
        for name in names[1:]:
            value = values[name].get((task, metric))
            cells.append("n/a" if value is None else f"{value:.4g} ({value / baseline[(task, metric)]:.3f})")
        rows.append((f"{task}/{metric} [{size}]", cells))
    for key in ("mean_acc", "mean_acc_norm"):
        means = [evaluate.retention(results[name], results[names[0]]).get(key) for name in names[1:]]
        rows.append((f"retention {key}", ["", *("n/a" if m is None else f"{m:.3f}" for m in means)]))
    label = max(len(row[0]) for row in rows) + 2
    width = max(18, *(len(name) + 2 for name in names), *(len(c) + 2 for _, cells in rows for c in cells))
    lines = ["metric".ljust(label) + "".join(name.rjust(width) for name in names)]
    lines += [text.ljust(label) + "".join(cell.rjust(width) for cell in cells) for text, cells in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- subcommands


def add_eval(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="perplexity and task accuracy: baseline and pairings, with retention"
    )
    _add_model_options(parser)
    _add_eval_options(parser, ",".join(evaluate.TASKS), "all", None)
    parser.add_argument(
        "--pairs", action="append", default=[], metavar="SPEC",
        help="a pairing to compare with the baseline (repeatable): a range START:END (e.g. 14:28), "
        "pairs like 14-15,20-21, or a plan JSON from `lp-fx plan`",
    )
    parser.add_argument("--out", default="eval.json", help="JSON results")
    parser.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> None:
    loaded, data_dir = _load(args)
    pairings = [BASELINE] + [parse_pairing(spec, loaded.num_layers) for spec in args.pairs]
    prepared = evaluate.prepare(loaded.tokenizer, _eval_spec(args, data_dir))
    print(f"model {loaded.name} ({loaded.num_layers} layers); items per task: {prepared.sizes()}")
    results = {}
    for pairing in pairings:
        logits_fn = evaluate.compile_pairing(loaded.model, pairing, args.mode, args.inner)
        results[pairing.name] = evaluate.run_eval(logits_fn, prepared, not args.no_progress)
    names = [pairing.name for pairing in pairings]
    print(format_table(names, results))
    _write_json(
        {
            "model": loaded.name,
            "num_layers": loaded.num_layers,
            "mode": args.mode,
            "spec": {**vars(_eval_spec(args, data_dir)), "data_dir": str(data_dir)},
            "sizes": prepared.sizes(),
            "pairings": [
                {
                    **pairing.to_json(),
                    "results": results[pairing.name],
                    "retention": evaluate.retention(results[pairing.name], results["baseline"]),
                }
                for pairing in pairings
            ],
        },
        args.out,
    )


def add_sweep(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep", help="contiguous ranges of every even Δ from several starts; JSON and a PNG plot"
    )
    _add_model_options(parser)
    _add_eval_options(parser, "wikitext", "heldout", 8)
    parser.add_argument("--starts", default=None, help="comma-separated start layers (default: 4 spread over the first half)")
    parser.add_argument("--deltas", default=None, help="comma-separated even Δ values (default: every one that fits)")
    parser.add_argument("--out", default="sweep.json", help="JSON results")
    parser.add_argument("--plot", default="sweep.png", help="PNG plot of perplexity against effective depth")
    parser.set_defaults(func=run_sweep)


def _int_list(text: str | None) -> list[int] | None:
    return None if text is None else [int(item) for item in text.split(",")]


def run_sweep(args: argparse.Namespace) -> None:
    loaded, data_dir = _load(args)
    spec = _eval_spec(args, data_dir)
    prepared = evaluate.prepare(loaded.tokenizer, spec)
    starts = _int_list(args.starts) or sweep.default_starts(loaded.num_layers)
    points = sweep.sweep_points(loaded.num_layers, starts, _int_list(args.deltas))
    print(f"model {loaded.name}: {len(points)} ranges from starts {starts}; sizes {prepared.sizes()}")

    def measure(pairing: Pairing) -> dict:
        logits_fn = evaluate.compile_pairing(loaded.model, pairing, args.mode, args.inner)
        return evaluate.run_eval(logits_fn, prepared, progress=False)

    result = sweep.run_sweep(measure, loaded.num_layers, points, not args.no_progress)
    result.update(model=loaded.name, mode=args.mode, sizes=prepared.sizes())
    _write_json(result, args.out)
    if "wikitext" in spec.tasks:
        for row in result["rows"]:
            print(f"start {row['start']:>2} Δ {row['delta']:>2} depth {row['effective_depth']:>2}: "
                  f"ppl {row['results']['wikitext']['ppl']:.3f}")
        sweep.plot_sweep(result, args.plot, f"{loaded.name}, mode {args.mode}: contiguous pairs")
        print(f"wrote {args.plot}")


def add_plan(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan", help="choose disjoint pairs by measured perplexity cost on calibration text"
    )
    _add_model_options(parser)
    parser.add_argument("--num-pairs", type=int, default=None, help="how many pairs to choose")
    parser.add_argument(
        "--max-ppl-ratio", type=float, default=None,
        help="budget: stop before calibration perplexity exceeds this × baseline (e.g. 1.1)",
    )
    parser.add_argument("--calib-windows", type=int, default=8, help="windows from the first half of WikiText-2")
    parser.add_argument("--modes", default="lp", help="modes to consider per pair: lp, block or lp,block")
    parser.add_argument("--refine", type=int, default=3, help="cheapest candidates tried together at each step")
    parser.add_argument("--out", default="plan.json", help="plan file, accepted by options={'plan': ...}")
    parser.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> None:
    if args.num_pairs is None and args.max_ppl_ratio is None:
        raise ValueError("give --num-pairs, --max-ppl-ratio, or both")
    loaded, data_dir = _load(args)
    windows = evaluate.wikitext_windows(
        loaded.tokenizer, data_dir, args.window, "calib", args.calib_windows
    )
    print(f"model {loaded.name} ({loaded.num_layers} layers); calibration: {windows.shape[0]} "
          f"windows of {args.window} tokens from the first half of WikiText-2 raw test")

    def measure(pairing: Pairing) -> float:
        logits_fn = evaluate.compile_pairing(loaded.model, pairing, args.mode, args.inner)
        return evaluate.perplexity(logits_fn, windows, pairing.name, progress=False).ppl

    plan = planner.make_plan(
        measure,
        loaded.num_layers,
        loaded.name,
        num_pairs=args.num_pairs,
        max_ppl_ratio=args.max_ppl_ratio,
        modes=tuple(args.modes.split(",")),
        refine=args.refine,
        calibration={"split": "calib", "windows": int(windows.shape[0]), "window": args.window},
        progress=not args.no_progress,
    )
    calib = plan["calibration"]
    print(f"pairs {plan['pairs']} modes {plan['modes']}")
    print(f"calibration ppl: baseline {calib['baseline_ppl']:.3f}, plan {calib['plan_ppl']:.3f}")
    planner.save_plan(plan, args.out)
    print(f"wrote {args.out}")


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_eval, add_sweep, add_plan]
ERRORS = (data.DataError, planner.PlanError, FileNotFoundError, ValueError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lp-fx", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        args.func(args)
    except ERRORS as error:
        print(f"lp-fx {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


def add_bench(subparsers: argparse._SubParsersAction) -> None:
    """``lp-fx bench``: decode tokens/s of TP, TP + LP and one device (lp_fx/bench.py)."""
    from lp_fx import bench

    bench.register(subparsers)


SUBCOMMANDS.append(add_bench)


if __name__ == "__main__":
    sys.exit(main())
