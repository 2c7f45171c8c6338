"""SmolLM2-135M-Instruct, plain and with Layer Parallelism (Δ = 14: layers 14..27 in 7 pairs).

Prints WikiText-2 perplexity (first 4096 tokens, 512-token windows), a greedy answer to a short
prompt and the decode speed of that answer (tokens/s, best of --speed-runs generations after the
compiling one) for both, each through ``torch.compile(..., backend=LayerParallel(...))``. On one
CPU the pairs alone save no time (every weight is still read once per token); ``--fuse`` runs each
pair's two GEMMs as one (see the README's "One device: fused pairs").

    python examples/demo_smollm2.py [--start 14 --end 28] [--mode lp|block] [--inner inductor] [--fuse]
    python examples/demo_smollm2.py --checkpoint DIR    # also: the pairing fine-tuned by `lp-fx finetune`
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

import lp_fx
from lp_fx import LayerParallel
from lp_fx.config import INNER_COMPILERS, PAIRING_MODES, check_range
from lp_fx.tools.options import OneLineParser, int_at_least, non_negative_int, positive_int
from lp_fx.tools.data import DataError, load_wikitext, resolve_data_dir
from lp_fx.tools.evaluation.scoring import make_windows, perplexity
from lp_fx.tools.models import load_model
from lp_fx.tools.speed.timing import generate

PROMPT = "What is the capital of France?"


def parse_args() -> argparse.Namespace:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--start", type=non_negative_int, default=14)
    p.add_argument("--end", type=positive_int, default=28)
    p.add_argument("--mode", choices=PAIRING_MODES, default="lp")
    p.add_argument("--inner", choices=INNER_COMPILERS, default="aot_eager",
                   help="inner compiler after the rewrite (inductor: faster to run, ~1-2 min more to compile)")
    p.add_argument("--tokens", type=int_at_least(512), default=4096,
                   help="WikiText-2 tokens to score, in 512-token windows (at least 512)")
    p.add_argument("--new-tokens", type=positive_int, default=24)
    p.add_argument("--speed-runs", type=positive_int, default=3,
                   help="timed generations of --new-tokens tokens per configuration (the best is printed)")
    p.add_argument("--fuse", action="store_true", help="fuse each pair's two branches into one GEMM per projection")
    p.add_argument("--data-dir", default=None, help="evaluation data (default: ../shared/data)")
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="a fine-tuned pairing from `lp-fx finetune`: shown after baseline and LP")
    return p.parse_args()


@torch.no_grad()
def prompt_ids(tokenizer) -> torch.Tensor:
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt").input_ids


def answer(model, tokenizer, new_tokens: int) -> str:
    ids = prompt_ids(tokenizer)
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, cache_implementation="static")
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def decode_speed(model, tokenizer, new_tokens: int, runs: int) -> float:
    """Decode tokens/s of greedy generation of exactly ``new_tokens`` tokens, the best of ``runs``
    (the graphs are compiled by then: :func:`answer` ran first)."""
    ids = prompt_ids(tokenizer)
    return max(generate(model, ids, new_tokens)[1] for _ in range(runs))


def run(name: str, loaded, backend: LayerParallel, windows: torch.Tensor, args: argparse.Namespace) -> dict:
    model, plain_forward = loaded.model, loaded.model.forward
    torch._dynamo.reset()
    t0 = time.perf_counter()
    model.forward = torch.compile(plain_forward, backend=backend)
    try:
        ppl = perplexity(lambda ids: model.forward(input_ids=ids, use_cache=False).logits, windows).ppl
        text = answer(model, loaded.tokenizer, args.new_tokens)
        speed = decode_speed(model, loaded.tokenizer, args.new_tokens, args.speed_runs)
    finally:
        model.forward = plain_forward
    rewritten = sorted({p for r in backend.reports for p, _ in r.pairs_rewritten})
    logging.info("%s: %d graphs compiled in %.0f s, pairs rewritten: %s", name, len(backend.reports),
                 time.perf_counter() - t0, rewritten or "none")
    return {"name": name, "ppl": ppl, "answer": text, "pairs": rewritten, "tokens_per_s": speed}


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args()
    try:
        check_range(args.start, args.end)
        data_dir = resolve_data_dir(args.data_dir)
        demo(args, data_dir)
    except (DataError, OSError, ValueError) as error:  # LayerParallelError is a ValueError
        print(f"demo_smollm2: error: {error}", file=sys.stderr)
        return 2
    return 0


def demo(args: argparse.Namespace, data_dir) -> None:
    loaded = load_model("smollm2")
    if args.end > loaded.num_layers:
        raise ValueError(f"--end {args.end} is past the last layer: SmolLM2-135M has {loaded.num_layers} layers")
    ids = loaded.tokenizer.encode(load_wikitext(data_dir), add_special_tokens=False)[: args.tokens]
    windows = make_windows(ids, 512)
    layers = loaded.num_layers
    delta = args.end - args.start
    lp_name = f"LP {args.mode} layers {args.start}..{args.end - 1} (Δ={delta}, depth {layers}→{layers - delta // 2})"
    results = [
        run("baseline", loaded, LayerParallel(pairs=[], inner=args.inner), windows, args),
        run(lp_name, loaded, LayerParallel(start=args.start, end=args.end, mode=args.mode, inner=args.inner,
                                           fuse=args.fuse), windows, args),
    ]
    if args.checkpoint:
        options = lp_fx.load_finetuned(loaded.model, args.checkpoint)  # loaded after the runs above
        pairs = options.get("pairs")
        name = f"LP fine-tuned ({len(pairs) if pairs is not None else 'plan'} pairs, {args.checkpoint})"
        results.append(run(name, loaded, LayerParallel(options, inner=args.inner, fuse=args.fuse), windows, args))
    base, base_speed = results[0]["ppl"], results[0]["tokens_per_s"]
    print(f"\nSmolLM2-135M-Instruct, WikiText-2 raw test: {windows.shape[0]} windows × 512 tokens, inner={args.inner}"
          f"{', fused pairs' if args.fuse else ''}; decode: {args.new_tokens} greedy tokens, best of {args.speed_runs}")
    width = max(len(r["name"]) for r in results)
    for r in results:
        print(f"  {r['name']:<{width}}  perplexity {r['ppl']:8.3f}  ({r['ppl'] / base:5.3f}× baseline)   "
              f"decode {r['tokens_per_s']:6.1f} tok/s ({r['tokens_per_s'] / base_speed:5.3f}× baseline)")
    print(f"\nPrompt: {PROMPT}")
    for r in results:
        print(f"  {r['name']:<{width}}  {r['answer']!r}")


if __name__ == "__main__":
    sys.exit(main())
