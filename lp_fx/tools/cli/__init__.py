"""``lp-fx``: measure what pairing costs (``eval``), sweep Δ (``sweep``), choose pairs (``plan``),
win it back (``finetune``), time it (``bench``), serve it anywhere (``export``), check a device
(``gpu-check``).

Each subcommand is one module of this folder that owns its arguments (``register``) and its run; a
new subcommand is one more module in ``SUBCOMMANDS``. ``lp-fx-lm-eval`` is :mod:`.lm_eval`, and
``python -m lp_fx.tools.cli.llamacpp_check`` checks exports in llama.cpp. Nothing else imports this folder.
"""

from __future__ import annotations

import argparse
import logging
from typing import Callable, Sequence

from lp_fx.tools.cli import bench, eval, export, finetune, frontier, gpu_check, plan, sweep
from lp_fx.tools.console import ERRORS, refuse
from lp_fx.tools.options import OneLineParser

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    eval.register, sweep.register, plan.register, finetune.register, bench.register, export.register, frontier.register,
    gpu_check.register,
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
