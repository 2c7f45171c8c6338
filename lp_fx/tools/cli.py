"""``lp-fx``: measure what pairing costs (``eval``), sweep Δ (``sweep``), choose pairs (``plan``),
win it back (``finetune``), time it (``bench``), serve it anywhere (``export``).

Each subcommand is one module that owns its arguments (``register``) and its run; a new
subcommand is one more module in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from lp_fx.tools import bench
from lp_fx.tools.arguments import OneLineParser
from lp_fx.tools.console import ERRORS, refuse
from lp_fx.tools.commands import eval as eval_command
from lp_fx.tools.commands import export as export_command
from lp_fx.tools.commands import finetune as finetune_command
from lp_fx.tools.commands import frontier as frontier_command
from lp_fx.tools.commands import plan as plan_command
from lp_fx.tools.commands import sweep as sweep_command

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    eval_command.register, sweep_command.register, plan_command.register, finetune_command.register, bench.register,
    export_command.register, frontier_command.register,
]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="lp-fx", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for register in SUBCOMMANDS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``lp-fx`` command; its exit status (2: a refused command line or argument)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or a bad command line (already reported on one line)
        return int(exit_.code or 0)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        args.func(args)
    except ERRORS as error:
        return refuse(f"lp-fx {args.command}", error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
