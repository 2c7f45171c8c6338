"""The check that an export computes what the pass does, in llama.cpp.

``python -m lp_fx.tools.cli.llamacpp_check --pairs 14:28 --plan PLAN.json`` exports each pairing (and
the unpaired model) in every ``--dtypes``, and prints, beside the ``layer_parallel`` pass on the same
WikiText-2 windows (what ``lp-fx eval`` measures), llama.cpp's perplexity and how many of 32 greedy
tokens agree.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lp_fx.pairing import Pairing
from lp_fx.tools import data
from lp_fx.tools.evaluation.compiled import compile_pairing, make_backend
from lp_fx.tools.evaluation.scoring import perplexity as pass_perplexity
from lp_fx.tools.evaluation.scoring import wikitext_windows
from lp_fx.tools.export.fold import Source
from lp_fx.tools.export.write import export
from lp_fx.tools.models import load_model, resolve_model_path
from lp_fx.tools.speed.llamacpp import gguf_perplexity, greedy, open_gguf
from lp_fx.tools.speed.timing import PROMPT

log = logging.getLogger(__name__)


def pass_greedy(model: torch.nn.Module, pairing: Any, ids: torch.Tensor, tokens: int) -> list[int]:
    """Greedy tokens of the ``layer_parallel`` pass (static cache, inner eager) for ``pairing``: the
    argmax at every step, through end-of-sequence tokens as :func:`greedy` does (``min_new_tokens``
    would instead forbid them, and stopping at one would cut the comparison short)."""
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
    directory, gguf_file = resolve_model_path(model_spec)
    loaded = load_model(model_spec)
    source = Source(loaded.name, directory / gguf_file if gguf_file else directory)
    text = wikitext_windows(loaded.tokenizer, data.resolve_data_dir(data_dir), window, "all", windows)
    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in ["baseline", *specs]:
            pairing = Pairing.parse(spec, loaded.num_layers)
            modes = pairing.modes_or("lp")
            logits_fn = compile_pairing(loaded.model, pairing, inner="eager")
            row = {"pairing": spec, "pairs": [list(p) for p in pairing.pairs], "modes": list(modes),
                   "pass_ppl": pass_perplexity(logits_fn, text, progress=False).ppl,
                   "pass_greedy": pass_greedy(loaded.model, pairing, ids, tokens), "llamacpp": {}}
            for dtype in dtypes:
                path = Path(tmp) / f"{dtype}.gguf"
                export(loaded.model, pairing.pairs, modes, path, source, "gguf", dtype)
                llm = open_gguf(path, threads, n_ctx=max(window, ids.shape[1] + tokens), f32_cache=True)
                ppl = gguf_perplexity(llm, text)
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
