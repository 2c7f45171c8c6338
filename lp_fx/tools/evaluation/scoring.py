"""Accuracy cost of pairing: perplexity (ours) and task accuracy (lm-evaluation-harness).

Perplexity takes a ``LogitsFn`` (token ids ``(B, T)`` → logits ``(B, T, V)``), so the same code
measures a plain model, a hand-written reference, or the model compiled with the
``layer_parallel`` backend (:func:`lp_fx.tools.evaluation.compiled.compile_pairing`), which is what is served. Perplexity windows
are exactly ``window`` tokens, so Dynamo compiles one graph for them.

The tasks (ARC, PIQA, HellaSwag, WinoGrande, BoolQ, LAMBADA: the local copies as lm-eval tasks,
:mod:`lp_fx.tools.evaluation.lm_eval_tasks`) are scored by lm-eval itself, through the same compiled model
(:class:`lp_fx.tools.evaluation.lm_eval_model.LayerParallelLM`): its prompts, metrics and standard errors.
Retention against the baseline is :mod:`lp_fx.tools.evaluation.retention`'s.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from lp_fx.pairing import Pairing
from lp_fx.tools import data
from lp_fx.tools.evaluation import lm_eval_tasks
from lp_fx.tools.evaluation.compiled import LogitsFn, compile_pairing

log = logging.getLogger(__name__)

# Perplexity sets: WikiText-2 raw test, and the LAMBADA passages as text of another domain (fiction).
PPL_TEXTS: dict[str, Callable[[Path], str]] = {"wikitext": data.load_wikitext, "lambada_text": data.load_lambada_text}
TASKS: tuple[str, ...] = (*PPL_TEXTS, *lm_eval_tasks.LOCAL_TASKS)


def make_windows(token_ids: Sequence[int] | torch.Tensor, window: int, prefix: Sequence[int] = ()) -> torch.Tensor:
    """Non-overlapping windows ``(N, window)`` of the token stream, each ``prefix`` and then
    ``window - len(prefix)`` tokens of the stream; the remainder is dropped."""
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    size = window - len(prefix)
    count = ids.numel() // size if size > 0 else 0
    if count == 0:
        raise ValueError(f"window {window}: the text has {ids.numel()} tokens, fewer than one window; "
                         f"give a window of at most {ids.numel() + len(prefix)} tokens")
    body = ids[: count * size].view(count, size)
    return torch.cat([torch.as_tensor(prefix, dtype=torch.long).expand(count, -1), body], dim=1)


def text_prefix(tokenizer: Any) -> list[int]:
    """The ids ``tokenizer`` puts before a text of its own accord: Gemma's ``<bos>``, which Gemma
    needs (without it its perplexity is several times higher); none for SmolLM2's tokenizer."""
    plain = tokenizer.encode("the", add_special_tokens=False)
    full = tokenizer.encode("the", add_special_tokens=True)
    starts = [i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain]
    return full[: starts[0]] if starts else []


def split_windows(windows: torch.Tensor, split: str, count: int | None = None) -> torch.Tensor:
    """The ``calib`` (first half), ``heldout`` (second half) or ``all`` windows.

    With ``count``, ``count`` windows evenly spaced over that part (deterministic).
    """
    half = windows.shape[0] // 2
    parts = {"all": windows, "calib": windows[:half], "heldout": windows[half:]}
    if split not in parts:
        raise ValueError(f"split {split!r}: expected one of {sorted(parts)}")
    part = parts[split]
    if part.shape[0] == 0:
        total, size = windows.shape
        raise ValueError(f"the {split} half of {total} window{'s' * (total != 1)} of {size} tokens is empty; "
                         "give a smaller window, or the split 'all'")
    if count is None or count >= part.shape[0]:
        return part
    index = torch.linspace(0, part.shape[0] - 1, count).round().long()
    return part[index]


def wikitext_windows(
    tokenizer: object, data_dir: Path, window: int = 512, split: str = "all", count: int | None = None,
    text: str = "wikitext",
) -> torch.Tensor:
    """A perplexity text (WikiText-2 raw test by default) tokenized once, cut into windows that each
    start as the tokenizer starts a text (:func:`text_prefix`), one part selected."""
    ids = tokenizer.encode(PPL_TEXTS[text](data_dir), add_special_tokens=False)
    return split_windows(make_windows(ids, window, text_prefix(tokenizer)), split, count)


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float
    tokens: int
    windows: int

    @classmethod
    def of(cls, nll: float, windows: torch.Tensor) -> "Perplexity":
        """From the NLL summed over ``windows``, each predicting its last ``T - 1`` tokens."""
        tokens = windows.shape[0] * (windows.shape[1] - 1)
        return cls(math.exp(nll / tokens), nll, tokens, windows.shape[0])

    def to_json(self) -> dict:
        return {"ppl": self.ppl, "nll": self.nll, "tokens": self.tokens, "windows": self.windows}


@torch.no_grad()
def perplexity(
    logits_fn: LogitsFn, windows: torch.Tensor, desc: str = "perplexity", progress: bool = True
) -> Perplexity:
    """exp(mean next-token NLL) over every window; each window predicts its last ``T - 1`` tokens."""
    total = 0.0
    for row in tqdm(windows, desc=desc, disable=not progress, leave=False):
        ids = row.unsqueeze(0)
        logits = logits_fn(ids).float()
        total += torch.nn.functional.cross_entropy(
            logits[0, :-1], ids[0, 1:], reduction="sum"
        ).item()
    return Perplexity.of(total, windows)


@dataclass
class EvalSpec:
    """What to evaluate; the same spec gives the same numbers. ``tasks`` are perplexity texts
    (:data:`PPL_TEXTS`) and local lm-eval tasks; ``limit`` items of each task, chosen by ``seed``."""

    data_dir: Path
    tasks: tuple[str, ...] = TASKS
    limit: int | None = None
    seed: int = 1234
    ppl_split: str = "all"
    ppl_windows: int | None = None
    window: int = 512
    batch_size: int = 8
    bootstrap_iters: int = lm_eval_tasks.BOOTSTRAP_ITERS


@dataclass
class PreparedEval:
    """Everything read once, reused for each pairing: perplexity windows (tokenized) and the
    lm-eval tasks (``None`` when no task is asked for)."""

    windows: dict[str, torch.Tensor] = field(default_factory=dict)
    tasks: lm_eval_tasks.TaskSuite | None = None
    batch_size: int = 8

    def sizes(self) -> dict[str, int]:
        out = dict(self.tasks.sizes) if self.tasks is not None else {}
        out.update({name: int(windows.shape[0]) for name, windows in self.windows.items()})
        return out


def prepare(tokenizer: object, spec: EvalSpec) -> PreparedEval:
    """Read (and tokenize) the data that ``spec`` asks for; unknown names are refused."""
    if not spec.tasks:
        raise ValueError(f"no tasks given; expected some of {', '.join(TASKS)}")
    unknown = [task for task in spec.tasks if task not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; expected some of {', '.join(TASKS)}")
    windows = {
        name: wikitext_windows(tokenizer, spec.data_dir, spec.window, spec.ppl_split, spec.ppl_windows, text=name)
        for name in PPL_TEXTS if name in spec.tasks
    }
    names = [task for task in spec.tasks if task in lm_eval_tasks.LOCAL_TASKS]
    tasks = lm_eval_tasks.load_suite(names, spec.data_dir, spec.limit, spec.seed, spec.bootstrap_iters) if names else None
    return PreparedEval(windows, tasks, spec.batch_size)


def run_eval(logits_fn: LogitsFn, prepared: PreparedEval, progress: bool = True) -> dict:
    """The perplexities of one model: ``{"wikitext": {...}, "lambada_text": {...}}``; the tasks
    are :func:`measure`'s."""
    results = {name: perplexity(logits_fn, windows, name, progress).to_json() for name, windows in prepared.windows.items()}
    log.info("results: %s", results)
    return results


def measure(
    model: torch.nn.Module, tokenizer: object, pairing: Pairing, prepared: PreparedEval, mode: str = "lp",
    inner: str = "eager", progress: bool = True, **options: Any,
) -> dict:
    """Every prepared metric of ``model`` under ``pairing``, compiled once: perplexity (:func:`run_eval`)
    and the tasks, scored by lm-evaluation-harness through :class:`~lp_fx.tools.evaluation.lm_eval_model.LayerParallelLM`
    (lm-eval is loaded only when there are tasks)."""
    if prepared.tasks is None:
        return run_eval(compile_pairing(model, pairing, mode, inner, **options), prepared, progress)
    from lp_fx.tools.evaluation.lm_eval_model import LayerParallelLM  # lazy: imports lm-eval, slow and often unused

    lm = LayerParallelLM(
        model, tokenizer=tokenizer, pairs=pairing, mode=mode, inner=inner, batch_size=prepared.batch_size, **options
    )
    return {**run_eval(lm.paired_logits, prepared, progress), **lm_eval_tasks.run_suite(lm, prepared.tasks)}
