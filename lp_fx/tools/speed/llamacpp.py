"""Exported GGUFs in llama.cpp (``llama-cpp-python``, the optional ``llamacpp`` extra): logits,
perplexity, greedy tokens and decode speed. ``lp-fx bench --llamacpp GGUF...`` times decoding
(:func:`time_ggufs`); :mod:`lp_fx.tools.export.llamacpp_check` checks that an export computes what the pass does.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lp_fx.tools.speed.timing import PROMPT, ratio_to_first

log = logging.getLogger(__name__)

INSTALL = (
    "llama-cpp-python is not installed: pip install 'lp_fx[llamacpp]' (it builds llama.cpp from source with "
    "cmake and a C++ compiler: 20 minutes or more on 2 busy cores)"
)


def open_gguf(path: str | Path, threads: int, n_ctx: int = 512, f32_cache: bool = False, flash_attn: bool = False) -> Any:
    """A llama.cpp context on ``path`` that keeps the logits of every position; its KV cache is
    llama.cpp's default f16 unless ``f32_cache`` (then an f32 export computes in f32 throughout).
    Without ``flash_attn`` llama.cpp pads every layer's V cache to the widest layer's (deci)."""
    try:
        import llama_cpp  # lazy: llama-cpp-python is optional (the llamacpp extra)
    except ImportError:
        raise ValueError(INSTALL) from None
    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                           n_threads=threads, n_threads_batch=threads, flash_attn=flash_attn, verbose=False, **cache)


def logits(llm: Any, ids: Sequence[int]) -> np.ndarray:
    """Logits ``(len(ids), vocab)`` of one sequence from an empty cache."""
    llm.reset()
    llm.eval(list(map(int, ids)))
    return np.array(llm.scores[: len(ids)])


def gguf_perplexity(llm: Any, windows: torch.Tensor) -> float:
    """exp(mean next-token NLL) over the windows, as :func:`lp_fx.tools.evaluation.scoring.perplexity` counts it."""
    total = 0.0
    for row in windows:
        scores = torch.from_numpy(logits(llm, row.tolist()))
        total += torch.nn.functional.cross_entropy(scores[:-1].double(), row[1:], reduction="sum").item()
    return math.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))


def greedy(llm: Any, ids: Sequence[int], tokens: int) -> list[int]:
    """``tokens`` greedy tokens after ``ids`` (argmax of the logits, one decode step each)."""
    out = []
    llm.reset()
    llm.eval(list(map(int, ids)))
    for _ in range(tokens):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


def decode_tokens_per_s(llm: Any, ids: Sequence[int], tokens: int) -> float:
    """Greedy decode speed after the prompt (prompt processing not timed)."""
    llm.reset()
    llm.eval(list(map(int, ids)))
    start = time.perf_counter()
    for _ in range(tokens):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    return tokens / (time.perf_counter() - start)


# ------------------------------------------------------------------------------------------ bench


@dataclass
class Timed:
    """One GGUF in the benchmark: what it holds, and its decode speed per round."""

    path: str
    dtype: str
    pairs: list
    layers: int
    tokens_per_s: list[float] = field(default_factory=list)


def describe(path: str | Path) -> Timed:
    """The dtype (GGUF file type), pairing (``lp_fx.pairing``; none for a model not from ``lp-fx export``)
    and layer count of a GGUF."""
    import gguf  # lazy: only a GGUF export needs gguf

    fields = {name: f.contents() for name, f in gguf.GGUFReader(path).fields.items() if not name.startswith("tokenizer.")}
    arch = fields["general.architecture"]
    pairing = json.loads(fields.get("lp_fx.pairing", '{"pairs": []}'))
    dtype = gguf.LlamaFileType(fields["general.file_type"]).name.removeprefix("ALL_").removeprefix("MOSTLY_").lower()
    return Timed(str(path), dtype, pairing["pairs"], int(fields[f"{arch}.block_count"]))


def time_ggufs(paths: Sequence[str], threads: int, tokens: int, rounds: int, prompt: str = PROMPT,
          flash_attn: bool = False) -> dict:
    """Decode tokens/s of each GGUF, interleaved round after round; each paired export's ratio to
    the unpaired export of the same dtype (median of per-round ratios)."""
    timed = [describe(path) for path in paths]
    baselines = {t.dtype: t for t in timed if not t.pairs}
    missing = sorted({t.dtype for t in timed} - set(baselines))
    if missing:
        raise ValueError(f"no unpaired export (`lp-fx export --pairs baseline`) among the GGUFs for dtype(s) "
                         f"{', '.join(missing)}: ratios need one per dtype")
    contexts = [open_gguf(t.path, threads, n_ctx=64 + tokens, flash_attn=flash_attn) for t in timed]
    ids = contexts[0].tokenize(prompt.encode(), add_bos=False)
    for llm in contexts:
        decode_tokens_per_s(llm, ids, tokens)  # warm-up
    for _ in range(rounds):
        for t, llm in zip(timed, contexts):
            t.tokens_per_s.append(decode_tokens_per_s(llm, ids, tokens))
    ratios = {t.path: ratio_to_first(t, baselines[t.dtype]) for t in timed}
    return {"threads": threads, "tokens": tokens, "rounds": rounds, "prompt": prompt, "flash_attn": flash_attn,
            "ratio_to_unpaired": ratios, "models": [vars(t) for t in timed]}


def bench_table(result: dict) -> str:
    lines = [f"{'GGUF':<40}{'dtype':>6}{'layers':>8}{'tok/s':>9}{'vs unpaired':>13}  runs"]
    for t in result["models"]:
        runs = " ".join(f"{s:.1f}" for s in t["tokens_per_s"])
        lines.append(f"{Path(t['path']).name:<40}{t['dtype']:>6}{t['layers']:>8}"
                     f"{statistics.median(t['tokens_per_s']):>9.2f}{result['ratio_to_unpaired'][t['path']]:>13.3f}  {runs}")
    return "\n".join(lines)
