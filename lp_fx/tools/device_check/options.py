"""``lp-fx gpu-check``'s options, declared once for the command line and the run, and the sizes of
a full run and of ``--quick``."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lp_fx.config import INNER_COMPILERS
from lp_fx.tools.data import REPO_ROOT
from lp_fx.tools.options import int_at_least, names_from, non_negative_int, option, positive_int

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PLAN = REPO_ROOT / "docs" / "results" / "plan_smollm2_7pairs.json"  # the planner's committed pairing
DEVICES = ("auto", "cuda", "cpu")
# Largest logit difference to the eager reference, relative to the largest reference logit, that
# passes: fp32 rounding, and bf16 rounding (Inductor keeps fused intermediates in fp32, eager rounds
# every op to bf16).
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}


@dataclass(frozen=True)
class Sizes:
    """How much each phase measures: its windows, generations and batches."""

    window: int  # tokens per perplexity window
    windows: int  # evenly spaced WikiText-2 test windows
    tokens: int  # new tokens per timed generation
    rounds: int  # interleaved timing rounds
    batches: tuple[int, ...]  # the batch sizes timed
    dtype_count: int | None  # how many of the dtypes are measured (None: all)


FULL = Sizes(window=512, windows=4, tokens=32, rounds=5, batches=(1, 8), dtype_count=None)
# --quick: the first dtype (bf16 on CUDA, fp32 on a CPU) at batch 1, every kind of row still measured
# (each pairing's correctness, the three speed variants, llama.cpp), on fewer and shorter windows and
# generations: its time is the compiles', which it keeps.
QUICK = Sizes(window=128, windows=2, tokens=16, rounds=3, batches=(1,), dtype_count=1)


@dataclass(frozen=True)
class CheckOptions:
    """What ``lp-fx gpu-check`` measures and where it writes (its model is the command's ``--model``)."""

    data_dir: str | None = option(None)
    """data directory holding wikitext-2-raw (default: $LP_FX_DATA, else ../shared/data)"""
    out: str = option("lp-fx-results/gpu_check")
    """folder for gpu_check.json and gpu_check.md, both written again after every phase"""
    quick: bool = option(False)
    """the first dtype only, at batch 1 only, on fewer and shorter windows and generations (the defaults
    of --window, --windows, --tokens, --rounds); every kind of row is still measured"""
    device: str = option("auto", choices=DEVICES)
    """auto: CUDA when present, else the CPU"""
    dtypes: tuple[str, ...] | None = option(None, parse=names_from(tuple(DTYPES)))
    """comma-separated, checked in this order, speed timed in the first (default: bf16,fp32 on CUDA,
    fp32,bf16 on a CPU)"""
    inner: str = option("inductor", choices=INNER_COMPILERS)
    """compiler behind the backend, for every row (CUDA graphs on CUDA with inductor only)"""
    random_weights: bool = option(False)
    """--model is a Hugging Face folder whose config and tokenizer are used with random weights (seed 0):
    speeds and the match with eager hold, perplexities are not the model's"""
    start: int = option(14, parse=non_negative_int)
    """first layer of the paired range start:end (lp and block)"""
    end: int = option(28, parse=positive_int)
    """end of the paired range (exclusive; Δ = end - start, even)"""
    plan: str = option(str(PLAN))
    """a plan file whose pairing is checked too ('none': skip it)"""
    no_llamacpp: bool = option(False)
    """skip the llama.cpp phase (it says so in one line)"""
    window: int | None = option(None, parse=int_at_least(2))
    """tokens per perplexity window (default: 512; 128 with --quick)"""
    windows: int | None = option(None, parse=positive_int)
    """evenly spaced WikiText-2 test windows (default: 4; 2 with --quick)"""
    tokens: int | None = option(None, parse=int_at_least(2))
    """new tokens per timed generation (default: 32; 16 with --quick)"""
    rounds: int | None = option(None, parse=positive_int)
    """interleaved timing rounds (default: 5; 3 with --quick)"""

    def sizes(self) -> Sizes:
        """:data:`QUICK` or :data:`FULL`, with the sizes given on the command line in their place."""
        given = {name: getattr(self, name) for name in ("window", "windows", "tokens", "rounds")}
        return replace(QUICK if self.quick else FULL, **{name: value for name, value in given.items() if value is not None})

    def dtypes_on(self, device: torch.device) -> tuple[str, ...]:
        """The dtypes measured, in order: ``--dtypes``, else bf16 first on CUDA (the GPU's serving
        dtype) and fp32 first on a CPU (most have no bf16 units: this project's AVX2 VM emulates
        bf16, many times slower than fp32); ``--quick``: the first."""
        order = self.dtypes or (("bf16", "fp32") if device.type == "cuda" else ("fp32", "bf16"))
        return order[: self.sizes().dtype_count]
