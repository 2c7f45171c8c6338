"""``lp-fx gpu-check``: the device figures in one prepared run, on CUDA when present, else on the CPU.

Phases, in the order their figures matter (a lease that ends mid-run keeps the first ones): load
the model; per dtype (bf16, then fp32) the correctness of the pass compiled with Inductor against
the independent eager reference of the same pairing (:mod:`lp_fx.tools.reference`) on the same
device (the unpaired model, ``lp`` and ``block`` over ``--start:--end``, and the planner's plan:
the largest logit difference and the perplexity of both on a few WikiText-2 windows); decode speed
at batch 1 and 8 of the unpaired model, the ``lp`` pairing and the pairing fused, timed interleaved
(:class:`lp_fx.tools.frontier_speed.SpeedBench`), every variant through the backend, with its own
``cudagraphs`` option on CUDA (``torch.compile``'s ``mode=`` cannot be given with options); the
exports in llama.cpp where a build for the device is importable. Each phase is logged with its
time, and the JSON and Markdown table in ``--out`` are written again after each phase.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import logging
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lp_fx.config import INNER_COMPILERS, check_range, load_plan, pairs_from_range
from lp_fx.tools import data, evaluate
from lp_fx.tools.arguments import int_at_least, positive_int
from lp_fx.tools.console import say
from lp_fx.tools.evaluate import BASELINE, Pairing
from lp_fx.tools.files import atomic_write, check_folder_writable, write_json
from lp_fx.tools.reference import eager_pairing

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
BATCHES = (1, 8)
# Largest logit difference to the eager reference, relative to the largest reference logit, that
# passes: fp32 rounding, and bf16 rounding (Inductor keeps fused intermediates in fp32, eager rounds
# every op to bf16).
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}
PLAN = data.REPO_ROOT / "docs" / "results" / "plan_smollm2_7pairs.json"  # the planner's committed pairing
JSON_NAME, TABLE_NAME = "gpu_check.json", "gpu_check.md"


class CheckFailed(RuntimeError):
    """A compiled pairing that does not compute what its eager reference does."""


@dataclass
class Run:
    """What the phases share: the options, the device, the model and data, and the record written."""

    args: argparse.Namespace
    device: torch.device
    record: dict
    loaded: object = None  # lp_fx.tools.models.LoadedModel
    windows: torch.Tensor | None = None
    pairings: list[Pairing] = field(default_factory=list)

    @property
    def delta(self) -> int:
        return self.args.end - self.args.start


def device_of(name: str) -> torch.device:
    """``auto``: CUDA when present, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here; give --device auto or cpu")
    return torch.device(name)


def dtypes_in_order(args: argparse.Namespace, device: torch.device) -> list[str]:
    """``--dtypes``, else bf16 first on CUDA (the GPU's serving dtype) and fp32 first on a CPU (most
    have no bf16 units: this project's AVX2 VM emulates bf16, many times slower than fp32)."""
    return args.dtypes or (["bf16", "fp32"] if device.type == "cuda" else ["fp32", "bf16"])


def phases(args: argparse.Namespace, dtypes: list[str]) -> list[tuple[str, Callable[[Run], str | None]]]:
    """``(name, work)`` after the load, in run order; ``--quick``: the first dtype, batch 1, no llama.cpp."""
    out: list[tuple[str, Callable[[Run], str | None]]] = []
    for dtype in dtypes[:1] if args.quick else dtypes:
        out.append((f"correctness {dtype}", lambda run, dtype=dtype: correctness(run, dtype)))
        for batch in BATCHES[:1] if args.quick else BATCHES:
            out.append((f"speed {dtype} batch {batch}", lambda run, dtype=dtype, batch=batch: speed(run, dtype, batch)))
    if not args.quick:
        out.append(("llama.cpp", llamacpp_speed))
    return out


def load(run: Run) -> None:
    """The model (fp32, on the CPU: each phase copies it to the device in its dtype), the windows
    and the pairings, each pairing checked against the model."""
    from lp_fx.tools.commands.options import parse_pairing
    from lp_fx.tools.models import load_model

    args = run.args
    run.loaded = random_weights(args.model) if args.random_weights else load_model(args.model, progress=False)
    layers = run.loaded.num_layers
    run.windows = evaluate.wikitext_windows(run.loaded.tokenizer, data.resolve_data_dir(args.data_dir), args.window,
                                            "all", args.windows)
    pairs = pairs_from_range(args.start, args.end)
    run.pairings = [BASELINE, *(Pairing(f"{mode} {args.start}:{args.end}", pairs, (mode,) * len(pairs))
                                for mode in ("lp", "block"))]
    if args.plan != "none":
        run.pairings.append(parse_pairing(args.plan, layers))
    for pairing in run.pairings:
        evaluate.check_pairing(run.loaded.model, pairing)
    run.record.update(model=run.loaded.name, weights="random (seed 0)" if args.random_weights else args.model,
                      layers=layers, delta=run.delta, ideal=layers / (layers - run.delta / 2),
                      windows=int(run.windows.shape[0]), window=args.window,
                      pairings=[pairing.to_json() for pairing in run.pairings])


def random_weights(directory: str):
    """A :class:`~lp_fx.tools.models.LoadedModel` from a Hugging Face folder's config and tokenizer,
    its weights drawn at random (seed 0): the model's shape without its weight files."""
    from lp_fx.tools.models import LoadedModel, quiet_imports

    with quiet_imports():
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return LoadedModel(model, tokenizer, f"{Path(directory).name} (random weights)")


def dtype_list(text: str) -> list[str]:
    """An argparse ``type``: comma-separated names of :data:`DTYPES`."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names or set(names) - set(DTYPES):
        raise argparse.ArgumentTypeError(f"{text!r} is not valid; give comma-separated names from {', '.join(DTYPES)}")
    return names


def on_device(run: Run, dtype: str) -> torch.nn.Module:
    """A copy of the model on the run's device in ``dtype``."""
    return copy.deepcopy(run.loaded.model).to(device=run.device, dtype=DTYPES[dtype])


def correctness(run: Run, dtype: str) -> None:
    """Each pairing compiled (``--inner`` behind the backend) against its eager reference, on the same
    windows; the model is traced by Dynamo once and each pairing compiled from that trace."""
    model = on_device(run, dtype)
    windows = run.windows.to(run.device)
    switch = evaluate.PairingSwitch(model, run.args.inner)
    for pairing in run.pairings:
        began = time.monotonic()
        switch.set_pairing(pairing)  # the compile, but the first: Dynamo traces at the first call
        row = {"dtype": dtype, "pairing": pairing.name, **compare(model, switch.logits, pairing, windows)}
        row.update(ok=row["relative_diff"] <= TOLERANCE[dtype], seconds=round(time.monotonic() - began, 1))
        run.record["correctness"].append(row)
        write_outputs(run)  # a phase of several compiles: each row is kept as soon as it is measured
        log.info("correctness %s %s: %s", dtype, pairing.name, row)
    torch._dynamo.reset()
    wrong = [row["pairing"] for row in run.record["correctness"] if row["dtype"] == dtype and not row["ok"]]
    if wrong:
        raise CheckFailed(f"{', '.join(wrong)}: logits differ from the eager reference by more than {TOLERANCE[dtype]:g} "
                          "of the largest logit")


def compare(model: torch.nn.Module, paired: evaluate.LogitsFn, pairing: Pairing, windows: torch.Tensor) -> dict:
    """The eager reference's logits and perplexity on ``windows``, then those of ``paired`` (the
    compiled pass) and the largest absolute difference between the two logits."""
    expected: list[torch.Tensor] = []
    diffs: list[float] = []

    def reference(ids: torch.Tensor) -> torch.Tensor:
        expected.append(model(input_ids=ids, use_cache=False).logits)
        return expected[-1]

    def compiled(ids: torch.Tensor) -> torch.Tensor:
        logits = paired(ids)
        diffs.append((logits.float() - expected[len(diffs)].float()).abs().max().item())
        return logits

    with eager_pairing(model, pairing.pairs, pairing.modes or "lp"):
        eager = evaluate.perplexity(reference, windows, progress=False)
    got = evaluate.perplexity(compiled, windows, progress=False)
    scale = max(logits.float().abs().max().item() for logits in expected)
    return {"pairs": [list(pair) for pair in pairing.pairs], "modes": list(pairing.modes or ()),
            "max_abs_diff": max(diffs), "max_abs_logit": scale, "relative_diff": max(diffs) / scale,
            "ppl_eager": eager.ppl, "ppl_compiled": got.ppl, "ppl_relative_diff": got.ppl / eager.ppl - 1}


def speed(run: Run, dtype: str, batch: int) -> None:
    """Unpaired, ``lp`` paired and paired + fuse, compiled alike, timed interleaved at ``batch``."""
    from torch._dynamo.utils import counters

    from lp_fx.tools.frontier_speed import SpeedBench

    cuda = run.device.type == "cuda" and run.args.inner == "inductor"  # CUDA graphs are Inductor's
    bench = SpeedBench(run.loaded.tokenizer, run.args.inner, run.args.tokens, run.args.rounds, batch=batch,
                       shared={"cudagraphs": cuda})
    lp = run.pairings[1]
    skips = counters["inductor"]["cudagraph_skips"]
    record = bench.one_device(on_device(run, dtype), [(lp, {"pairs": [list(p) for p in lp.pairs], "mode": "lp"})])[0]
    record.update(dtype=dtype, pairing=lp.name, cudagraphs=cuda,
                  cudagraph_skips=counters["inductor"]["cudagraph_skips"] - skips)
    run.record["speed"].append(record)
    log.info("speed %s batch %d: %s", dtype, batch, record["ratio"])


def llamacpp_speed(run: Run) -> str | None:
    """The ``lp`` export against the unpaired export in llama.cpp, or why not (a skip line)."""
    try:
        import llama_cpp
    except ImportError:
        return "skipped: llama_cpp (llama-cpp-python) is not importable here"
    if run.device.type == "cuda":
        return ("skipped: lp_fx.tools.llamacpp opens GGUFs without GPU offload (no n_gpu_layers), so it would time "
                f"the CPU, not {torch.cuda.get_device_name(run.device)} (llama_cpp {llama_cpp.__version__})")
    import tempfile

    from lp_fx.tools.export import Source
    from lp_fx.tools.frontier_speed import LlamaCppBench
    from lp_fx.tools.models import resolve_model_path

    directory, gguf_file = resolve_model_path(run.args.model)
    with tempfile.TemporaryDirectory() as folder:
        bench = LlamaCppBench(Path(folder), Source(run.loaded.name, directory / (gguf_file or "")),
                              torch.get_num_threads(), run.args.tokens, run.args.rounds)
        run.record["llamacpp"] = bench.ratio(run.loaded.model, run.pairings[1])
    return None


def run_phase(run: Run, name: str, work: Callable[[Run], str | None], refused: tuple = ()) -> bool:
    """Run one phase, record its status and time, write both files. A failure is recorded, not
    raised, except one of ``refused`` (bad input: raised before anything is written)."""
    say(f"gpu-check: {name} …")
    began = time.monotonic()
    entry: dict = {"name": name}
    try:
        skipped = work(run)
        entry["status"] = skipped or "ok"
    except refused:
        raise
    except Exception as error:  # noqa: BLE001 - recorded; the later phases still measure what they can
        log.exception("phase %s failed", name)
        entry["status"] = f"failed: {type(error).__name__}: {error}"
    entry["seconds"] = round(time.monotonic() - began, 1)
    run.record["phases"].append(entry)
    write_outputs(run)
    say(f"gpu-check: {name}: {entry['status']} ({entry['seconds']} s)")
    return not entry["status"].startswith("failed")


def new_record(args: argparse.Namespace, device: torch.device) -> dict:
    """The JSON's head: when, where and with what it ran."""
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    return {"started": datetime.datetime.now().isoformat(timespec="seconds"), "command": sys.argv,
            "device": name, "threads": torch.get_num_threads(), "quick": args.quick, "inner": args.inner,
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                         "transformers": transformers.__version__},
            "tolerance": TOLERANCE, "phases": [], "correctness": [], "speed": []}


def write_outputs(run: Run) -> None:
    out = Path(run.args.out)
    write_json(out / JSON_NAME, run.record, indent=1)
    atomic_write(out / TABLE_NAME, lambda tmp: tmp.write_text(markdown(run.record), encoding="utf-8"))


def markdown(record: dict) -> str:
    """The record as Markdown tables: phases, correctness, speed, llama.cpp."""
    lines = [f"# lp-fx gpu-check: {record.get('model', '?')} on {record['device']}", "",
             f"{record['started']}; torch {record['versions']['torch']}, CUDA {record['versions']['cuda']}, "
             f"transformers {record['versions']['transformers']}; {record['threads']} CPU threads; "
             f"weights: {record.get('weights', '?')}; {'--quick' if record['quick'] else 'full run'}.", "",
             "| phase | status | seconds |", "| --- | --- | ---: |"]
    lines += [f"| {p['name']} | {p['status']} | {p['seconds']} |" for p in record["phases"]]
    if record["correctness"]:
        lines += ["", f"Correctness: the pass compiled with {record['inner']} against the eager reference of the same "
                  f"pairing, {record['windows']} "
                  f"WikiText-2 windows of {record['window']} tokens; relative = max |Δ logit| / max |logit|, "
                  f"tolerance {record['tolerance']}.", "",
                  "| dtype | pairing | max \\|Δ logit\\| | relative | ppl eager | ppl compiled | ppl diff | ok | s |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
        lines += [f"| {r['dtype']} | {r['pairing']} | {r['max_abs_diff']:.3g} | {r['relative_diff']:.2e} | "
                  f"{r['ppl_eager']:.4f} | {r['ppl_compiled']:.4f} | {100 * r['ppl_relative_diff']:+.3f} % | "
                  f"{'yes' if r['ok'] else '**NO**'} | {r['seconds']} |" for r in record["correctness"]]
    if record["speed"]:
        lines += ["", f"Decode speed: {record['speed'][0]['tokens']} new tokens, {record['speed'][0]['rounds']} rounds "
                  "interleaved, tokens/s of all sequences of the batch (median), ratio = median of per-round ratios "
                  f"to unpaired; ideal L/(L − Δ/2) = {record['ideal']:.3f}.", "",
                  "| dtype | batch | CUDA graphs | variant | tok/s | vs unpaired | ideal | compile s |",
                  "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |"]
        lines += [speed_row(r, kind, record["ideal"]) for r in record["speed"] for kind in r["median_tokens_per_s"]]
    if "llamacpp" in record:
        lines += ["", f"llama.cpp: exported {record['pairings'][1]['name']} vs exported unpaired: "
                  f"{record['llamacpp']['ratio']:.3f}× ({record['llamacpp']})"]
    return "\n".join(lines) + "\n"


def speed_row(record: dict, kind: str, ideal: float) -> str:
    ratio = record["ratio"].get(kind, 1.0)
    skips = f" ({record['cudagraph_skips']} skipped)" if record["cudagraph_skips"] else ""
    return (f"| {record['dtype']} | {record['batch']} | {'yes' if record['cudagraphs'] else 'no'}{skips} | {kind} | "
            f"{record['median_tokens_per_s'][kind] * record['batch']:.1f} | {ratio:.3f} | "
            f"{'' if kind == 'unpaired' else f'{ideal:.3f}'} | {record['compile_s'][kind]} |")


def run(args: argparse.Namespace) -> None:
    """Refuse a bad command line before any work, then every phase; exit 1 if one failed."""
    device = device_of(args.device)
    check_range(args.start, args.end)
    if args.plan != "none":
        load_plan(args.plan)
    data.resolve_data_dir(args.data_dir)
    check_folder_writable(args.out)
    state = Run(args, device, new_record(args, device))
    say(f"gpu-check on {state.record['device']}, writing {Path(args.out) / JSON_NAME} and {TABLE_NAME} after each phase")
    run_phase(state, "load", load, refused=(ValueError, OSError))  # the model, data and pairings, or a refusal
    failed = [name for name, work in phases(args, dtypes_in_order(args, device)) if not run_phase(state, name, work)]
    say(markdown(state.record))
    if failed:
        raise SystemExit(f"lp-fx gpu-check: phases failed: {', '.join(failed)} (see {Path(args.out) / JSON_NAME})")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("gpu-check", help="the device figures in one run: correctness vs eager, decode speed")
    parser.add_argument("--model", default="smollm2", help="'smollm2', a .gguf file or a local Hugging Face model directory")
    parser.add_argument("--data-dir", default=None, help=f"data directory (default: ${data.DATA_VARIABLE}, else ../shared/data)")
    parser.add_argument("--out", default="lp-fx-results/gpu_check", help=f"folder for {JSON_NAME} and {TABLE_NAME}")
    parser.add_argument("--quick", action="store_true", help="the first of --dtypes only, batch 1 only, no llama.cpp")
    parser.add_argument("--dtypes", type=dtype_list, default=None,
                        help="comma-separated, measured in this order (default: bf16,fp32 on CUDA, fp32,bf16 on a CPU)")
    parser.add_argument("--inner", default="inductor", choices=INNER_COMPILERS,
                        help="compiler behind the backend (CUDA graphs on CUDA with inductor only)")
    parser.add_argument("--random-weights", action="store_true",
                        help="--model is a Hugging Face folder whose config and tokenizer are used with random "
                        "weights (seed 0): speeds and the match with eager hold, perplexities are not the model's")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto: CUDA when present")
    parser.add_argument("--start", type=int_at_least(0), default=14, help="first layer of the paired range")
    parser.add_argument("--end", type=positive_int, default=28, help="end of the paired range (Δ = end - start)")
    parser.add_argument("--plan", default=str(PLAN), help="the planner's pairing checked too ('none': skip it)")
    parser.add_argument("--window", type=int_at_least(2), default=512, help="tokens per perplexity window")
    parser.add_argument("--windows", type=positive_int, default=4, help="evenly spaced WikiText-2 test windows")
    parser.add_argument("--tokens", type=int_at_least(2), default=32, help="new tokens per timed generation")
    parser.add_argument("--rounds", type=positive_int, default=5, help="interleaved timing rounds")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.set_defaults(func=run)
