"""``lp-fx bench --single``: decode speed on ONE device of plain Inductor, LP pairs and LP + ``fuse``.

On one device a pair runs both of its layers, so LP alone cannot be faster than Inductor; with
``fuse=True`` the pair's GEMMs run batched, which at batch 1 (GEMMs bound by weight bytes and
launch latency) can be. Each variant is a copy of the model compiled its way, warmed up with the
same generation, then the variants are timed interleaved, round after round
(:mod:`lp_fx.tools.speed.timing`, as ``lp-fx bench`` does); ratios are per-round medians against Inductor. GEMM launches per
generated token are counted with the torch profiler (CPU-side ``aten`` GEMM calls of one warm
generation, divided by the number of forwards: prefill and decode graphs hold the same GEMMs).
With ``--cudagraphs`` (CUDA) the kernels replay as CUDA graphs, which the profiler does not see
op by op; the report's per-graph GEMM counts are printed instead.
"""

from __future__ import annotations

import argparse
import logging
import statistics
from dataclasses import asdict, dataclass, field

import torch

from lp_fx.config import DEFAULTS
from lp_fx.tools.console import say
from lp_fx.files import write_json
from lp_fx.tools.speed.timing import (
    compile_and_warm_up,
    generate,
    load_prompted,
    print_texts,
    ratio_to_first,
    static_graphs_per_variant,
    time_interleaved,
)

GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_int_mm", "aten::_weight_int8pack_mm"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class SingleVariant:
    """One way of compiling the model on one device; ``options`` None is plain ``torch.compile``."""

    name: str
    options: dict | None
    tokens_per_s: list[float] = field(default_factory=list)
    gemms_per_token: float | None = None
    graph_gemms: list[tuple[int, int] | None] = field(default_factory=list)
    resident_bytes: int | None = None
    fused: list = field(default_factory=list)


def single_variants(
    start: int, end: int, modes: list[str], cudagraphs: bool = False, inner: str = DEFAULTS["inner"]
) -> list[SingleVariant]:
    """Inductor, then for each mode LP and LP + fuse, all with ``inner`` behind the LP backend."""
    out = [SingleVariant("Inductor", None)]
    for mode in modes:
        lp = {"start": start, "end": end, "mode": mode, "inner": inner, "cudagraphs": cudagraphs}
        out += [SingleVariant(f"LP {mode}", lp), SingleVariant(f"LP {mode} + fuse", {**lp, "fuse": True})]
    return out


def gemm_launches_per_token(model: torch.nn.Module, ids: torch.Tensor, tokens: int) -> float:
    """GEMM calls seen by the profiler in one greedy generation of ``tokens``, per forward."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        generate(model, ids, tokens)
    calls = sum(e.count for e in prof.key_averages() if e.key in GEMM_OPS)
    return calls / tokens


def run_single(args: argparse.Namespace) -> dict:
    """Compile, warm up, count GEMMs, time interleaved; print the table and write JSON."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available here")
    if args.cudagraphs and device.type != "cuda":
        raise ValueError("--cudagraphs needs --device cuda")
    static_graphs_per_variant()
    loaded, ids = load_prompted(args, DTYPES[args.dtype], device)
    todo = single_variants(args.start, args.end, args.modes, args.cudagraphs, args.inner)

    def note(variant: SingleVariant, copy_: torch.nn.Module, backend) -> None:
        if not args.cudagraphs:
            variant.gemms_per_token = gemm_launches_per_token(copy_, ids, args.tokens)
        if backend is not None:
            variant.graph_gemms = [r.gemms for r in backend.reports]
            variant.fused = [r.pairs_fused for r in backend.reports]

    # two warm-ups: the compile, then a warm run (CUDA graphs record on the first calls)
    compiled = compile_and_warm_up(loaded.model, todo, ids, args.tokens, note, warm_ups=2, cudagraphs=args.cudagraphs)
    texts = time_interleaved(compiled, todo, ids, args.tokens, args.rounds)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    say(f"{loaded.name}: {loaded.num_layers} layers, Δ={args.end - args.start} (start={args.start}, end={args.end}), "
        f"one device ({device_name}), {args.dtype}, weights {args.quantize}, CUDA graphs {args.cudagraphs}, "
        f"batch 1, static cache, {args.tokens} tokens, {args.rounds} rounds interleaved")
    say(single_table(todo))
    print_texts(loaded.tokenizer, texts)
    result = {
        "model": loaded.name, "layers": loaded.num_layers, "device": device_name, "args": vars(args),
        "ratio_to_inductor": {v.name: ratio_to_first(v, todo[0]) for v in todo},
        "variants": [asdict(v) for v in todo],
    }
    write_json(args.json, result, indent=1)
    say(f"wrote {args.json}")
    return result


def single_table(todo: list[SingleVariant]) -> str:
    """Median tokens/s, per-round ratio to Inductor, GEMMs per token and their ratio to the unfused LP."""
    lines = [f"{'variant':<16}{'tok/s':>9}{'vs Inductor':>13}{'GEMMs/token':>13}{'vs LP':>8}{'MiB':>8}  GEMMs per graph"]
    unfused = {}
    for v in todo:
        gemms = "" if v.gemms_per_token is None else f"{v.gemms_per_token:.1f}"
        base = unfused.get(v.name.removesuffix(" + fuse"))
        vs_lp = f"{v.gemms_per_token / base:.3f}" if v.name.endswith(" + fuse") and base and v.gemms_per_token else ""
        if not v.name.endswith(" + fuse"):
            unfused[v.name] = v.gemms_per_token
        lines.append(
            f"{v.name:<16}{statistics.median(v.tokens_per_s):>9.2f}{ratio_to_first(v, todo[0]):>13.3f}{gemms:>13}"
            f"{vs_lp:>8}{v.resident_bytes / 2**20:>8.0f}  {v.graph_gemms or ''}"
        )
    return "\n".join(lines)
