"""Exported GGUFs in llama.cpp (``llama-cpp-python``, the optional ``llamacpp`` extra): logits,
perplexity, greedy tokens and decode speed, and the check that an export computes what the pass does.

``python -m lp_fx.tools.llamacpp --pairs 14:28 --plan PLAN.json`` exports each pairing (and the
unpaired model) in every ``--dtypes``, and prints, beside the ``layer_parallel`` pass on the same
WikiText-2 windows (what ``lp-fx eval`` measures), llama.cpp's perplexity and how many of 32 greedy
tokens agree. ``lp-fx bench --llamacpp GGUF...`` times decoding (:func:`bench`).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lp_fx.tools.arguments import OneLineParser, int_at_least, positive_int
from lp_fx.tools.console import say
from lp_fx.tools.files import write_json
from lp_fx.tools.timing import PROMPT, ratio_to_first

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
        import llama_cpp
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


def perplexity(llm: Any, windows: torch.Tensor) -> float:
    """exp(mean next-token NLL) over the windows, as :func:`lp_fx.tools.evaluate.perplexity` counts it."""
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
    import gguf

    fields = {name: f.contents() for name, f in gguf.GGUFReader(path).fields.items() if not name.startswith("tokenizer.")}
    arch = fields["general.architecture"]
    pairing = json.loads(fields.get("lp_fx.pairing", '{"pairs": []}'))
    dtype = gguf.LlamaFileType(fields["general.file_type"]).name.removeprefix("ALL_").removeprefix("MOSTLY_").lower()
    return Timed(str(path), dtype, pairing["pairs"], int(fields[f"{arch}.block_count"]))


def bench(paths: Sequence[str], threads: int, tokens: int, rounds: int, prompt: str = PROMPT,
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


# ------------------------------------------------------------------------------------------ check


def pass_greedy(model: torch.nn.Module, pairing: Any, ids: torch.Tensor, tokens: int) -> list[int]:
    """Greedy tokens of the ``layer_parallel`` pass (static cache, inner eager) for ``pairing``: the
    argmax at every step, through end-of-sequence tokens as :func:`greedy` does (``min_new_tokens``
    would instead forbid them, and stopping at one would cut the comparison short)."""
    import copy

    from lp_fx.tools.evaluate import make_backend

    torch._dynamo.reset()
    paired = copy.deepcopy(model)
    paired.generation_config.eos_token_id = None
    paired.forward = torch.compile(paired.forward, backend=make_backend(pairing, "lp", "eager"))
    with torch.no_grad():
        out = paired.generate(ids, max_new_tokens=tokens, do_sample=False, cache_implementation="static")
    return out[0, ids.shape[1]:].tolist()


def check(model_spec: str, specs: Sequence[str], dtypes: Sequence[str], windows: int, tokens: int,
          threads: int, data_dir: str | None, window: int = 512) -> dict:
    """For the unpaired model and each pairing spec: the pass's perplexity on ``windows`` windows of
    ``window`` tokens and its greedy tokens, and llama.cpp's on the export in each dtype."""
    from lp_fx.tools import data, evaluate
    from lp_fx.tools.commands.options import parse_pairing
    from lp_fx.tools.export import Source, export
    from lp_fx.tools.models import load_model, resolve_model_path

    directory, gguf_file = resolve_model_path(model_spec)
    loaded = load_model(model_spec)
    source = Source(loaded.name, directory / gguf_file if gguf_file else directory)
    text = evaluate.wikitext_windows(loaded.tokenizer, data.resolve_data_dir(data_dir), window, "all", windows)
    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in ["baseline", *specs]:
            pairing = parse_pairing(spec, loaded.num_layers)
            modes = pairing.modes or ("lp",) * pairing.num_pairs
            logits_fn = evaluate.compile_pairing(loaded.model, pairing, inner="eager")
            row = {"pairing": spec, "pairs": [list(p) for p in pairing.pairs], "modes": list(modes),
                   "pass_ppl": evaluate.perplexity(logits_fn, text, progress=False).ppl,
                   "pass_greedy": pass_greedy(loaded.model, pairing, ids, tokens), "llamacpp": {}}
            for dtype in dtypes:
                path = Path(tmp) / f"{dtype}.gguf"
                export(loaded.model, pairing.pairs, modes, path, source, "gguf", dtype)
                llm = open_gguf(path, threads, n_ctx=max(window, ids.shape[1] + tokens), f32_cache=True)
                ppl = perplexity(llm, text)
                got = greedy(llm, ids[0].tolist(), tokens)
                matched = next((i for i, (a, b) in enumerate(zip(got, row["pass_greedy"])) if a != b), tokens)
                row["llamacpp"][dtype] = {"ppl": ppl, "rel_diff": ppl / row["pass_ppl"] - 1,
                                          "greedy_matched": matched, "greedy": got,
                                          "pass_margin_at_divergence": divergence_margin(
                                              logits_fn, ids[0].tolist(), row["pass_greedy"], got)}
                del llm
            rows.append(row)
            log.info("%s", check_line(row))
    return {"model": loaded.name, "windows": int(text.shape[0]), "window": window, "tokens": tokens,
            "threads": threads, "prompt": PROMPT, "pairings": rows}


def divergence_margin(logits_fn: Any, prompt: Sequence[int], expected: Sequence[int], got: Sequence[int]) -> float | None:
    """Where two greedy continuations first differ: the pass's logit of its own token minus its logit
    of the other's (a near-zero margin is a tie that rounding decides), else None."""
    k = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), None)
    if k is None:
        return None
    with torch.no_grad():
        last = logits_fn(torch.tensor([[*prompt, *expected[:k]]]))[0, -1].float()
    return float(last[expected[k]] - last[got[k]])


def check_line(row: dict) -> str:
    cells = [f"{dtype} {r['ppl']:.4f} ({100 * r['rel_diff']:+.3f} %, greedy {r['greedy_matched']}/{len(r['greedy'])}"
             + ("" if r["pass_margin_at_divergence"] is None else f", pass margin there {r['pass_margin_at_divergence']:.2g}")
             + ")" for dtype, r in row["llamacpp"].items()]
    return f"{row['pairing']:<42} pass {row['pass_ppl']:.4f} | llama.cpp " + " | ".join(cells)


def build_parser() -> OneLineParser:
    """The command line of ``python -m lp_fx.tools.llamacpp``."""
    parser = OneLineParser(prog="python -m lp_fx.tools.llamacpp", description="exports in llama.cpp vs the layer_parallel pass")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--pairs", action="append", default=[], metavar="SPEC", help="a pairing (repeatable)")
    parser.add_argument("--plan", action="append", default=[], metavar="FILE", help="a plan file (repeatable)")
    parser.add_argument("--dtypes", default="f32,q8_0")
    parser.add_argument("--windows", type=positive_int, default=32, help="evenly spaced WikiText-2 test windows")
    parser.add_argument("--window", type=int_at_least(2), default=512, help="tokens per window")
    parser.add_argument("--tokens", type=int_at_least(2), default=32, help="greedy tokens compared")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", default=None, help="write the figures here")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # one line per pairing as it is checked
    result = check(args.model, [*args.pairs, *args.plan], args.dtypes.split(","), args.windows, args.tokens,
                   args.threads, args.data_dir, args.window)
    if args.json:
        write_json(args.json, result, indent=1)
        say(f"wrote {args.json}")


if __name__ == "__main__":
    main()
