"""``python -m lp_fx.tools.cli.llamacpp_check``: exports in llama.cpp against the ``layer_parallel``
pass (:mod:`lp_fx.tools.export.llamacpp_check`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from collections.abc import Sequence

from lp_fx.files import write_json
from lp_fx.tools.console import say
from lp_fx.tools.export.llamacpp_check import check
from lp_fx.tools.options import OneLineParser, add_options, int_at_least, option, positive_int


@dataclass(frozen=True)
class CheckArgs:
    """The check's options."""

    model: str = option("smollm2")
    """'smollm2', 'gemma3', a .gguf file or a local HF model directory"""
    pairs: list[str] = option(factory=list, action="append", metavar="SPEC")
    """a pairing (repeatable)"""
    plan: list[str] = option(factory=list, action="append", metavar="FILE")
    """a plan file (repeatable)"""
    dtypes: str = option("f32,q8_0")
    """comma-separated GGUF dtypes each pairing is exported in"""
    windows: int = option(32, parse=positive_int)
    """evenly spaced WikiText-2 test windows"""
    window: int = option(512, parse=int_at_least(2))
    """tokens per window"""
    tokens: int = option(32, parse=int_at_least(2))
    """greedy tokens compared"""
    threads: int = option(2, parse=positive_int)
    """llama.cpp threads"""
    data_dir: str | None = option(None)
    """evaluation data directory (default: $LP_FX_DATA, else ../shared/data)"""
    json: str | None = option(None)
    """write the figures here"""


def build_parser() -> OneLineParser:
    """The command line of ``python -m lp_fx.tools.cli.llamacpp_check``."""
    parser = OneLineParser(prog="python -m lp_fx.tools.cli.llamacpp_check",
                           description="exports in llama.cpp vs the layer_parallel pass")
    add_options(parser, CheckArgs)
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
