"""What ``lp-fx gpu-check`` writes: one JSON record and the same as Markdown tables, both written
whole (:func:`lp_fx.files.atomic_write`) after every phase and every correctness row."""

from __future__ import annotations

import datetime
import platform
import sys
from pathlib import Path

import torch

from lp_fx.files import atomic_write, write_json
from lp_fx.tools.device_check.options import TOLERANCE, CheckOptions

JSON_NAME, TABLE_NAME = "gpu_check.json", "gpu_check.md"


def new_record(options: CheckOptions, device: torch.device) -> dict:
    """The JSON's head: when, where and with what it ran; the phases' lists, empty."""
    import transformers  # lazy: transformers' import takes seconds; `import lp_fx.tools` stays light

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    return {"started": datetime.datetime.now().isoformat(timespec="seconds"), "command": sys.argv,
            "device": name, "threads": torch.get_num_threads(), "quick": options.quick, "inner": options.inner,
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                         "transformers": transformers.__version__},
            "tolerance": TOLERANCE, "phases": [], "correctness": [], "speed": []}


def write_outputs(out: str | Path, record: dict) -> None:
    """``record`` as :data:`JSON_NAME` and :data:`TABLE_NAME` in the folder ``out``."""
    write_json(Path(out) / JSON_NAME, record, indent=1)
    atomic_write(Path(out) / TABLE_NAME, lambda tmp: tmp.write_text(markdown(record), encoding="utf-8"))


def failed_phases(record: dict) -> list[str]:
    """The names of the phases that failed."""
    return [phase["name"] for phase in record["phases"] if phase["status"].startswith("failed")]


def markdown(record: dict) -> str:
    """The record as Markdown: its head, then tables of the phases, correctness, speed, llama.cpp."""
    versions = record["versions"]
    lines = [f"# lp-fx gpu-check: {record.get('model', '?')} on {record['device']}", "",
             f"{record['started']}; torch {versions['torch']}, CUDA {versions['cuda']}, "
             f"transformers {versions['transformers']}; {record['threads']} CPU threads; "
             f"weights: {record.get('weights', '?')}; {'--quick' if record['quick'] else 'full run'}.", "",
             "| phase | status | seconds |", "| --- | --- | ---: |"]
    lines += [f"| {p['name']} | {p['status']} | {p['seconds']} |" for p in record["phases"]]
    if record["correctness"]:
        lines += correctness_table(record)
    if record["speed"]:
        lines += speed_table(record)
    if "llamacpp" in record:
        bench = record["llamacpp"]
        layers = " → ".join(map(str, bench.get("layers", [])))
        lines += ["", f"llama.cpp: exported {record['pairings'][1]['name']} vs exported unpaired: {bench['ratio']:.3f}× "
                  f"decode ({bench.get('dtype')}, {bench.get('threads')} threads, {bench.get('tokens')} tokens, "
                  f"{bench.get('rounds')} rounds interleaved; {layers} layers)"]
    return "\n".join(lines) + "\n"


def correctness_table(record: dict) -> list[str]:
    lines = ["", f"Correctness: the pass compiled with {record['inner']} against the eager reference of the same "
             f"pairing, {record['windows']} WikiText-2 windows of {record['window']} tokens; relative = "
             f"max |Δ logit| / max |logit|, tolerance {record['tolerance']}; s: the row's seconds, its compile "
             "included.", "",
             "| dtype | pairing | max \\|Δ logit\\| | relative | ppl eager | ppl compiled | ppl diff | ok | s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    return lines + [
        f"| {r['dtype']} | {r['pairing']} | {r['max_abs_diff']:.3g} | {r['relative_diff']:.2e} | "
        f"{r['ppl_eager']:.4f} | {r['ppl_compiled']:.4f} | {100 * r['ppl_relative_diff']:+.3f} % | "
        f"{'yes' if r['ok'] else '**NO**'} | {r['seconds']} |" for r in record["correctness"]
    ]


def speed_table(record: dict) -> list[str]:
    first = record["speed"][0]
    lines = ["", f"Decode speed: {first['tokens']} new tokens, {first['rounds']} rounds interleaved, the decode "
             "step compiled (the prompt eager); tok/s of all sequences of the batch (median); ratio = median of "
             f"per-round ratios to unpaired; ideal L/(L − Δ/2) = {record['ideal']:.3f}.", "",
             "| dtype | batch | CUDA graphs | variant | tok/s | vs unpaired | ideal | compile s |",
             "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    return lines + [speed_row(r, kind, record["ideal"]) for r in record["speed"] for kind in r["median_tokens_per_s"]]


def speed_row(record: dict, kind: str, ideal: float) -> str:
    """One variant of one speed record (``kind``: unpaired, paired, paired + fuse) as a table row."""
    ratio = record["ratio"].get(kind, 1.0)
    skips = f" ({record['cudagraph_skips']} skipped)" if record["cudagraph_skips"] else ""
    return (f"| {record['dtype']} | {record['batch']} | {'yes' if record['cudagraphs'] else 'no'}{skips} | {kind} | "
            f"{record['median_tokens_per_s'][kind] * record['batch']:.1f} | {ratio:.3f} | "
            f"{'' if kind == 'unpaired' else f'{ideal:.3f}'} | {record['compile_s'][kind]} |")
