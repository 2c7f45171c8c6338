"""The frontier's speed measurements: decode tokens/s on one device, and in llama.cpp.

One device (:class:`SpeedBench`): the unpaired model, and each pairing with and without ``fuse=True``
(the frontier gives a budget's contiguous and planned pairings together, so they share one unpaired
copy), each a copy of the model compiled once and warmed up (:func:`lp_fx.tools.timing.compile_and_warm_up`),
then timed interleaved round after round (:func:`lp_fx.tools.timing.time_interleaved`). Only the
decode step is compiled (:func:`lp_fx.tools.timing.decode_steps_through`: the prompt runs eagerly),
which halves each variant's compile and leaves the decode tokens/s as it was; ratios are
medians of per-round ratios to the unpaired model (:func:`lp_fx.tools.timing.ratio_to_first`), so a
slow spell of a shared machine hits every variant alike. Dynamo's caches are reset before each timed
run; the unpaired graph is then compiled again but found in Inductor's on-disk graph cache (its compile
seconds are recorded, so this shows).

A compile is mostly one Python thread, so with Inductor and the model's ``source`` known, half of the
paired variants are compiled ahead in a spawned process (:func:`compile_ahead`) while this process
compiles the others; once it is done, this process compiles those too and finds their graphs in
Inductor's on-disk cache. Every variant is still compiled, checked and timed here; the record says
which were compiled ahead, whether their graphs were found, and how long this process waited.

llama.cpp (:class:`LlamaCppBench`): an ``lp`` pairing is exported as a GGUF
(:func:`lp_fx.tools.export.export`), timed against the unpaired export (made once per run) with
:func:`lp_fx.tools.llamacpp.bench`, and removed.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from lp_fx.tools.bench_single import SingleVariant
from lp_fx.tools.timing import PROMPT, compile_and_warm_up, compile_variant, generate, ratio_to_first, time_interleaved
from lp_fx.tools.evaluate import Pairing, check_rewritten

log = logging.getLogger(__name__)

UNPAIRED, PAIRED, FUSED = "unpaired", "paired", "paired + fuse"


def unpaired_variant(inner: str) -> SingleVariant:
    """The unpaired model: plain ``torch.compile`` for Inductor, else the backend with no pairs in
    front of ``inner``."""
    return SingleVariant(UNPAIRED, None if inner == "inductor" else {"inner": inner})


def paired_variants(pairing: Pairing, backend_options: dict, inner: str) -> dict[str, SingleVariant]:
    """The pairing and the pairing fused (by kind: :data:`PAIRED`, :data:`FUSED`), strict so that
    nothing is silently left out; named after the pairing, so several pairings can be timed together."""
    paired = {**backend_options, "inner": inner, "strict": True}
    return {PAIRED: SingleVariant(f"{pairing.name}: {PAIRED}", paired),
            FUSED: SingleVariant(f"{pairing.name}: {FUSED}", {**paired, "fuse": True})}


def compile_ahead(source: str, options: Sequence[dict], tokens: int, threads: int) -> None:
    """In a spawned process: load the model at ``source``, compile each of ``options`` as
    :class:`SpeedBench` does (decode step only) and run the same warm-up generation, so that the
    graphs are in Inductor's on-disk cache when the timing process compiles them. ``threads``: the
    timing process's intra-op threads (Inductor's CPU kernels, and so its cache keys, depend on it)."""
    from lp_fx.tools.models import load_model

    torch.set_num_threads(threads)
    loaded = load_model(source, progress=False)
    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False, cache_size_limit=64):
        for variant_options in options:
            torch._dynamo.reset()
            copy_, _ = compile_variant(loaded.model, variant_options, decode_only=True)
            generate(copy_, ids, tokens)
            del copy_


class AheadCompile:
    """A spawned process running :func:`compile_ahead` for some variants; :meth:`wait` joins it
    (a failed process is logged, and the variants are then simply compiled here)."""

    def __init__(self, source: str, variants: Sequence[SingleVariant], tokens: int) -> None:
        self.variants = list(variants)
        context = multiprocessing.get_context("spawn")
        self.process = context.Process(target=compile_ahead,
                                       args=(source, [v.options for v in variants], tokens, torch.get_num_threads()))
        self.process.start()

    def wait(self) -> float:
        """Seconds waited for the process to end."""
        began = time.monotonic()
        self.process.join()
        if self.process.exitcode != 0:
            log.warning("compiling %s ahead failed (exit code %s); compiling them here",
                        [v.name for v in self.variants], self.process.exitcode)
        return time.monotonic() - began

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()


def fx_graph_cache_hits() -> int:
    """Inductor's count of graphs found in its on-disk cache, in this process so far."""
    return torch._dynamo.utils.counters["inductor"]["fxgraph_cache_hit"]


@dataclass
class Compiles:
    """Seconds each variant took to compile (and warm up) here, whether Inductor found its graph
    in the on-disk cache, the variants compiled ahead, and the seconds waited for them."""

    seconds: dict[str, float] = field(default_factory=dict)
    found: dict[str, bool] = field(default_factory=dict)
    ahead: list[str] = field(default_factory=list)
    waited_s: float = 0.0

    def ahead_record(self, kinds: dict[str, SingleVariant]) -> dict:
        """What a pairing's speed record says of its variants compiled ahead (nothing if none were)."""
        if not self.ahead:
            return {}
        return {"compiled_ahead": {kind: {"graph_found_in_cache": self.found[v.name]}
                                   for kind, v in kinds.items() if v.name in self.ahead},
                "waited_for_ahead_s": self.waited_s}


@dataclass
class SpeedBench:
    """Decode speed of pairings on one device against the unpaired model, in one interleaved run.
    ``source``: where the model was loaded from (:func:`lp_fx.tools.models.load_model`), which
    lets a spawned process compile half of the paired variants ahead (see the module doc)."""

    tokenizer: object
    inner: str = "inductor"
    tokens: int = 32
    rounds: int = 5
    llamacpp: "LlamaCppBench | None" = None
    source: str | None = None

    def measure(self, model: torch.nn.Module, pairings: Sequence[tuple[Pairing, dict]]) -> list[dict]:
        """For each ``(pairing, backend options)``: ``{"speed": …}`` and, for an all-``lp`` pairing
        with llama.cpp on, ``{"llamacpp": …}``; the pairings are timed together (:meth:`one_device`)."""
        out = [{"speed": speed} for speed in self.one_device(model, pairings)]
        for (pairing, _), record in zip(pairings, out):
            if self.llamacpp is not None and set(pairing.modes or ("lp",)) == {"lp"}:
                record["llamacpp"] = self.llamacpp.ratio(model, pairing)
        return out

    def _ahead(self, paired: Sequence[SingleVariant]) -> AheadCompile | None:
        """The last half of the paired variants compiled ahead, when that can help: Inductor with
        its on-disk graph cache, the model's source known, and two variants or more."""
        if self.source is None or self.inner != "inductor" or len(paired) < 2:
            return None
        if not torch._inductor.config.fx_graph_cache:
            return None
        return AheadCompile(self.source, paired[len(paired) - len(paired) // 2:], self.tokens)

    def _compile_all(
        self, model: torch.nn.Module, todo: Sequence[SingleVariant], ids: torch.Tensor, note: Callable
    ) -> tuple[dict[str, torch.nn.Module], "Compiles"]:
        """Each variant compiled in its one warm-up generation (on CPU nothing records on first
        calls, unlike CUDA graphs), so that it is warm when its rounds start; those compiled ahead
        (:meth:`_ahead`) after the others and after the process compiling them has ended."""
        ahead = self._ahead(todo[1:])
        compiles = Compiles(ahead=[variant.name for variant in ahead.variants] if ahead else [])
        compiled: dict[str, torch.nn.Module] = {}

        def compile_each(variants: Sequence[SingleVariant]) -> None:
            for variant in variants:
                began, hits = time.monotonic(), fx_graph_cache_hits()
                compiled.update(compile_and_warm_up(model, [variant], ids, self.tokens, note, warm_ups=1,
                                                    decode_only=True))
                compiles.seconds[variant.name] = round(time.monotonic() - began, 1)
                compiles.found[variant.name] = fx_graph_cache_hits() > hits

        try:
            compile_each([variant for variant in todo if variant.name not in compiles.ahead])
            if ahead:
                compiles.waited_s = round(ahead.wait(), 1)
                compile_each(ahead.variants)
        finally:
            if ahead:
                ahead.stop()
        return compiled, compiles

    def one_device(self, model: torch.nn.Module, pairings: Sequence[tuple[Pairing, dict]]) -> list[dict]:
        """One record per pairing: its paired and fused variants against ONE unpaired copy, every
        variant compiled once and all timed interleaved in the same rounds (so two pairings of a
        budget share the unpaired copy's compile and rounds, and are compared on the same footing)."""
        names = [pairing.name for pairing, _ in pairings]
        if len(set(names)) < len(names):  # the variants are named after their pairings
            raise ValueError(f"pairings timed together need distinct names, got {names}")
        ids = self.tokenizer(PROMPT, return_tensors="pt").input_ids
        unpaired = unpaired_variant(self.inner)
        own = [paired_variants(pairing, options, self.inner) for pairing, options in pairings]
        todo = [unpaired, *(variant for kinds in own for variant in kinds.values())]
        pairing_of = {variant.name: pairing for (pairing, _), kinds in zip(pairings, own) for variant in kinds.values()}

        def note(variant: SingleVariant, copy_: torch.nn.Module, backend: Any) -> None:
            if variant is not unpaired:
                check_rewritten(backend.reports, pairing_of[variant.name], "lp")
                variant.graph_gemms = [report.gemms for report in backend.reports]

        with torch._dynamo.config.patch(automatic_dynamic_shapes=False, cache_size_limit=64):
            torch._dynamo.reset()
            compiled, compiles = self._compile_all(model, todo, ids, note)
            time_interleaved(compiled, todo, ids, self.tokens, self.rounds)
            torch._dynamo.reset()
        del compiled
        gc.collect()
        records = []
        for (pairing, _), kinds in zip(pairings, own):
            mine = {UNPAIRED: unpaired, **kinds}
            record = {
                "inner": self.inner, "compiled": "decode step (prompt eager)", "tokens": self.tokens,
                "rounds": self.rounds, "prompt": PROMPT,
                "ratio": {kind: ratio_to_first(v, unpaired) for kind, v in kinds.items()},
                "tokens_per_s": {kind: v.tokens_per_s for kind, v in mine.items()},
                "median_tokens_per_s": {kind: statistics.median(v.tokens_per_s) for kind, v in mine.items()},
                "compile_s": {kind: compiles.seconds[v.name] for kind, v in mine.items()},
                "gemms_per_graph": {kind: v.graph_gemms for kind, v in kinds.items()},
                "timed_with": [other.name for other, _ in pairings if other is not pairing],
                **compiles.ahead_record(kinds),
            }
            log.info("speed %s: %s (compile %s s)", pairing.name, record["ratio"], record["compile_s"])
            records.append(record)
        return records


@dataclass
class LlamaCppBench:
    """Exports timed in llama.cpp against the unpaired export, made once into ``folder``."""

    folder: Path
    source: Any  # lp_fx.tools.export.Source
    threads: int
    tokens: int = 32
    rounds: int = 5
    dtype: str = "f32"

    def _export(self, model: torch.nn.Module, pairing: Pairing, name: str) -> Path:
        from lp_fx.tools.export import export

        path = self.folder / f"{name}.gguf"
        if not path.is_file():
            export(model, pairing.pairs, pairing.modes or ("lp",) * pairing.num_pairs, path, self.source,
                   dtype=self.dtype)
        return path

    def ratio(self, model: torch.nn.Module, pairing: Pairing) -> dict:
        """Decode tokens/s of ``pairing`` exported, against the unpaired export, interleaved."""
        from lp_fx.tools import llamacpp
        from lp_fx.tools.evaluate import BASELINE

        base = self._export(model, BASELINE, f"unpaired_{self.dtype}")
        paired = self._export(model, pairing, f"paired_{self.dtype}")
        try:
            result = llamacpp.bench([str(base), str(paired)], self.threads, self.tokens, self.rounds)
        finally:
            paired.unlink(missing_ok=True)
        speeds = {Path(m["path"]).stem: m["tokens_per_s"] for m in result["models"]}
        return {"ratio": result["ratio_to_unpaired"][str(paired)], "dtype": self.dtype, "threads": self.threads,
                "tokens": self.tokens, "rounds": self.rounds, "tokens_per_s": speeds,
                "layers": [m["layers"] for m in result["models"]]}
