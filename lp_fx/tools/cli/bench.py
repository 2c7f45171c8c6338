"""``lp-fx bench``: decode tokens/s of TP vs TP + LP vs one device under ``torchrun``
(:mod:`lp_fx.tools.cli.bench`), of one device alone (``--single``, :mod:`lp_fx.tools.speed.single`)
or of exported GGUFs in llama.cpp (``--llamacpp``, :mod:`lp_fx.tools.speed.llamacpp`).

``torchrun`` starts this module (``python -m lp_fx.tools.cli.bench``) in every rank; the arguments
reach the ranks through the environment.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from lp_fx.config import DEFAULTS, INNER_COMPILERS, PAIRING_MODES
from lp_fx.files import check_files_writable, write_json
from lp_fx.pairing import check_range
from lp_fx.tools.console import say
from lp_fx.tools.models import PRECISIONS
from lp_fx.tools.cli.common import ModelSpec, add_command
from lp_fx.tools.options import OneLineParser, add_options, int_at_least, non_negative_int, option, positive_int
from lp_fx.tools.speed import llamacpp, ranks
from lp_fx.tools.speed.single import run_single
from lp_fx.tools.speed.timing import PROMPT

_ARGS_VAR = "LP_FX_BENCH_ARGS"


SINGLE = "one device (--single): Inductor vs LP vs LP + fuse, no torchrun"
LLAMACPP = "llama.cpp (--llamacpp): exported GGUFs, no torchrun"


@dataclass(frozen=True)
class BenchArgs(ModelSpec):
    """``lp-fx bench``'s options."""

    start: int = option(14, parse=non_negative_int)
    """first layer of the paired range start:end"""
    end: int = option(28, parse=positive_int)
    """end of the paired range (exclusive; end - start even)"""
    modes: list[str] = option(factory=lambda: list(PAIRING_MODES), nargs="+", choices=PAIRING_MODES)
    """pairing modes timed, each a variant"""
    inner: str = option(DEFAULTS["inner"], choices=INNER_COMPILERS)
    """compiler behind the layer_parallel backend"""
    tokens: int = option(32, parse=int_at_least(2))
    """new tokens per generation (decode speed is timed from the first to the last)"""
    rounds: int = option(5, parse=positive_int)
    """timed generations per variant, interleaved"""
    prompt: str = option(PROMPT)
    """the prompt every variant continues"""
    quantize: str = option("fp32", choices=PRECISIONS)
    """int8: torchao int8 weight-only linears (a quarter of the weight traffic)"""
    nproc: int = option(2, parse=positive_int)
    """processes (devices) torchrun starts"""
    no_single: bool = option(False)
    """skip the single-device variant"""
    single: bool = option(False, group=SINGLE)
    """benchmark on one device: plain Inductor, LP and LP + fuse=True (see lp_fx/tools/speed/single.py)"""
    device: str = option("cpu", choices=("cpu", "cuda"), group=SINGLE)
    """the device of --single"""
    dtype: str = option("fp32", choices=("fp32", "bf16"), group=SINGLE)
    """the weights' dtype with --single"""
    cudagraphs: bool = option(False, group=SINGLE)
    """Inductor's CUDA graphs for every variant (CUDA only)"""
    llamacpp: list[str] | None = option(None, nargs="+", metavar="GGUF", group=LLAMACPP)
    """decode tokens/s in llama.cpp of GGUFs from `lp-fx export`, each paired one as a ratio to the unpaired
    export (--pairs baseline) of the same dtype; uses --tokens, --rounds, --prompt"""
    threads: int = option(2, parse=int, group=LLAMACPP)
    """llama.cpp threads (the same for every GGUF)"""
    flash_attn: bool = option(False, group=LLAMACPP)
    """llama.cpp flash attention (without it the V cache of every layer is padded to the widest layer's)"""
    json: str = option("lp-fx-results/bench.json")
    """where rank 0 writes the results (folders are created)"""


def main(argv: Sequence[str] | None = None) -> None:
    parser = OneLineParser(prog="lp-fx bench", description=__doc__.splitlines()[0])
    add_options(parser, BenchArgs)
    if argv is None and _ARGS_VAR in os.environ:
        argv = shlex.split(os.environ[_ARGS_VAR])
    bench(parser.parse_args(argv))


def bench(args: argparse.Namespace) -> None:
    """Run inside torchrun, or start torchrun with ``args.nproc`` processes running this module."""
    if "LOCAL_RANK" in os.environ:
        ranks.run(args)
        return
    check_files_writable(args.json)  # before the work, not after it
    if args.llamacpp:
        _bench_llamacpp(args)
        return
    check_range(args.start, args.end)  # before torchrun starts: its ranks would each fail with a traceback
    if args.single:
        run_single(args)
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
           "--standalone", "-m", "lp_fx.tools.cli.bench"]
    # Passed by environment: torchrun's own parser would claim --start (as --start-method).
    code = subprocess.call(cmd, env={**os.environ, _ARGS_VAR: shlex.join(_argv(args))})
    if code:
        raise RuntimeError(f"torchrun exited with status {code}")


def _bench_llamacpp(args: argparse.Namespace) -> None:
    result = llamacpp.time_ggufs(args.llamacpp, args.threads, args.tokens, args.rounds, args.prompt, args.flash_attn)
    say(f"llama.cpp, {args.threads} threads, flash attention {'on' if args.flash_attn else 'off'}, "
        f"{args.tokens} tokens after the prompt, {args.rounds} rounds interleaved, "
        "batch 1; median decode tokens/s, median per-round ratio to the unpaired export of the same dtype")
    say(llamacpp.bench_table(result))
    write_json(args.json, result, indent=1)
    say(f"wrote {args.json}")


def _argv(args: argparse.Namespace) -> list[str]:
    """The command line that gives back ``args`` (for the processes torchrun starts)."""
    names = ("model", "start", "end", "inner", "tokens", "rounds", "prompt", "quantize", "nproc", "json")
    out = [part for name in names for part in (f"--{name}", str(getattr(args, name)))]
    out += ["--modes", *args.modes] + ["--no-single"] * args.no_single + ["--verbose"] * args.verbose
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bench`` to the ``lp-fx`` command line (``subparsers`` from ``add_subparsers``)."""
    add_command(subparsers, "bench", "decode tokens/s: TP vs TP+LP vs one device; --single: Inductor vs LP vs LP + fuse "
                "on one device", BenchArgs, bench)


if __name__ == "__main__":
    main()
