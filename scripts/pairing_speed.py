"""Decode speed of pairings on one device, as ``lp-fx frontier`` measures it, without its planning
and scoring (issue 35): the unpaired model and, for each ``--pairing``, the pairing, the pairing
fused and its pairs pruned (the ideal as measured: depth L − Δ/2 with the model's own head), all
timed interleaved in the same rounds (:class:`lp_fx.tools.frontier.speed.SpeedBench`).

    python scripts/pairing_speed.py --model gemma3 --pairing 6:14 --pairing docs/results/plan_gemma3_issue35.json \\
        --out speed.json
"""

from __future__ import annotations

import argparse
import logging
import sys

from lp_fx.files import check_files_writable, write_json
from lp_fx.pairing import Pairing
from lp_fx.tools.frontier.points import ideal_speedup
from lp_fx.tools.frontier.speed import SpeedBench
from lp_fx.tools.models import load_model
from lp_fx.tools.console import ERRORS, refuse
from lp_fx.tools.options import OneLineParser, int_at_least, positive_int


def time_pairings(args: argparse.Namespace) -> dict:
    """The run's record: each ``--pairing`` with its speed, all timed in the same rounds; the output
    path, the model and every pairing are checked first."""
    check_files_writable(args.out)
    loaded = load_model(args.model, progress=False)
    pairings = [Pairing.parse(spec, loaded.num_layers) for spec in args.pairing]
    records = SpeedBench(loaded.tokenizer, tokens=args.tokens, rounds=args.rounds).one_device(
        loaded.model, [(pairing, pairing.to_options()) for pairing in pairings])
    return {"model": loaded.name, "layers": loaded.num_layers, "args": vars(args),
            "pairings": [dict(pairing.to_json(), speed=record) for pairing, record in zip(pairings, records)]}


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="a named model (smollm2, gemma3), a GGUF file or an HF folder")
    p.add_argument("--pairing", action="append", required=True,
                   help="a range 6:14, pairs 9-10,11-12 or a plan file; repeat to time several in the same rounds")
    p.add_argument("--tokens", type=int_at_least(2), default=32, help="greedy tokens per timed generation")
    p.add_argument("--rounds", type=positive_int, default=5, help="interleaved timing rounds")
    p.add_argument("--out", required=True, help="the JSON to write")
    args = p.parse_args()
    try:
        result = time_pairings(args)
    except ERRORS as error:  # a bad --model, --pairing or --out: one line, before the timing starts
        return refuse("pairing_speed.py", error)
    for pairing in result["pairings"]:
        speed, delta = pairing["speed"], 2 * len(pairing["pairs"])
        fused, ideal = speed["ratio"]["paired + fuse"], speed["ideal_measured"]
        print(f"{pairing['name']} (Δ = {delta}): paired {speed['ratio']['paired']:.3f}×, paired + fuse {fused:.3f}×; "
              f"ideal L/(L − Δ/2) {ideal_speedup(result['layers'], delta):.3f}×, measured (pairs pruned) {ideal:.3f}×: "
              f"fused reaches {fused / ideal:.1%} of it; the layers take {speed['layer_share']:.1%} of an unpaired step")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
