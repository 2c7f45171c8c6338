"""A model three ways, each through ``torch.compile(..., backend=LayerParallel(...))``:
SmolLM2-135M-Instruct (``--model smollm2``, the default) or Gemma 3 270M (``--model gemma3``).

1. baseline: the unpaired model (SmolLM2: 30 layers; Gemma 3: 18);
2. the paper's recipe, untuned: contiguous ``lp`` pairs (SmolLM2: layers 14..27, Δ = 14, depth 23;
   Gemma 3: layers 6..13, Δ = 8, depth 14);
3. what this project recommends: the planner's pairs with their LoRA adapter, committed in
   ``examples/smollm2_lora/`` and ``examples/gemma3_lora/`` (made by ``lp-fx plan`` and
   ``lp-fx finetune --plan ... --lora 16``; the README gives the commands and their time).

Rows 2 and 3 run fused (``fuse=True``: each pair's GEMMs as one), as one device serves them. The
decode steps run through the backend with Inductor behind it (``--inner``), the answer's prompt too
(fed one token at a time, so no prefill graph is compiled); perplexity runs through the same backend
and pairing with the ``eager`` inner compiler, which compiles in seconds where Inductor's graph of
512-token windows would take minutes (the baseline's through the model itself: unpaired, the pass
has nothing to rewrite). For each row: WikiText-2 perplexity (first ``--tokens`` tokens of the raw
test split, 512-token windows) and its ratio to the baseline; decode tokens/s of ``--new-tokens``
greedy tokens (one over the median step time), timed in ``--rounds`` interleaved rounds, as the
median per-round ratio to the baseline; and whether the greedy answer to "What is the capital of
France?" names Paris (a model without a chat template, as this Gemma 3 GGUF, is asked after one
example question and answer; its answer is the first line it writes).

    python examples/demo.py [--model smollm2|gemma3] [--checkpoint DIR] [--start 14 --end 28]
                            [--mode lp|block] [--inner aot_eager|inductor] [--no-fuse] [--rounds 7]
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import lp_fx
from lp_fx import LayerParallel
from lp_fx.config import INNER_COMPILERS, PAIRING_MODES, check_range
from lp_fx.tools.data import DataError, load_wikitext, resolve_data_dir
from lp_fx.tools.evaluation.scoring import make_windows, perplexity, text_prefix
from lp_fx.tools.models import GEMMA3, SMOLLM2, load_model
from lp_fx.tools.options import OneLineParser, int_at_least, non_negative_int, positive_int
from lp_fx.tools.speed.timing import (
    decode_steps_through,
    ratio_to_first,
    room_for_variants,
    time_interleaved,
)

PROMPT = "What is the capital of France?"
# The question for a model without a chat template (a base model): one example, then the question
COMPLETION = "Q: What is the capital of Italy?\nA: Rome\nQ: What is the capital of France?\nA:"
EXAMPLES = Path(__file__).resolve().parent


@dataclass(frozen=True)
class DemoModel:
    """A model the demo runs, with its rows' defaults."""

    title: str
    start: int  # the paper's contiguous range
    end: int
    checkpoint: Path  # the recommended row's planned pairing and LoRA adapter


MODELS = {
    SMOLLM2: DemoModel("SmolLM2-135M-Instruct", 14, 28, EXAMPLES / "smollm2_lora"),
    GEMMA3: DemoModel("Gemma 3 270M", 6, 14, EXAMPLES / "gemma3_lora"),
}


def parse_args() -> argparse.Namespace:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default=SMOLLM2, help="the model (gemma3: extra lp_fx[gemma3])")
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="the recommended row's fine-tuned pairing (default: the committed examples/MODEL_lora)")
    p.add_argument("--start", type=non_negative_int, default=None,
                   help="the contiguous row's first paired layer (default: 14 for smollm2, 6 for gemma3)")
    p.add_argument("--end", type=positive_int, default=None,
                   help="the contiguous row's end, exclusive (default: 28 for smollm2, 14 for gemma3)")
    p.add_argument("--mode", choices=PAIRING_MODES, default="lp", help="the contiguous row's mode")
    p.add_argument("--inner", choices=INNER_COMPILERS, default="inductor",
                   help="inner compiler of the decode steps (perplexity and the prompt: eager, quick to compile)")
    p.add_argument("--no-fuse", dest="fuse", action="store_false", help="run the pairs' GEMMs one by one")
    p.add_argument("--tokens", type=int_at_least(512), default=2048,
                   help="WikiText-2 tokens to score, in 512-token windows (at least 512)")
    p.add_argument("--new-tokens", type=positive_int, default=24, help="greedy tokens per timed generation")
    p.add_argument("--rounds", type=positive_int, default=7, help="interleaved timing rounds")
    p.add_argument("--data-dir", default=None, help="evaluation data (default: ../shared/data)")
    args = p.parse_args()
    model = MODELS[args.model]
    args.start = model.start if args.start is None else args.start
    args.end = model.end if args.end is None else args.end
    args.checkpoint = str(model.checkpoint) if args.checkpoint is None else args.checkpoint
    return args


@dataclass
class Row:
    """One configuration of the demo and what it measured."""

    name: str
    options: dict
    checkpoint: str | None = None
    depth: int = 0
    ppl: float = 0.0
    answer: str = ""
    tokens_per_s: list[float] = field(default_factory=list)


def prompt_ids(tokenizer) -> torch.Tensor:
    """PROMPT through the chat template, or COMPLETION where the tokenizer has none."""
    if tokenizer.chat_template is None:
        return tokenizer(COMPLETION, return_tensors="pt").input_ids
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt").input_ids


def greedy_answer(model, tokenizer, new_tokens: int) -> str:
    """The greedy answer to PROMPT, every token of it through the decode graph: the prompt is fed one
    token at a time (``prefill_chunk_size=1``), the same computation as a prefill, with no prefill graph."""
    ids = prompt_ids(tokenizer)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, cache_implementation="static",
                             disable_compile=True, prefill_chunk_size=1)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    return answer if tokenizer.chat_template is not None else answer.split("\n")[0]  # then it asks on


def row_model(loaded, row: Row) -> torch.nn.Module:
    """A copy of the model for ``row``, its checkpoint loaded (refused in one line if it is another
    model's) and its pairing's options added to ``row.options``."""
    model = copy.deepcopy(loaded.model)
    if row.checkpoint is not None:
        row.options.update(lp_fx.load_finetuned(model, row.checkpoint))  # merges the LoRA adapter into the weights
    return model


def compiled_row(loaded, model: torch.nn.Module, row: Row, args: argparse.Namespace,
                 windows: torch.Tensor) -> torch.nn.Module:
    """``model`` (:func:`row_model`) compiled for ``row``; its perplexity and answer measured (which
    compiles its graphs)."""
    started = time.perf_counter()
    options = row.options
    fuse = args.fuse and options.get("pairs") != []
    scoring = LayerParallel(options, inner="eager", fuse=fuse)  # perplexity
    decode = LayerParallel(options, inner=args.inner, fuse=fuse)  # the decode steps: the answer's, and the ones timed
    # Unpaired, the pass rewrites nothing: the model's own forward gives the same perplexity without
    # another whole-model trace. A timed generation's prompt runs uncompiled (decode_steps_through).
    scored = model.forward if options.get("pairs") == [] else torch.compile(model.forward, backend=scoring)
    model.forward = decode_steps_through(torch.compile(model.forward, backend=decode), model.forward)
    row.ppl = perplexity(lambda ids: scored(input_ids=ids, use_cache=False).logits, windows, progress=False).ppl
    row.answer = greedy_answer(model, loaded.tokenizer, args.new_tokens)
    row.depth = loaded.num_layers - len({pair for r in decode.reports for pair, _ in r.pairs_rewritten})
    fused = sorted({pair for r in decode.reports for pair, _ in r.pairs_fused})
    logging.info("%s: compiled and measured in %.0f s; %d graphs (%d decode), pairs fused in decode: %s", row.name,
                 time.perf_counter() - started, len(scoring.reports) + len(decode.reports), len(decode.reports),
                 fused or "none")
    return model


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args()
    try:
        check_range(args.start, args.end)
        if not Path(args.checkpoint).is_dir():
            raise ValueError(f"--checkpoint {args.checkpoint}: no such directory (a checkpoint of `lp-fx finetune`)")
        demo(args, resolve_data_dir(args.data_dir))
    except (DataError, OSError, ValueError) as error:  # LayerParallelError is a ValueError
        print(f"demo: error: {error}", file=sys.stderr)
        return 2
    return 0


def demo(args: argparse.Namespace, data_dir: Path) -> None:
    loaded = load_model(args.model)
    title = MODELS[args.model].title
    if args.end > loaded.num_layers:
        raise ValueError(f"--end {args.end} is past the last layer: {title} has {loaded.num_layers} layers")
    ids = loaded.tokenizer.encode(load_wikitext(data_dir), add_special_tokens=False)[: args.tokens]
    windows = make_windows(ids, 512, text_prefix(loaded.tokenizer))  # Gemma's windows start with <bos>
    delta = args.end - args.start
    rows = [
        Row("baseline (unpaired)", {"pairs": []}),
        Row(f"paper: {args.start}:{args.end} {args.mode}, untuned", {"start": args.start, "end": args.end, "mode": args.mode}),
        Row(f"recommended: planned + LoRA ({Path(args.checkpoint).name})", {}, checkpoint=args.checkpoint),
    ]
    room_for_variants()  # decode-only copies: automatic dynamic shapes stay on (decode_steps_through)
    models = {row.name: row_model(loaded, row) for row in rows}  # every checkpoint checked before any compile
    compiled = {row.name: compiled_row(loaded, models[row.name], row, args, windows) for row in rows}
    prompt = prompt_ids(loaded.tokenizer)  # decode graphs compiled by the answers above; its prefill uncompiled
    time_interleaved(compiled, rows, prompt, args.new_tokens, args.rounds)
    for row in rows[1:]:
        logging.info("%s: decode tok/s per round %s, against the baseline's %s", row.name,
                     [round(v, 1) for v in row.tokens_per_s], [round(v, 1) for v in rows[0].tokens_per_s])
    question = PROMPT if loaded.tokenizer.chat_template is not None else f"{PROMPT} (after one example: Italy, Rome)"
    print(report(rows, args, windows.shape[0], delta, title, question))


def report(rows: list[Row], args: argparse.Namespace, windows: int, delta: int, title: str, question: str) -> str:
    """The table: depth, perplexity, decode speed (ratios to the first row), and the answer."""
    fuse = "pairs fused" if args.fuse else "pairs not fused"
    lines = [
        f"\n{title} on the CPU ({torch.get_num_threads()} threads), decode through {args.inner}, {fuse}; "
        f"Δ = {delta} in both paired rows.",
        f"WikiText-2 raw test: {windows} windows × 512 tokens. Decode: {args.new_tokens} greedy tokens, median of "
        f"{args.rounds} interleaved rounds.",
        "",
        f"{'configuration':<44}{'depth':>6}{'perplexity':>12}{'× base':>8}{'decode tok/s':>14}{'× base':>8}  Paris?",
    ]
    for row in rows:
        speed = sorted(row.tokens_per_s)[len(row.tokens_per_s) // 2]
        lines.append(
            f"{row.name:<44}{row.depth:>6}{row.ppl:>12.2f}{row.ppl / rows[0].ppl:>8.3f}{speed:>14.1f}"
            f"{ratio_to_first(row, rows[0]):>8.3f}  {'yes' if 'paris' in row.answer.lower() else 'no'}"
        )
    lines += ["", question] + [f"  {row.name:<44}{row.answer!r}" for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
