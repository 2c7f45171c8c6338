"""``python -m lp_fx.tools.cli.llamacpp_check``: exports in llama.cpp against the ``layer_parallel``
pass (:mod:`lp_fx.tools.export.llamacpp_check`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from lp_fx.files import write_json
from lp_fx.tools.console import say
from lp_fx.tools.export.llamacpp_check import check
from lp_fx.tools.options import OneLineParser, int_at_least, positive_int


def build_parser() -> OneLineParser:
    """The command line of ``python -m lp_fx.tools.cli.llamacpp_check``."""
    parser = OneLineParser(prog="python -m lp_fx.tools.cli.llamacpp_check", description="exports in llama.cpp vs the layer_parallel pass")
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
