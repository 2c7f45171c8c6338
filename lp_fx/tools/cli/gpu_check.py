"""``lp-fx gpu-check``: one device's figures in one run (:mod:`lp_fx.tools.device_check`): the pass
against its eager reference, decode speed, llama.cpp; exit status 1 when a phase failed."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from lp_fx.tools.cli.common import ModelSpec, add_command
from lp_fx.tools.console import say
from lp_fx.tools.device_check import report
from lp_fx.tools.device_check.options import CheckOptions
from lp_fx.tools.device_check.phases import check_device
from lp_fx.tools.options import option, options_from


@dataclass(frozen=True)
class GpuCheckArgs(ModelSpec):
    """``lp-fx gpu-check``'s options: the model, and the check's own."""

    check: CheckOptions = option(factory=CheckOptions)


def register(subparsers: argparse._SubParsersAction) -> None:
    add_command(subparsers, "gpu-check", "the device figures in one run: correctness against eager, decode speed, "
                "llama.cpp (CUDA when present, else the CPU)", GpuCheckArgs, run)


def run(args: argparse.Namespace) -> None:
    options = options_from(CheckOptions, args)
    record = check_device(args.model, options)
    say(report.markdown(record))
    failed = report.failed_phases(record)
    json_path = Path(options.out) / report.JSON_NAME
    if failed:
        raise SystemExit(f"lp-fx gpu-check: phases failed: {', '.join(failed)} (see {json_path})")
