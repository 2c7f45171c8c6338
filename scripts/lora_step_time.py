"""A fine-tuning step with LoRA adapters against one of full fine-tuning, timed in one run (issue 34).

Both train the same pairing of the same model on the same batches (WikiText-2 train, the defaults of
``lp-fx finetune``), each from a fresh copy of the model, in alternating runs of ``--steps`` steps:
full, LoRA, full, LoRA, ... (``--rounds`` of each). A run's first step compiles and is left out;
the ratio is the median over rounds of (LoRA's median step time / full's median step time).

    python scripts/lora_step_time.py --plan examples/smollm2_plan.json --rank 16 --out step_time.json
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import tempfile

import torch

from lp_fx.files import write_json
from lp_fx.pairing import Pairing
from lp_fx.tools.data import load_training_text, resolve_data_dir
from lp_fx.tools.models import load_model
from lp_fx.tools.options import OneLineParser, int_at_least, positive_int
from lp_fx.tools.training.finetune import FinetuneConfig, finetune


def step_seconds(model, ids, config: FinetuneConfig) -> list[float]:
    """Seconds of each step after the first (which compiles), from the run's own record."""
    with tempfile.TemporaryDirectory() as out:
        record = finetune(copy.deepcopy(model), ids, config, out, progress=False)
    tokens = config.batch * config.seq_len
    return [tokens / point["tokens_per_s"] for point in record["loss"][1:]]


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", required=True)
    p.add_argument("--rank", type=positive_int, default=16)
    p.add_argument("--steps", type=int_at_least(2), default=6)
    p.add_argument("--rounds", type=positive_int, default=2)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    loaded = load_model("smollm2", progress=False)
    pairing = Pairing.parse(args.plan, loaded.num_layers)
    text = load_training_text(resolve_data_dir(args.data_dir) / "wikitext-2" / "train.txt")
    ids = loaded.tokenizer.encode(text, add_special_tokens=False)
    base = dict(pairs=pairing.pairs, modes=pairing.modes, steps=args.steps, save_every=args.steps)
    configs = {"full": FinetuneConfig(**base), "lora": FinetuneConfig(**base, lora_rank=args.rank)}
    seconds: dict[str, list[list[float]]] = {name: [] for name in configs}
    for round_ in range(args.rounds):
        for name, config in configs.items():
            seconds[name].append(step_seconds(loaded.model, ids, config))
            print(f"round {round_ + 1} {name}: median step {statistics.median(seconds[name][-1]):.2f} s")
    ratios = [statistics.median(lora) / statistics.median(full) for full, lora in zip(seconds["full"], seconds["lora"])]
    ratio = statistics.median(ratios)
    print(f"LoRA rank {args.rank} step time / full fine-tuning's: {ratio:.3f} (per round: "
          f"{', '.join(f'{r:.3f}' for r in ratios)}); {torch.get_num_threads()} threads")
    write_json(args.out, {"plan": args.plan, "rank": args.rank, "steps": args.steps, "rounds": args.rounds,
                          "threads": torch.get_num_threads(), "step_seconds": seconds, "ratio": ratio,
                          "ratio_per_round": ratios})


if __name__ == "__main__":
    main()
