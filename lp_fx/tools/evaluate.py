"""Accuracy cost of pairing: perplexity, zero-shot multiple choice, LAMBADA, retention.

Every metric takes a ``LogitsFn`` (token ids ``(B, T)`` → logits ``(B, T, V)``), so the same code
measures a plain model, a hand-written reference, or the model compiled with the
``layer_parallel`` backend (:func:`compile_pairing`), which is what is served.

Shapes are kept to a few fixed sizes (perplexity windows of exactly ``window`` tokens; requests
right-padded to power-of-two length buckets and a fixed batch size) so that Dynamo compiles a
handful of graphs rather than one per example. Right padding is exact for a causal model: no
position attends to the padding after it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from lp_fx.config import LayerParallelError, Pair, Shuffle
from lp_fx.tools import data

log = logging.getLogger(__name__)

LogitsFn = Callable[[torch.Tensor], torch.Tensor]

MIN_BUCKET = 32
# Perplexity sets: WikiText-2 raw test, and the LAMBADA passages as text of another domain (fiction).
PPL_TEXTS: dict[str, Callable[[Path], str]] = {"wikitext": data.load_wikitext, "lambada_text": data.load_lambada_text}
TASKS: tuple[str, ...] = (*PPL_TEXTS, *data.ALL_TASKS)


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
    """``model`` through ``torch.compile`` with the layer_parallel backend for ``pairing``.

    ``mode`` applies to pairs without a mode of their own. Dynamo's caches are reset first so
    that each pairing gets fresh graphs. The backend runs with ``strict=True`` and the first call
    checks its reports: a silently unpaired (or unshuffled) model would be measured as the baseline.
    More backend ``options`` (``fuse=True``) may be given.
    """
    torch._dynamo.reset()
    backend = make_backend(model, pairing, mode, inner, **options)
    compiled = torch.compile(model, backend=backend)
    checked = False

    def logits_fn(input_ids: torch.Tensor) -> torch.Tensor:
        nonlocal checked
        logits = compiled(input_ids=input_ids, use_cache=False).logits
        if not checked:
            check_rewritten(backend.reports, pairing, mode)
            checked = True
        return logits

    return logits_fn


def make_backend(model: torch.nn.Module, pairing: Pairing, mode: str, inner: str, **options: Any) -> object:
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
    config = make_backend(model, pairing, mode, "eager", **options).config
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
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    return Perplexity(math.exp(total / tokens), total, tokens, windows.shape[0])


# ------------------------------------------------------------------------ log-likelihood requests


@dataclass(frozen=True)
class TokenRequest:
    """Token ids of a context and of the continuation whose log-likelihood is scored."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclass(frozen=True)
class Score:
    loglikelihood: float
    greedy: bool


def encode_request(
    tokenizer: object, context: str, continuation: str, max_length: int = 1024
) -> TokenRequest:
    """Tokenize as lm-evaluation-harness does: encode ``context + continuation`` whole and split.

    Trailing spaces of the context move to the continuation; the context is cut from the left so
    that the model input (all tokens but the last) fits ``max_length``.
    """
    stripped = context.rstrip(" ")
    continuation = context[len(stripped) :] + continuation
    whole = tokenizer.encode(stripped + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(stripped, add_special_tokens=False)
    cont_ids = whole[len(context_ids) :]
    if not cont_ids:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens")
    keep = max(max_length + 1 - len(cont_ids), 1)
    return TokenRequest(tuple(whole[: len(context_ids)][-keep:]), tuple(cont_ids))


def _bucket(length: int) -> int:
    return max(MIN_BUCKET, 1 << (length - 1).bit_length())


@torch.no_grad()
def score_requests(
    logits_fn: LogitsFn,
    requests: Sequence[TokenRequest],
    batch_size: int = 8,
    pad_id: int = 0,
    desc: str = "loglikelihood",
    progress: bool = True,
) -> list[Score]:
    """Log-likelihood of each continuation given its context, and whether it is the greedy one.

    Requests with the same model input (e.g. one-token answers " no" / " yes" to one passage)
    share a forward pass. Inputs are sorted by length, batched and right-padded to a power-of-two
    bucket and to a full batch, so the input shapes repeat.
    """
    by_input: dict[tuple[int, ...], list[int]] = {}
    for index, request in enumerate(requests):
        by_input.setdefault(_model_input(request), []).append(index)
    inputs = sorted(by_input, key=len, reverse=True)
    batch_size = min(batch_size, max(len(inputs), 1))  # rows past the inputs would only be padding
    scores: list[Score | None] = [None] * len(requests)
    batches = [inputs[i : i + batch_size] for i in range(0, len(inputs), batch_size)]
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        logprobs = torch.log_softmax(logits_fn(_padded_batch(batch, batch_size, pad_id)).float(), -1)
        for row, tokens in enumerate(batch):
            for index in by_input[tokens]:
                scores[index] = _score_row(logprobs[row, : len(tokens)], requests[index])
    return scores  # type: ignore[return-value]


def _model_input(request: TokenRequest) -> tuple[int, ...]:
    return (request.context + request.continuation)[:-1]


def _padded_batch(inputs: Sequence[tuple[int, ...]], batch_size: int, pad_id: int) -> torch.Tensor:
    ids = torch.full((batch_size, _bucket(max(map(len, inputs)))), pad_id, dtype=torch.long)
    for row, tokens in enumerate(inputs):
        ids[row, : len(tokens)] = torch.tensor(tokens)
    return ids


def _score_row(logprobs: torch.Tensor, request: TokenRequest) -> Score:
    """Score from the log-probabilities of the request's (unpadded) input positions."""
    target = torch.tensor(request.continuation)
    rows = logprobs[-len(target) :]
    loglikelihood = rows.gather(1, target.unsqueeze(1)).sum().item()
    greedy = bool((rows.argmax(dim=-1) == target).all())
    return Score(loglikelihood, greedy)
# -------------------------------------------------------------------------------- task metrics


def mc_metrics(items: Sequence[data.MCItem], scores: Sequence[Score]) -> dict:
    """``acc`` (highest log-likelihood) and ``acc_norm`` (per character of the choice)."""
    flat = iter(scores)
    correct = correct_norm = 0
    for item in items:
        lls = [next(flat).loglikelihood for _ in item.requests]
        lengths = [len(continuation.lstrip(" ")) or 1 for _, continuation in item.requests]
        normed = [ll / length for ll, length in zip(lls, lengths)]
        correct += _argmax(lls) == item.gold
        correct_norm += _argmax(normed) == item.gold
    n = len(items)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n}


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def lambada_metrics(scores: Sequence[Score]) -> dict:
    """Last-word accuracy (every target token greedy) and perplexity of the target."""
    n = len(scores)
    return {
        "acc": sum(score.greedy for score in scores) / n,
        "ppl": math.exp(-sum(score.loglikelihood for score in scores) / n),
        "n": n,
    }


@dataclass
class EvalSpec:
    """What to evaluate; the same spec gives the same numbers."""

    data_dir: Path
    tasks: tuple[str, ...] = TASKS
    limit: int | None = None
    seed: int = 1234
    ppl_split: str = "all"
    ppl_windows: int | None = None
    window: int = 512
    batch_size: int = 8
    max_length: int = 1024


@dataclass
class PreparedEval:
    """Everything tokenized once, reused for each pairing."""

    windows: torch.Tensor | None
    other_windows: dict[str, torch.Tensor] = field(default_factory=dict)
    mc: dict[str, tuple[list[data.MCItem], list[TokenRequest]]] = field(default_factory=dict)
    lambada: list[TokenRequest] | None = None
    batch_size: int = 8
    pad_id: int = 0

    def sizes(self) -> dict[str, int]:
        out = {task: len(items) for task, (items, _) in self.mc.items()}
        if self.lambada is not None:
            out["lambada"] = len(self.lambada)
        if self.windows is not None:
            out["wikitext"] = int(self.windows.shape[0])
        out.update({name: int(w.shape[0]) for name, w in self.other_windows.items()})
        return out


def prepare(tokenizer: object, spec: EvalSpec) -> PreparedEval:
    """Read and tokenize the data that ``spec`` asks for (``wikitext`` is perplexity)."""
    if not spec.tasks:
        raise ValueError(f"no tasks given; expected some of {', '.join(TASKS)}")
    unknown = set(spec.tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; expected some of {', '.join(TASKS)}")
    prepared = PreparedEval(windows=None, batch_size=spec.batch_size, pad_id=_pad_id(tokenizer))
    if "wikitext" in spec.tasks:
        prepared.windows = wikitext_windows(
            tokenizer, spec.data_dir, spec.window, spec.ppl_split, spec.ppl_windows
        )
    for name in PPL_TEXTS:
        if name != "wikitext" and name in spec.tasks:
            prepared.other_windows[name] = wikitext_windows(
                tokenizer, spec.data_dir, spec.window, spec.ppl_split, spec.ppl_windows, text=name
            )
    for task, loader in data.MC_TASKS.items():
        if task in spec.tasks:
            items = data.subset(loader(spec.data_dir), spec.limit, spec.seed)
            requests = _encode_all(tokenizer, _flatten(items), spec.max_length)
            prepared.mc[task] = (items, requests)
    if "lambada" in spec.tasks:
        items = data.subset(data.load_lambada(spec.data_dir), spec.limit, spec.seed)
        pairs = [(item.context, item.target) for item in items]
        prepared.lambada = _encode_all(tokenizer, pairs, spec.max_length)
    return prepared


def _flatten(items: Iterable[data.MCItem]) -> list[tuple[str, str]]:
    return [request for item in items for request in item.requests]


def _encode_all(
    tokenizer: object, pairs: Sequence[tuple[str, str]], max_length: int
) -> list[TokenRequest]:
    return [encode_request(tokenizer, context, cont, max_length) for context, cont in pairs]


def _pad_id(tokenizer: object) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def run_eval(logits_fn: LogitsFn, prepared: PreparedEval, progress: bool = True) -> dict:
    """Every prepared metric for one model: ``{"wikitext": {...}, "arc_easy": {...}, …}``."""
    results: dict = {}
    if prepared.windows is not None:
        results["wikitext"] = perplexity(logits_fn, prepared.windows, "wikitext", progress).to_json()
    for name, windows in prepared.other_windows.items():
        results[name] = perplexity(logits_fn, windows, name, progress).to_json()
    for task, (items, requests) in prepared.mc.items():
        scores = score_requests(
            logits_fn, requests, prepared.batch_size, prepared.pad_id, task, progress
        )
        results[task] = mc_metrics(items, scores)
    if prepared.lambada is not None:
        scores = score_requests(
            logits_fn, prepared.lambada, prepared.batch_size, prepared.pad_id, "lambada", progress
        )
        results["lambada"] = lambada_metrics(scores)
    log.info("results: %s", results)
    return results


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
    averages the tasks' ``acc``, as DESIGN.md §5 asks.
    """
    ours, base = metric_values(results), metric_values(baseline)
    ratios = {
        f"{task}/{metric}": value / base[(task, metric)]
        for (task, metric), value in ours.items()
        if base.get((task, metric))
    }
    accs = [value for key, value in ratios.items() if key.endswith("/acc")]
    norms = [value for key, value in ratios.items() if key.endswith("/acc_norm")]
    summary = {"per_metric": ratios}
    if accs:
        summary["mean_acc"] = sum(accs) / len(accs)
    if norms:
        summary["mean_acc_norm"] = sum(norms) / len(norms)
    return summary
