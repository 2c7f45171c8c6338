"""Decode speed of compiled variants of one model, timed interleaved: what ``lp-fx bench`` (TP vs
TP + LP over ranks, :mod:`lp_fx.tools.cli.bench`) and ``lp-fx bench --single`` (one device,
:mod:`lp_fx.tools.speed.single`) share.

Each variant is a deep copy of the model whose forward is compiled its way, warmed up with the
same generation it is timed on; then the variants run one after the other, round after round, so
that noise from other load on the machine hits them alike, and each is compared with the first by
the median of per-round ratios. Decode tokens/s is one over the median time between consecutive
generated tokens (prefill excluded): a stall of the machine during a few steps (another process
taking a core) moves the mean step time of that generation but not its median.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from lp_fx.tools.console import say
from lp_fx.weights import resident_bytes
from lp_fx.backend import LayerParallel
from lp_fx.tools.models import load_model, quantize_weights

PROMPT = "The capital of France is"


class Speeds(Protocol):
    """Anything timed round after round: its decode tokens/s, one per round."""

    tokens_per_s: list[float]


class TimedVariant(Speeds, Protocol):
    """A compiled variant as the timing helpers see it (the benches' dataclasses add what they record)."""

    name: str
    options: dict | None
    resident_bytes: int | None


class _TokenClock:
    """A ``generate`` streamer that notes when each generated token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass

    def decode_tokens_per_s(self) -> float:
        """One over the median decode step time (see the module docstring)."""
        return 1.0 / statistics.median(b - a for a, b in zip(self.times, self.times[1:]))


def generate(model: torch.nn.Module, ids: torch.Tensor, tokens: int) -> tuple[torch.Tensor, float]:
    """Greedy generation with a static cache; returns the ids and the decode steps/s (tokens/s of
    each sequence of the batch).

    transformers' own compile of the forward is switched off (``disable_compile``): on CUDA, with a
    static cache, ``generate`` would otherwise wrap the model in ``torch.compile(mode="reduce-overhead")``,
    whose Dynamo traces through the variant's compiled forward and compiles it its own way, so every
    variant would time transformers' compile instead of its own."""
    clock = _TokenClock()
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
            cache_implementation="static", streamer=clock, disable_compile=True,
        )
    return out, clock.decode_tokens_per_s()


def room_for_variants() -> None:
    """Dynamo's cache limits raised for several compiled copies of one model in a process."""
    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.accumulated_cache_size_limit = 1024


def static_graphs_per_variant() -> None:
    """Dynamo settings for timing several copies whose whole forward is compiled: each its own
    static graphs (prefill and decode), and room for all. Not for decode-only copies
    (:func:`decode_steps_through`), which need automatic dynamic shapes."""
    torch._dynamo.config.automatic_dynamic_shapes = False
    room_for_variants()


def compile_variant(model: torch.nn.Module, options: dict | None, cudagraphs: bool = False,
                    decode_only: bool = False):
    """A copy of ``model`` whose forward is compiled with the ``layer_parallel`` backend and
    ``options``, and that backend; ``options`` None: plain ``torch.compile`` (CUDA graphs with
    ``cudagraphs``) and no backend. ``decode_only``: see :func:`decode_steps_through`."""
    copy_ = copy.deepcopy(model)
    backend = None if options is None else LayerParallel(options)
    if backend is None:
        compiled = torch.compile(copy_.forward, mode="reduce-overhead" if cudagraphs else None)
    else:
        compiled = torch.compile(copy_.forward, backend=backend)
    copy_.forward = decode_steps_through(compiled, copy_.forward) if decode_only else compiled
    return copy_, backend


def decode_steps_through(compiled: Callable, eager: Callable) -> Callable:
    """A forward that runs one-token calls (the decode steps) through ``compiled`` and the prompt
    through ``eager``, the model's own uncompiled forward.

    Decode tokens/s excludes the prefill, so only the decode graph is timed; compiling just it
    halves the compile time of a timed variant (the prefill is a second whole-model graph). The
    prompt's KV cache then comes from the unpaired model, which changes the tokens generated but
    not the work of a decode step (``generate`` runs a fixed number of steps, the cache layout is
    the same), so the texts of such variants are not compared.

    Compile such a forward with Dynamo's automatic dynamic shapes on (its default; not under
    :func:`static_graphs_per_variant`): a decode step's tensors keep their shapes from step to step,
    so nothing of them becomes dynamic, but a cache may keep a Python int that grows every step
    (Gemma 3's sliding-window layers count their tokens in one), which becomes dynamic at its first
    change instead of compiling a graph per step.
    """

    def forward(*args: Any, **kwargs: Any) -> Any:
        ids = kwargs["input_ids"] if "input_ids" in kwargs else (args[0] if args else None)
        return (compiled if ids is not None and ids.shape[-1] == 1 else eager)(*args, **kwargs)

    return forward


def load_prompted(args, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """``(loaded model, prompt ids)`` for a bench: ``args.model`` in ``dtype`` on ``device``, its
    weights at ``args.quantize``, and the ids of ``args.prompt``."""
    loaded = load_model(args.model, dtype)
    loaded.model.to(device)
    quantize_weights(loaded.model, args.quantize)
    return loaded, loaded.tokenizer(args.prompt, return_tensors="pt").input_ids.to(device)


def _nothing() -> None:
    pass


def compile_and_warm_up(
    model: torch.nn.Module,
    todo: Sequence[TimedVariant],
    ids: torch.Tensor,
    tokens: int,
    note: Callable[[TimedVariant, torch.nn.Module, object], None],
    warm_ups: int = 1,
    cudagraphs: bool = False,
    runs_here: Callable[[TimedVariant], bool] = lambda variant: True,
    after_each: Callable[[], None] = _nothing,
    decode_only: bool = False,
) -> dict[str, torch.nn.Module]:
    """Name -> compiled copy of each variant that ``runs_here``, after ``warm_ups`` generations
    (the first compiles); ``note(variant, copy, backend)`` records what the variant reports, and
    its resident weight bytes are recorded here. ``after_each`` runs after every variant (a barrier
    keeps ranks together). ``decode_only``: only the decode step is compiled (:func:`decode_steps_through`)."""
    compiled = {}
    for variant in todo:
        if runs_here(variant):
            copy_, backend = compile_variant(model, variant.options, cudagraphs, decode_only)
            for _ in range(warm_ups):
                generate(copy_, ids, tokens)
            variant.resident_bytes = resident_bytes(copy_, backend.weights if backend is not None else None)
            note(variant, copy_, backend)
            compiled[variant.name] = copy_
        after_each()
    return compiled


def time_interleaved(
    compiled: dict[str, torch.nn.Module],
    todo: Sequence[TimedVariant],
    ids: torch.Tensor,
    tokens: int,
    rounds: int,
    after_each: Callable[[], None] = _nothing,
) -> dict[str, torch.Tensor]:
    """Time every compiled variant once per round, in turn, for ``rounds`` rounds (each speed is
    appended to ``variant.tokens_per_s``); returns each variant's last generated ids. Each round
    starts one variant further along, so no variant always runs first (right after the last one's
    weights went through the caches) or last."""
    texts = {}
    for round_ in range(rounds):
        start = round_ % len(todo)
        for variant in [*todo[start:], *todo[:start]]:
            if variant.name in compiled:
                texts[variant.name], speed = generate(compiled[variant.name], ids, tokens)
                variant.tokens_per_s.append(speed)
            after_each()
    return texts


def ratio_to_first(variant: Speeds, first: Speeds) -> float:
    """Median over rounds of ``variant``'s speed / ``first``'s speed in the same round.

    Rounds are interleaved, so a slow spell of the machine hits both runs of a round alike;
    the per-round ratio cancels it where a ratio of medians would not.
    """
    return statistics.median(a / b for a, b in zip(variant.tokens_per_s, first.tokens_per_s))


def print_texts(tokenizer, texts: dict[str, torch.Tensor]) -> None:
    """Each variant's generated text, to check by eye that the variants agree."""
    for name, out in texts.items():
        say(f"[{name}] {tokenizer.decode(out[0], skip_special_tokens=True)!r}")
