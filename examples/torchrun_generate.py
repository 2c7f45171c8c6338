"""SmolLM2-135M generation on 2 processes: tensor parallel (TP) vs TP + Layer Parallelism.

    torchrun --nproc_per_node 2 examples/torchrun_generate.py [--pairs 14:28 --mode lp]

Each process compiles the same model twice with the ``layer_parallel`` backend: once with only
a mesh (plain TP, the baseline), once with the pairs too; with ``free_weights`` each rank then holds
only the weights it computes with. Static cache, greedy, batch 1.
"""

from __future__ import annotations

import argparse

import torch

from lp_fx.tools.speed.ranks import Variant
from lp_fx.tools.models import load_model
from lp_fx.tools.speed.timing import compile_variant, generate
from lp_fx.weights import resident_bytes


def layer_range(text: str) -> tuple[int, int]:
    """``"14:28"`` -> ``(14, 28)``."""
    try:
        start, end = (int(i) for i in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END such as 14:28, got {text!r}") from None
    return start, end


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Not --start/--end: torchrun's own parser would take --start as an abbreviation of --start-method.
    parser.add_argument("--pairs", type=layer_range, default=(14, 28), help="START:END, the layers to pair")
    parser.add_argument("--mode", default="lp", choices=["lp", "block"])
    parser.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt", default="The capital of France is")
    args = parser.parse_args()
    start, end = args.pairs

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    loaded = load_model("smollm2")
    messages = [{"role": "user", "content": args.prompt}]
    ids = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    placed = {"mesh": "auto", "inner": args.inner, "free_weights": True}
    runs = [
        Variant("TP", placed),
        Variant(f"TP+LP {args.mode} Δ={end - start}", {**placed, "start": start, "end": end, "mode": args.mode}),
    ]
    for variant in runs:
        model, backend = compile_variant(loaded.model, variant.options)
        generate(model, ids, args.tokens)  # compile and warm up
        out, speed = generate(model, ids, args.tokens)
        if rank == 0:
            report = backend.reports[-1]
            text = loaded.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            print(f"[{variant.name}] {speed:.2f} tokens/s, {report.collectives} all-reduces per decode step, "
                  f"{resident_bytes(model, backend.weights) / 2**20:.0f} MiB of weights held on rank 0\n  {text!r}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
