"""Decode speed of TP only, TP + LP (``lp``, ``block``) and one device, measured in one run.

``python -m lp_fx.tools.bench`` (or ``lp-fx bench``) relaunches itself under ``torchrun`` with
``--nproc`` processes. Every rank loads the model, compiles one copy per variant (same prompt,
static cache, batch 1, greedy), warms each up, then times the variants interleaved, round after
round (:mod:`lp_fx.tools.timing`). The single-device variant runs on rank 0 while the other ranks
wait. Rank 0 prints a table and writes JSON. ``--single`` (:mod:`lp_fx.tools.bench_single`) and
``--llamacpp`` (:mod:`lp_fx.tools.llamacpp`) time one device and exported GGUFs instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from lp_fx.config import DEFAULTS, INNER_COMPILERS, PAIRING_MODES, check_range
from lp_fx.tools.bench_single import run_single
from lp_fx.tools.arguments import OneLineParser, int_at_least, non_negative_int, positive_int
from lp_fx.tools.console import say
from lp_fx.tools.files import check_files_writable, write_json
from lp_fx.tools.models import PRECISIONS
from lp_fx.tools.timing import (
    PROMPT,
    compile_and_warm_up,
    load_prompted,
    print_texts,
    ratio_to_first,
    static_graphs_per_variant,
    time_interleaved,
)

_ARGS_VAR = "LP_FX_BENCH_ARGS"


@dataclass
class Variant:
    """One way of compiling the model; ``options`` go to the ``layer_parallel`` backend."""

    name: str
    options: dict
    distributed: bool = True
    tokens_per_s: list[float] = field(default_factory=list)
    collectives: list[int | None] = field(default_factory=list)
    resident_bytes: int | None = None


def variants(start: int, end: int, modes: Sequence[str], inner: str, single: bool) -> list[Variant]:
    """TP only, TP + LP per mode, and (optionally) one device, all through the same backend."""
    placed = {"mesh": "auto", "inner": inner, "free_weights": True}
    out = [Variant("TP", placed)]
    out += [Variant(f"TP+LP {m}", {**placed, "start": start, "end": end, "mode": m}) for m in modes]
    if single:
        out.append(Variant("1 device", {"inner": inner}, distributed=False))
    return out


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def measure(model: torch.nn.Module, ids: torch.Tensor, todo: list[Variant], tokens: int, rounds: int) -> dict:
    """Compile and warm up every variant, then time them interleaved; returns rank 0's texts.
    The single-device variant runs on rank 0 alone; the ranks meet after every variant."""
    rank = torch.distributed.get_rank()

    def note(variant: Variant, copy_: torch.nn.Module, backend) -> None:
        variant.collectives = [r.collectives for r in backend.reports]

    compiled = compile_and_warm_up(model, todo, ids, tokens, note, runs_here=lambda v: v.distributed or rank == 0,
                                   after_each=_barrier)
    return time_interleaved(compiled, todo, ids, tokens, rounds, after_each=_barrier)


def all_reduce_ms(numel: int, repeats: int = 200) -> float:
    """Median latency of one all-reduce of ``numel`` floats over the default group, in ms.

    Multi-rank decode on CPUs is communication-bound, so the LP/TP ratio depends on this number;
    it is measured in the same run so that the ratio can be read against it.
    """
    x = torch.zeros(numel)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.distributed.all_reduce(x)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def table(todo: list[Variant], num_layers: int, delta: int) -> str:
    """Median decode tokens/s per variant, its ratio to TP, and the ideal ratio L / (L - Δ/2)."""
    ideal = num_layers / (num_layers - delta / 2)
    lines = [f"{'variant':<14}{'tok/s':>9}{'vs TP':>8}{'ideal':>8}{'MiB rank 0':>12}  all-reduces/graph  runs"]
    for v in todo:
        med = statistics.median(v.tokens_per_s)
        lp = v.name.startswith("TP+LP")
        runs = " ".join(f"{t:.1f}" for t in v.tokens_per_s)
        lines.append(
            f"{v.name:<14}{med:>9.2f}{ratio_to_first(v, todo[0]):>8.3f}{(f'{ideal:.3f}' if lp else ''):>8}"
            f"{v.resident_bytes / 2**20:>12.0f}  {str(v.collectives):<17}  {runs}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    """The body of the benchmark, on every rank (inside torchrun)."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    torch.distributed.init_process_group("gloo")
    static_graphs_per_variant()
    rank = torch.distributed.get_rank()
    loaded, ids = load_prompted(args)
    todo = variants(args.start, args.end, args.modes, args.inner, not args.no_single)
    hidden = loaded.model.config.hidden_size
    latency = [all_reduce_ms(hidden)]
    texts = measure(loaded.model, ids, todo, args.tokens, args.rounds)
    latency.append(all_reduce_ms(hidden))
    if rank == 0:
        delta = args.end - args.start
        say(f"{loaded.name}: {loaded.num_layers} layers, Δ={delta} (start={args.start}, end={args.end}), "
            f"world={torch.distributed.get_world_size()}, inner={args.inner}, weights {args.quantize}, {args.tokens} tokens, "
            f"{args.rounds} rounds, batch 1, static cache; median decode tokens/s, median per-round ratio to TP")
        say(table(todo, loaded.num_layers, delta))
        say(f"gloo all-reduce of {hidden} floats: {latency[0]:.2f} ms before the timed rounds, {latency[1]:.2f} ms after")
        print_texts(loaded.tokenizer, texts)
        result = {"model": loaded.name, "layers": loaded.num_layers, "start": args.start, "end": args.end,
                  "ideal": loaded.num_layers / (loaded.num_layers - delta / 2), "args": vars(args),
                  "ratio_to_tp": {v.name: ratio_to_first(v, todo[0]) for v in todo},
                  "all_reduce_ms": latency,
                  "variants": [asdict(v) for v in todo]}
        write_json(args.json, result, indent=1)
        say(f"wrote {args.json}")
    torch.distributed.destroy_process_group()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="'smollm2', a .gguf file or a Hugging Face directory")
    parser.add_argument("--start", type=non_negative_int, default=14)
    parser.add_argument("--end", type=positive_int, default=28)
    parser.add_argument("--modes", nargs="+", default=list(PAIRING_MODES), choices=PAIRING_MODES)
    parser.add_argument("--inner", default=DEFAULTS["inner"], choices=INNER_COMPILERS)
    parser.add_argument("--tokens", type=int_at_least(2), default=32,
                        help="new tokens per generation (decode speed is timed from the first to the last)")
    parser.add_argument("--rounds", type=positive_int, default=5, help="timed generations per variant, interleaved")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--quantize", default="fp32", choices=PRECISIONS,
                        help="int8: torchao int8 weight-only linears (a quarter of the weight traffic)")
    parser.add_argument("--nproc", type=positive_int, default=2, help="processes (devices) torchrun starts")
    parser.add_argument("--no-single", action="store_true", help="skip the single-device variant")
    single = parser.add_argument_group("one device (--single): Inductor vs LP vs LP + fuse, no torchrun")
    single.add_argument("--single", action="store_true",
                        help="benchmark on one device: plain Inductor, LP and LP + fuse=True (see lp_fx/tools/bench_single.py)")
    single.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    single.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    single.add_argument("--cudagraphs", action="store_true", help="Inductor's CUDA graphs for every variant (CUDA only)")
    cpp = parser.add_argument_group("llama.cpp (--llamacpp): exported GGUFs, no torchrun")
    cpp.add_argument("--llamacpp", nargs="+", metavar="GGUF", default=None,
                     help="decode tokens/s in llama.cpp of GGUFs from `lp-fx export`, each paired one as a ratio to the "
                     "unpaired export (--pairs baseline) of the same dtype; uses --tokens, --rounds, --prompt")
    cpp.add_argument("--threads", type=int, default=2, help="llama.cpp threads (the same for every GGUF)")
    cpp.add_argument("--flash-attn", action="store_true",
                     help="llama.cpp flash attention (without it the V cache of every layer is padded to the widest layer's)")
    parser.add_argument("--json", default="lp-fx-results/bench.json", help="where rank 0 writes the results (folders are created)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")


def main(argv: Sequence[str] | None = None) -> None:
    parser = OneLineParser(prog="lp-fx bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    if argv is None and _ARGS_VAR in os.environ:
        argv = shlex.split(os.environ[_ARGS_VAR])
    bench(parser.parse_args(argv))


def bench(args: argparse.Namespace) -> None:
    """Run inside torchrun, or start torchrun with ``args.nproc`` processes running this module."""
    if "LOCAL_RANK" in os.environ:
        run(args)
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
           "--standalone", "-m", "lp_fx.tools.bench"]
    # Passed by environment: torchrun's own parser would claim --start (as --start-method).
    code = subprocess.call(cmd, env={**os.environ, _ARGS_VAR: shlex.join(_argv(args))})
    if code:
        raise RuntimeError(f"torchrun exited with status {code}")


def _bench_llamacpp(args: argparse.Namespace) -> None:
    from lp_fx.tools import llamacpp

    result = llamacpp.bench(args.llamacpp, args.threads, args.tokens, args.rounds, args.prompt, args.flash_attn)
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


def register(subparsers) -> None:
    """Add ``bench`` to the ``lp-fx`` command line (``subparsers`` from ``add_subparsers``)."""
    parser = subparsers.add_parser(
        "bench", help="decode tokens/s: TP vs TP+LP vs one device; --single: Inductor vs LP vs LP + fuse on one device"
    )
    add_arguments(parser)
    parser.set_defaults(func=bench)


if __name__ == "__main__":
    main()
