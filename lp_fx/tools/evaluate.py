"""Accuracy cost of pairing: perplexity (ours), task accuracy (lm-evaluation-harness), retention.

Perplexity takes a ``LogitsFn`` (token ids ``(B, T)`` → logits ``(B, T, V)``), so the same code
measures a plain model, a hand-written reference, or the model compiled with the
``layer_parallel`` backend (:func:`compile_pairing`), which is what is served. Perplexity windows
are exactly ``window`` tokens, so Dynamo compiles one graph for them.

The tasks (ARC, PIQA, HellaSwag, WinoGrande, BoolQ, LAMBADA: the local copies as lm-eval tasks,
:mod:`lp_fx.tools.lm_eval_tasks`) are scored by lm-eval itself, through the same compiled model
(:class:`lp_fx.tools.lm_eval_model.LayerParallelLM`): its prompts, metrics and standard errors.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from lp_fx.config import LayerParallelError, Pair, Shuffle
from lp_fx.fx_utils import copy_graph_module
from lp_fx.tools import data, lm_eval_tasks

log = logging.getLogger(__name__)

LogitsFn = Callable[[torch.Tensor], torch.Tensor]

# Perplexity sets: WikiText-2 raw test, and the LAMBADA passages as text of another domain (fiction).
PPL_TEXTS: dict[str, Callable[[Path], str]] = {"wikitext": data.load_wikitext, "lambada_text": data.load_lambada_text}
TASKS: tuple[str, ...] = (*PPL_TEXTS, *lm_eval_tasks.LOCAL_TASKS)


# --------------------------------------------------------------------------- pairings and compile


@dataclass(frozen=True)
class Pairing:
    """A named set of layer pairs to evaluate, and optionally a shuffled range; neither is the baseline."""

    name: str
    pairs: tuple[Pair, ...] = ()
    modes: tuple[str, ...] | None = None
    shuffle: Shuffle | None = None

    @property
    def num_pairs(self) -> int:
        return len(self.pairs)

    def to_json(self) -> dict:
        out: dict = {"name": self.name, "pairs": [list(pair) for pair in self.pairs]}
        if self.modes is not None:
            out["modes"] = list(self.modes)
        if self.shuffle is not None:
            out["shuffle"] = {**asdict(self.shuffle), "order": list(self.shuffle.order)}
        return out


BASELINE = Pairing("baseline")


def compile_pairing(
    model: torch.nn.Module, pairing: Pairing, mode: str = "lp", inner: str = "eager", **options: Any
) -> LogitsFn:
    """``model`` through ``torch.compile`` with the layer_parallel backend for ``pairing``, as a
    ``LogitsFn`` (no KV cache); see :func:`paired_forward`."""
    forward = paired_forward(model, pairing, mode, inner, **options)
    return lambda input_ids: forward(input_ids=input_ids, use_cache=False).logits


def paired_forward(
    model: torch.nn.Module, pairing: Pairing, mode: str = "lp", inner: str = "eager", **options: Any
) -> Callable[..., Any]:
    """``model.forward`` compiled with a strict layer_parallel backend for ``pairing``: the same
    arguments and outputs, so it serves scoring and ``generate`` alike.

    ``mode`` applies to pairs without a mode of their own. Dynamo's caches are reset first so
    that each pairing gets fresh graphs. The backend runs with ``strict=True`` and every call that
    compiled new graphs checks their reports: a silently unpaired (or unshuffled) model would be
    measured as the baseline. More backend ``options`` (``fuse=True``) may be given.
    """
    torch._dynamo.reset()
    backend = make_backend(pairing, mode, inner, **options)
    compiled = torch.compile(model.forward, backend=backend)

    def forward(*args: Any, **kwargs: Any) -> Any:
        seen = len(backend.reports)
        out = compiled(*args, **kwargs)
        if len(backend.reports) > seen:
            check_rewritten(backend.reports[seen:], pairing, mode)
        return out

    return forward


class PairingSwitch:
    """``model``'s forward traced by Dynamo once and compiled for one pairing after another (no KV
    cache, like :func:`compile_pairing`): :meth:`set_pairing` runs a strict layer_parallel
    backend on the graphs Dynamo captured, so a new pairing costs the rewrite and the ``inner``
    compile, not Dynamo's trace of the model (about 0.1 s against 10 s on SmolLM2-135M).

    Dynamo's caches are not reset here (a gated graph compiled before keeps working); a call
    that makes Dynamo capture a new graph compiles it for the current pairing."""

    def __init__(self, model: torch.nn.Module, inner: str = "eager") -> None:
        self.inner = inner
        self._graphs: list[tuple[torch.fx.GraphModule, list]] = []
        self._compiled: list[Callable] = []
        self._backend: Any = None
        self._pairing, self._mode = BASELINE, "lp"
        self._forward = torch.compile(model.forward, backend=self._capture)

    def set_pairing(self, pairing: Pairing, mode: str = "lp") -> None:
        """Serve ``pairing`` from now on (``mode`` for pairs without a mode of their own)."""
        self._backend = make_backend(pairing, mode, self.inner)
        self._pairing, self._mode = pairing, mode
        self._compiled = [self._compile(gm, example_inputs) for gm, example_inputs in self._graphs]

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """A ``LogitsFn`` of the current pairing."""
        if self._backend is None:
            raise ValueError("PairingSwitch: call set_pairing before scoring")
        return self._forward(input_ids=input_ids, use_cache=False).logits

    def _capture(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        index = len(self._graphs)
        self._graphs.append((gm, list(example_inputs)))
        self._compiled.append(self._compile(gm, example_inputs))
        return lambda *args: self._compiled[index](*args)

    def _compile(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        seen = len(self._backend.reports)
        compiled = self._backend(copy_graph_module(gm), example_inputs)  # the backend rewrites the graph it is given
        check_rewritten(self._backend.reports[seen:], self._pairing, self._mode)
        return compiled


def make_backend(pairing: Pairing, mode: str, inner: str, **options: Any) -> object:
    """A strict backend for one pairing (more backend ``options`` may be added, e.g. ``mesh``);
    ``mode`` for pairs without a mode of their own."""
    from lp_fx import LayerParallel

    options = {"mode": mode, "inner": inner, "strict": True, **options}
    if pairing.shuffle is not None:
        options["shuffle"] = asdict(pairing.shuffle)
    if pairing.modes is not None:
        options["modes"] = list(pairing.modes)
    return LayerParallel(options, pairs=[list(pair) for pair in pairing.pairs])


def check_pairing(model: torch.nn.Module, pairing: Pairing, mode: str = "lp", **options: Any) -> None:
    """Refuse, before anything is measured, a pairing that :func:`compile_pairing` would refuse for
    this model: the backend's own checks of its options (:mod:`lp_fx.config`: consecutive, disjoint,
    modes, ``options``), then every layer index against the model's layer count."""
    config = make_backend(pairing, mode, "eager", **options).config
    num_layers = model.config.num_hidden_layers
    for pair in config.pairs:
        if pair[1] >= num_layers:
            raise out_of_range(f"{pairing.name}: pair {pair}", num_layers)


def out_of_range(what: str, num_layers: int) -> LayerParallelError:
    """The error for layers past the end of a model with ``num_layers`` layers."""
    return LayerParallelError(
        f"{what} is out of range: the model has {num_layers} layers, valid indices 0..{num_layers - 1}"
    )


def check_rewritten(reports: Sequence, pairing: Pairing, mode: str) -> None:
    """Refuse to measure (or train) a graph in which the pairing was not applied as asked."""
    done = {tuple(pair): how for report in reports for pair, how in report.pairs_rewritten}
    wanted = zip(pairing.pairs, pairing.modes or (mode,) * pairing.num_pairs)
    wrong: list = [(pair, how) for pair, how in wanted if done.get(tuple(pair)) != how]
    shuffle = pairing.shuffle
    if shuffle is not None and all(report.shuffled != shuffle.order for report in reports):
        wrong.append(("shuffle", shuffle.order))
    if wrong:
        summary = "; ".join(report.summary() for report in reports)
        raise RuntimeError(f"pairing {pairing.name!r}: not rewritten as asked: {wrong} ({summary})")


def eager_logits(model: torch.nn.Module) -> LogitsFn:
    """The plain model as a ``LogitsFn`` (no compile)."""
    return lambda input_ids: model(input_ids=input_ids, use_cache=False).logits


# --------------------------------------------------------------------------------------- perplexity


def make_windows(token_ids: Sequence[int] | torch.Tensor, window: int) -> torch.Tensor:
    """Non-overlapping windows ``(N, window)`` of the token stream; the remainder is dropped."""
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    count = ids.numel() // window
    if count == 0:
        raise ValueError(f"window {window}: the text has {ids.numel()} tokens, fewer than one window; "
                         f"give a window of at most {ids.numel()} tokens")
    return ids[: count * window].view(count, window)


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
    """A perplexity text (WikiText-2 raw test by default) tokenized once, cut into windows, one part selected."""
    ids = tokenizer.encode(PPL_TEXTS[text](data_dir), add_special_tokens=False)
    return split_windows(make_windows(ids, window), split, count)


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
    and the tasks, scored by lm-evaluation-harness through :class:`~lp_fx.tools.lm_eval_model.LayerParallelLM`
    (lm-eval is loaded only when there are tasks)."""
    if prepared.tasks is None:
        return run_eval(compile_pairing(model, pairing, mode, inner, **options), prepared, progress)
    from lp_fx.tools.lm_eval_model import LayerParallelLM

    lm = LayerParallelLM(
        model, tokenizer=tokenizer, pairs=pairing, mode=mode, inner=inner, batch_size=prepared.batch_size, **options
    )
    return {**run_eval(lm.paired_logits, prepared, progress), **lm_eval_tasks.run_suite(lm, prepared.tasks)}


# ---------------------------------------------------------------------------------- retention

HIGHER_IS_BETTER = {"acc", "acc_norm"}


def metric_values(results: dict) -> dict[tuple[str, str], float]:
    """``{(task, metric): value}`` for every reported metric (sizes left out)."""
    return {
        (task, metric): float(value)
        for task, metrics in results.items()
        for metric, value in metrics.items()
        if metric in HIGHER_IS_BETTER or metric == "ppl"
    }


def retention(results: dict, baseline: dict) -> dict:
    """Per-metric ratio ``LP / baseline`` and the mean over the accuracy metrics.

    For perplexity the ratio is reported as is (above 1 is worse); the mean ``acc`` retention
    averages the tasks' ``acc`` ratios, as DESIGN.md §5 asks, with its standard error
    (:func:`acc_retention_stderr`) when the tasks give one.
    """
    ours, base = metric_values(results), metric_values(baseline)
    ratios = {
        f"{task}/{metric}": value / base[(task, metric)]
        for (task, metric), value in ours.items()
        if base.get((task, metric))
    }
    accs = [value for key, value in ratios.items() if key.endswith("/acc")]
    norms = [value for key, value in ratios.items() if key.endswith("/acc_norm")]
    summary: dict[str, Any] = {"per_metric": ratios}
    if accs:
        summary["mean_acc"] = sum(accs) / len(accs)
        stderr = acc_retention_stderr(results, baseline)
        if stderr is not None:
            summary["mean_acc_stderr"], summary["mean_acc_stderr_paired"] = stderr
    if norms:
        summary["mean_acc_norm"] = sum(norms) / len(norms)
    return summary


def acc_retention_stderr(results: dict, baseline: dict) -> tuple[float, bool] | None:
    """The standard error of the mean ``acc`` retention (mean over the tasks of ``acc`` /
    baseline ``acc``), and whether it is paired; None when a task gives no error.

    Each task's ratio r = p / b is linearised (delta method): its error is that of
    ``p − r·b`` over the baseline's ``b``. Paired: from the per-item accuracies when both sides
    kept them for the same items (``items``, see :func:`lp_fx.tools.lm_eval_tasks.run_suite`):
    the two are scored on the same items and mostly agree, which a per-item difference sees.
    Otherwise from the two standard errors as if independent, which overstates it.
    """
    tasks = [task for task, metrics in results.items()
             if "acc" in metrics and baseline.get(task, {}).get("acc")]
    if not tasks:
        return None
    paired = all(_same_items(results[task], baseline[task]) for task in tasks)
    variances = []
    for task in tasks:
        ours, base = results[task], baseline[task]
        ratio = ours["acc"] / base["acc"]
        if paired:
            variance = _mean_variance([p - ratio * b for p, b in zip(ours["items"]["acc"], base["items"]["acc"])])
        elif ours.get("acc_stderr") is not None and base.get("acc_stderr") is not None:
            variance = ours["acc_stderr"] ** 2 + (ratio * base["acc_stderr"]) ** 2
        else:
            return None
        variances.append(variance / base["acc"] ** 2)
    return math.sqrt(sum(variances)) / len(tasks), paired


def _same_items(ours: dict, base: dict) -> bool:
    """Whether both kept per-item accuracies, one per item, for the same items (a record whose lists
    disagree is not paired: its error is taken as independent rather than from a truncated pairing)."""
    if "items" not in ours or "items" not in base:
        return False
    docs = ours["items"]["doc_id"]
    return docs == base["items"]["doc_id"] and len(ours["items"]["acc"]) == len(base["items"]["acc"]) == len(docs)


def _mean_variance(values: Sequence[float]) -> float:
    """The variance of the mean of ``values`` (sample variance / n)."""
    n = len(values)
    mean = sum(values) / n
    return sum((v - mean) ** 2 for v in values) / (n - 1) / n if n > 1 else 0.0
