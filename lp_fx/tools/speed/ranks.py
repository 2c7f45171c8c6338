"""Decode speed of TP only, TP + LP (``lp``, ``block``) and one device, measured in one run.

``lp-fx bench`` (:mod:`lp_fx.tools.cli.bench`) relaunches itself under ``torchrun`` with
``--nproc`` processes, each running :func:`run`. Every rank loads the model, compiles one copy per variant (same prompt,
static cache, batch 1, greedy), warms each up, then times the variants interleaved, round after
round (:mod:`lp_fx.tools.speed.timing`). The single-device variant runs on rank 0 while the other ranks
wait. Rank 0 prints a table and writes JSON. ``--single`` (:mod:`lp_fx.tools.speed.single`) and
``--llamacpp`` (:mod:`lp_fx.tools.speed.llamacpp`) time one device and exported GGUFs instead.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from lp_fx.files import write_json
from lp_fx.tools.console import say
from lp_fx.tools.speed.timing import (
    compile_and_warm_up,
    load_prompted,
    print_texts,
    ratio_to_first,
    static_graphs_per_variant,
    time_interleaved,
)


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


def time_variants(model: torch.nn.Module, ids: torch.Tensor, todo: list[Variant], tokens: int, rounds: int) -> dict:
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
    texts = time_variants(loaded.model, ids, todo, args.tokens, args.rounds)
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
