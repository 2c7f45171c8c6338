"""The frontier's speed measurements: decode tokens/s on one device, and in llama.cpp.

One device (:class:`SpeedBench`): the unpaired model, the pairing, and the pairing with ``fuse=True``,
each a copy of the model compiled once and warmed up (:func:`lp_fx.tools.timing.compile_and_warm_up`),
then timed interleaved round after round (:func:`lp_fx.tools.timing.time_interleaved`). Only the
decode step is compiled (:func:`lp_fx.tools.timing.decode_steps_through`: the prompt runs eagerly),
which halves each variant's compile and leaves the decode tokens/s as it was; ratios are
medians of per-round ratios to the unpaired model (:func:`lp_fx.tools.timing.ratio_to_first`), so a
slow spell of a shared machine hits all three alike. Dynamo's caches are reset before each point;
the unpaired graph is then compiled again but found in Inductor's on-disk graph cache (its compile
seconds are recorded, so this shows).

llama.cpp (:class:`LlamaCppBench`): an ``lp`` pairing is exported as a GGUF
(:func:`lp_fx.tools.export.export`), timed against the unpaired export (made once per run) with
:func:`lp_fx.tools.llamacpp.bench`, and removed.
"""

from __future__ import annotations

import gc
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lp_fx.tools.bench_single import SingleVariant
from lp_fx.tools.timing import PROMPT, compile_and_warm_up, ratio_to_first, time_interleaved
from lp_fx.tools.evaluate import Pairing, check_rewritten

log = logging.getLogger(__name__)

UNPAIRED, PAIRED, FUSED = "unpaired", "paired", "paired + fuse"


def speed_variants(backend_options: dict, inner: str) -> list[SingleVariant]:
    """The unpaired model (plain ``torch.compile`` for Inductor, else the backend with no pairs in
    front of ``inner``), the pairing, and the pairing fused: strict, so nothing is silently left out."""
    paired = {**backend_options, "inner": inner, "strict": True}
    return [
        SingleVariant(UNPAIRED, None if inner == "inductor" else {"inner": inner}),
        SingleVariant(PAIRED, paired),
        SingleVariant(FUSED, {**paired, "fuse": True}),
    ]


@dataclass
class SpeedBench:
    """Decode speed of a pairing on one device against the unpaired model, in one interleaved run."""

    tokenizer: object
    inner: str = "inductor"
    tokens: int = 32
    rounds: int = 5
    llamacpp: "LlamaCppBench | None" = None

    def measure(self, model: torch.nn.Module, pairing: Pairing, backend_options: dict) -> dict:
        """``{"speed": …}`` and, for an all-``lp`` pairing with llama.cpp on, ``{"llamacpp": …}``."""
        out = {"speed": self.one_device(model, pairing, backend_options)}
        if self.llamacpp is not None and set(pairing.modes or ("lp",)) == {"lp"}:
            out["llamacpp"] = self.llamacpp.ratio(model, pairing)
        return out

    def one_device(self, model: torch.nn.Module, pairing: Pairing, backend_options: dict) -> dict:
        ids = self.tokenizer(PROMPT, return_tensors="pt").input_ids
        todo = speed_variants(backend_options, self.inner)
        stamps = [time.monotonic()]  # one after each variant: its compile, in its one warm-up generation

        def note(variant: SingleVariant, copy_: torch.nn.Module, backend: Any) -> None:
            if variant.name != UNPAIRED:
                check_rewritten(backend.reports, pairing, "lp")
                variant.graph_gemms = [report.gemms for report in backend.reports]
                variant.fused = [report.pairs_fused for report in backend.reports]

        with torch._dynamo.config.patch(automatic_dynamic_shapes=False, cache_size_limit=64):
            torch._dynamo.reset()
            # One warm-up: the generation that compiles (on CPU nothing records on first calls, unlike
            # CUDA graphs); each variant is then warm when its rounds start.
            compiled = compile_and_warm_up(model, todo, ids, self.tokens, note, warm_ups=1, decode_only=True,
                                           after_each=lambda: stamps.append(time.monotonic()))
            time_interleaved(compiled, todo, ids, self.tokens, self.rounds)
            torch._dynamo.reset()
        compile_s = {v.name: round(after - before, 1) for v, before, after in zip(todo, stamps, stamps[1:])}
        del compiled
        gc.collect()
        record = {
            "inner": self.inner, "compiled": "decode step (prompt eager)", "tokens": self.tokens,
            "rounds": self.rounds, "prompt": PROMPT,
            "ratio": {v.name: ratio_to_first(v, todo[0]) for v in todo[1:]},
            "tokens_per_s": {v.name: v.tokens_per_s for v in todo},
            "median_tokens_per_s": {v.name: statistics.median(v.tokens_per_s) for v in todo},
            "compile_s": compile_s,
            "gemms_per_graph": {v.name: v.graph_gemms for v in todo[1:]},
        }
        log.info("speed %s: %s (compile %s s)", pairing.name, record["ratio"], compile_s)
        return record


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
