"""What an evaluation measures, one declaration for ``lp-fx eval``, ``lp-fx sweep`` and ``lp-fx
frontier`` (which embed it) and for :class:`lp_fx.tools.evaluation.scoring.EvalSpec`'s defaults."""

from __future__ import annotations

from dataclasses import dataclass

from lp_fx.tools.evaluation.scoring import TASKS, EvalSpec
from lp_fx.tools.options import option, positive_int


@dataclass(frozen=True)
class TaskOptions:
    """The tasks scored and their subsets."""

    tasks: str = option(",".join(TASKS))
    """comma-separated task names: wikitext and lambada_text (perplexity), arc_easy, arc_challenge, piqa,
    hellaswag, winogrande, boolq, lambada (lm-evaluation-harness); the frontier also takes 'none'"""
    limit: int | None = option(EvalSpec.limit, parse=positive_int)
    """items per task (fixed-seed subset)"""
    seed: int = option(EvalSpec.seed, parse=int)
    """seed of the --limit subsets"""
    batch_size: int = option(EvalSpec.batch_size, parse=positive_int)
    """batch size for task scoring"""


@dataclass(frozen=True)
class PerplexityOptions:
    """Which perplexity windows are measured."""

    split: str = option(EvalSpec.ppl_split, choices=("all", "calib", "heldout"))
    """perplexity windows: all, the first half (calib) or the second half (heldout)"""
    ppl_windows: int | None = option(EvalSpec.ppl_windows, parse=positive_int)
    """use this many evenly spaced windows of the split (default: all)"""
