"""``lp-fx eval``: perplexity and task accuracy of the baseline and each pairing, one table.

Perplexity is ours (:mod:`lp_fx.tools.evaluation.scoring`); the tasks are the local copies as
lm-evaluation-harness tasks, scored by lm-eval (:mod:`lp_fx.tools.evaluation.lm_eval_tasks`), with its
standard errors beside the means."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from importlib.metadata import version

from lp_fx.checkpoint import read_pairing
from lp_fx.pairing import BASELINE, Pairing
from lp_fx.tools.console import say
from lp_fx.tools.evaluation import retention, scoring as evaluate
from lp_fx.tools.evaluation.compiled import check_pairing
from lp_fx.tools.cli import common as options
from lp_fx.tools.cli.common import (
    add_command, RESULTS, PairedModelArgs, eval_spec, finetuned, format_table, spec_record, writable, write_results,
)
from lp_fx.tools.evaluation.options import PerplexityOptions, TaskOptions
from lp_fx.tools.models import PRECISIONS, quantize_weights
from lp_fx.tools.options import option


@dataclass(frozen=True)
class EvalArgs(PairedModelArgs):
    """``lp-fx eval``'s options."""

    scoring: TaskOptions = option(factory=TaskOptions)
    windows: PerplexityOptions = option(factory=PerplexityOptions)
    pairs: list[str] = option(factory=list, action="append", metavar="SPEC")
    """a pairing to compare with the baseline (repeatable): a range START:END (e.g. 14:28), pairs like
    14-15,20-21, or a plan JSON from `lp-fx plan`"""
    checkpoint: list[str] = option(factory=list, action="append", metavar="DIR")
    """a fine-tuned pairing from `lp-fx finetune` to compare as well (repeatable); its trained tensors are
    loaded for its column only"""
    quantize: str = option("fp32", choices=PRECISIONS)
    """weights, one of fp32, int8; int8: torchao Int8WeightOnlyConfig on every linear, applied after loading"""
    fuse: bool = option(False)
    """fuse=True: run each pair's GEMMs batched (one device; same results, fewer GEMMs)"""
    out: str = option(str(RESULTS / "eval.json"))
    """JSON results (folders are created)"""


def register(subparsers: argparse._SubParsersAction) -> None:
    add_command(
        subparsers, "eval", "perplexity and task accuracy (lm-evaluation-harness): baseline and pairings, with retention", EvalArgs, run,
    )


def run(args: argparse.Namespace) -> None:
    if args.checkpoint and args.quantize != "fp32":
        raise ValueError(
            f"--checkpoint cannot be combined with --quantize {args.quantize}: the fine-tuned fp32 tensors are "
            "loaded into the model's weights, which quantizing replaces; evaluate checkpoints in fp32"
        )
    writable(args.out)
    loaded, data_dir = options.load(args)
    pairings, checkpoints = _eval_pairings(args, loaded)
    spec = eval_spec(args, data_dir)
    prepared = evaluate.prepare(loaded.tokenizer, spec)
    quantize_weights(loaded.model, args.quantize)
    say(f"model {loaded.name} ({loaded.num_layers} layers, {args.quantize} weights); "
        f"items per task: {prepared.sizes()}")
    results = {}
    for pairing in pairings:
        with finetuned(loaded.model, checkpoints.get(pairing)):
            results[pairing.name] = evaluate.measure(
                loaded.model, loaded.tokenizer, pairing, prepared, args.mode, args.inner, not args.no_progress,
                fuse=args.fuse,
            )
    names = [pairing.name for pairing in pairings]
    say(format_table(names, results))
    write_results(
        {
            "model": loaded.name,
            "num_layers": loaded.num_layers,
            "mode": args.mode,
            "fuse": args.fuse,
            "quantize": args.quantize,
            "spec": spec_record(spec),
            "sizes": prepared.sizes(),
            "task_scorer": _task_scorer(prepared),
            "pairings": [
                {
                    **pairing.to_json(),
                    "results": results[pairing.name],
                    "retention": retention.retention(results[pairing.name], results["baseline"]),
                }
                for pairing in pairings
            ],
        },
        args.out,
    )


def _task_scorer(prepared: evaluate.PreparedEval) -> str | None:
    """What scored the tasks (None: no task was asked for)."""
    return None if prepared.tasks is None else f"lm-evaluation-harness {version('lm_eval')}"


def _eval_pairings(args: argparse.Namespace, loaded: object) -> tuple[list[Pairing], dict[Pairing, str]]:
    """The columns to measure, every one checked against the model before anything is measured:
    the baseline, each ``--pairs`` and each ``--checkpoint`` (and the checkpoint it loads from)."""
    pairings = [BASELINE] + [Pairing.parse(spec, loaded.num_layers) for spec in args.pairs]
    checkpoints = {Pairing.from_checkpoint(read_pairing(d), d): d for d in args.checkpoint}
    pairings += list(checkpoints)
    names = [pairing.name for pairing in pairings]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"pairing {twice[0]!r} is given twice: give each --pairs / --checkpoint once")
    for pairing in pairings:
        check_pairing(loaded.model, pairing, args.mode, fuse=args.fuse)
    for directory in checkpoints.values():
        with finetuned(loaded.model, directory):  # every check of load_finetuned; the model is restored
            pass
    return pairings, checkpoints
