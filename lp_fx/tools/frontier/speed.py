"""The frontier's speed measurements: decode tokens/s on one device, and in llama.cpp.

One device (:class:`SpeedBench`): the unpaired model, and each pairing with and without ``fuse=True``
(the frontier gives a budget's contiguous and planned pairings together, so they share one unpaired
copy), each a copy of the model compiled once and warmed up (:func:`lp_fx.tools.speed.timing.compile_and_warm_up`),
then timed interleaved round after round (:func:`lp_fx.tools.speed.timing.time_interleaved`). Only the
decode step is compiled (:func:`lp_fx.tools.speed.timing.decode_steps_through`: the prompt runs eagerly),
which halves each variant's compile and leaves the decode tokens/s as it was; ratios are
medians of per-round ratios to the unpaired model (:func:`lp_fx.tools.speed.timing.ratio_to_first`), so a
slow spell of a shared machine hits every variant alike. Dynamo's caches are reset before each timed
run; the unpaired graph is then compiled again but found in Inductor's on-disk graph cache (its compile
seconds are recorded, so this shows).

llama.cpp (:class:`LlamaCppBench`): an ``lp`` pairing is exported as a GGUF
(:func:`lp_fx.tools.export.write.export`), timed against the unpaired export (made once per run) with
:func:`lp_fx.tools.speed.llamacpp.time_ggufs`, and removed.
"""

from __future__ import annotations

import gc
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from lp_fx.pairing import BASELINE, Pairing
from lp_fx.tools.evaluation.compiled import check_rewritten
from lp_fx.tools.export.fold import Source
from lp_fx.tools.export.write import export
from lp_fx.tools.models import resolve_model_path
from lp_fx.tools.speed import llamacpp
from lp_fx.tools.speed.single import SingleVariant
from lp_fx.tools.speed.timing import PROMPT, compile_and_warm_up, ratio_to_first, time_interleaved

log = logging.getLogger(__name__)

UNPAIRED, PAIRED, FUSED, PRUNED = "unpaired", "paired", "paired + fuse", "pruned"


def unpaired_variant(inner: str, shared: dict | None = None) -> SingleVariant:
    """The unpaired model: plain ``torch.compile`` for Inductor, else (or with ``shared`` backend
    options, such as ``cudagraphs``) the backend with no pairs in front of ``inner``."""
    if inner == "inductor" and shared is None:
        return SingleVariant(UNPAIRED, None)
    return SingleVariant(UNPAIRED, {**(shared or {}), "inner": inner})


def pruned(pairing: Pairing) -> Pairing:
    """``pairing`` with one layer of each pair dropped (mode ``prune``)."""
    return Pairing(pairing.name, pairing.pairs, ("prune",) * len(pairing.pairs))


def paired_variants(
    pairing: Pairing, backend_options: dict, inner: str, shared: dict | None = None
) -> dict[str, SingleVariant]:
    """The pairing, the pairing fused and its pairs pruned (by kind: :data:`PAIRED`, :data:`FUSED`,
    :data:`PRUNED`), strict so that nothing is silently left out; named after the pairing, so several
    pairings can be timed together.

    The pruned variant (one layer of each pair dropped) has the paired model's depth, L − Δ/2, and
    none of a pair's extra work: its speed is the ideal a pairing can reach on one device, measured
    with the model's own head, embeddings and per-step overhead, where L / (L − Δ/2) counts layers only."""
    paired = {**(shared or {}), **backend_options, "inner": inner, "strict": True}
    return {PAIRED: SingleVariant(f"{pairing.name}: {PAIRED}", paired),
            FUSED: SingleVariant(f"{pairing.name}: {FUSED}", {**paired, "fuse": True}),
            PRUNED: SingleVariant(f"{pairing.name}: {PRUNED}", pruned(pairing).to_options(**(shared or {}), inner=inner,
                                                                                           strict=True))}


def layer_share(ideal: float, num_layers: int, pruned_layers: int) -> float:
    """The share of an unpaired decode step spent in its layers, from the pruned variant's speedup
    ``ideal``: dropping ``pruned_layers`` of ``num_layers`` alike layers saves that many layers' time."""
    return (1 - 1 / ideal) * num_layers / pruned_layers


@dataclass
class SpeedBench:
    """Decode speed of pairings on one device against the unpaired model, in one interleaved run."""

    tokenizer: object
    inner: str = "inductor"
    tokens: int = 32
    rounds: int = 5
    llamacpp: "LlamaCppBench | None" = None
    batch: int = 1
    """sequences decoded together (copies of the prompt)"""
    shared: dict | None = None
    """backend options of every variant, the unpaired one included (it is then the backend with no
    pairs, so every row is compiled alike): ``{"cudagraphs": True}`` on CUDA; None: none"""

    def measure(self, model: torch.nn.Module, pairings: Sequence[tuple[Pairing, dict]]) -> list[dict]:
        """For each ``(pairing, backend options)``: ``{"speed": …}`` and, for an all-``lp`` pairing
        with llama.cpp on, ``{"llamacpp": …}``; the pairings are timed together (:meth:`one_device`)."""
        out = [{"speed": speed} for speed in self.one_device(model, pairings)]
        for (pairing, _), record in zip(pairings, out):
            if self.llamacpp is not None and set(pairing.modes or ("lp",)) == {"lp"}:
                record["llamacpp"] = self.llamacpp.ratio(model, pairing)
        return out

    def one_device(self, model: torch.nn.Module, pairings: Sequence[tuple[Pairing, dict]]) -> list[dict]:
        """One record per pairing: its paired and fused variants against ONE unpaired copy, every
        variant compiled once and all timed interleaved in the same rounds (so two pairings of a
        budget share the unpaired copy's compile and rounds, and are compared on the same footing)."""
        names = [pairing.name for pairing, _ in pairings]
        if len(set(names)) < len(names):  # the variants are named after their pairings
            raise ValueError(f"pairings timed together need distinct names, got {names}")
        empty = [pairing.name for pairing, _ in pairings if not pairing.pairs]
        if empty:  # the unpaired model is timed anyway; a pairing without pairs has no ideal to measure
            raise ValueError(f"pairing {empty[0]!r} has no pairs: give pairs to time against the unpaired model")
        ids = self.tokenizer(PROMPT, return_tensors="pt").input_ids.to(model.device).repeat(self.batch, 1)
        unpaired = unpaired_variant(self.inner, self.shared)
        own = [paired_variants(pairing, options, self.inner, self.shared) for pairing, options in pairings]
        todo = [unpaired, *(variant for kinds in own for variant in kinds.values())]
        pairing_of = {variant.name: pruned(pairing) if kind == PRUNED else pairing
                      for (pairing, _), kinds in zip(pairings, own) for kind, variant in kinds.items()}
        stamps = [time.monotonic()]  # one after each variant: its compile, in its one warm-up generation

        layers_found: dict[str, int] = {}  # variant name -> the decoder layers its backend found

        def note(variant: SingleVariant, copy_: torch.nn.Module, backend: Any) -> None:
            if variant is not unpaired:
                check_rewritten(backend.reports, pairing_of[variant.name], "lp")
                variant.graph_gemms = [report.gemms for report in backend.reports]
                layers_found[variant.name] = len(backend.reports[-1].layers)

        # Decode-only copies: automatic dynamic shapes stay on (see decode_steps_through).
        with torch._dynamo.config.patch(cache_size_limit=64):
            torch._dynamo.reset()
            # The generation that compiles, and with CUDA graphs one more (they record on the first
            # calls after the compile); each variant is then warm when its rounds start.
            warm_ups = 2 if (self.shared or {}).get("cudagraphs") else 1
            compiled = compile_and_warm_up(model, todo, ids, self.tokens, note, warm_ups=warm_ups, decode_only=True,
                                           after_each=lambda: stamps.append(time.monotonic()))
            time_interleaved(compiled, todo, ids, self.tokens, self.rounds)
            torch._dynamo.reset()
        compile_s = {v.name: round(after - before, 1) for v, before, after in zip(todo, stamps, stamps[1:])}
        del compiled
        gc.collect()
        records = []
        for (pairing, _), kinds in zip(pairings, own):
            mine = {UNPAIRED: unpaired, **kinds}
            ideal = ratio_to_first(kinds[PRUNED], unpaired)
            record = {
                "inner": self.inner, "compiled": "decode step (prompt eager)", "tokens": self.tokens,
                "rounds": self.rounds, "prompt": PROMPT, "batch": self.batch, "shared_options": self.shared,
                "ratio": {kind: ratio_to_first(v, unpaired) for kind, v in kinds.items() if kind != PRUNED},
                "ideal_measured": ideal,
                "layer_share": layer_share(ideal, layers_found[kinds[PAIRED].name], len(pairing.pairs)),
                "tokens_per_s": {kind: v.tokens_per_s for kind, v in mine.items()},
                "median_tokens_per_s": {kind: statistics.median(v.tokens_per_s) for kind, v in mine.items()},
                "compile_s": {kind: compile_s[v.name] for kind, v in mine.items()},
                "gemms_per_graph": {kind: v.graph_gemms for kind, v in kinds.items()},
                "timed_with": [other.name for other, _ in pairings if other is not pairing],
            }
            log.info("speed %s: %s, ideal %.3f (layers: %.0f %% of a step; compile %s s)", pairing.name, record["ratio"],
                     ideal, 100 * record["layer_share"], record["compile_s"])
            records.append(record)
        return records


@dataclass
class LlamaCppBench:
    """Exports timed in llama.cpp against the unpaired export, made once into ``folder``."""

    folder: Path
    source: Source
    threads: int
    tokens: int = 32
    rounds: int = 5
    dtype: str = "f32"

    @classmethod
    def of_model(cls, spec: str, name: str, folder: Path, tokens: int, rounds: int) -> LlamaCppBench:
        """A bench of the model ``spec`` names (loaded as ``name``), its exports in ``folder`` (a
        temporary one: an f32 GGUF is the model's size), on every thread torch uses."""
        directory, gguf_file = resolve_model_path(spec)
        return cls(folder, Source(name, directory / gguf_file if gguf_file else directory), torch.get_num_threads(),
                   tokens, rounds)

    def _export(self, model: torch.nn.Module, pairing: Pairing, name: str) -> Path:
        path = self.folder / f"{name}.gguf"
        if not path.is_file():
            export(model, pairing.pairs, pairing.modes or ("lp",) * pairing.num_pairs, path, self.source,
                   dtype=self.dtype)
        return path

    def ratio(self, model: torch.nn.Module, pairing: Pairing) -> dict:
        """Decode tokens/s of ``pairing`` exported, against the unpaired export, interleaved."""
        base = self._export(model, BASELINE, f"unpaired_{self.dtype}")
        paired = self._export(model, pairing, f"paired_{self.dtype}")
        try:
            result = llamacpp.time_ggufs([str(base), str(paired)], self.threads, self.tokens, self.rounds)
        finally:
            paired.unlink(missing_ok=True)
        speeds = {Path(m["path"]).stem: m["tokens_per_s"] for m in result["models"]}
        return {"ratio": result["ratio_to_unpaired"][str(paired)], "dtype": self.dtype, "threads": self.threads,
                "tokens": self.tokens, "rounds": self.rounds, "tokens_per_s": speeds,
                "layers": [m["layers"] for m in result["models"]]}
