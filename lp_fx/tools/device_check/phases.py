"""The phases of ``lp-fx gpu-check``, in the order their figures matter (a lease that ends mid-run
keeps the first ones), each run, timed and recorded by :func:`run_phase`, with both files written
again after it (:mod:`lp_fx.tools.device_check.report`).

- **load**: the model, the WikiText-2 windows and the pairings (unpaired, ``lp`` and ``block`` over
  ``start:end``, the plan), each checked against the model; a bad input is refused here, before
  anything is written.
- **correctness**, per dtype (the first one's before the speed, the others' after it): the pass
  compiled with ``inner`` (Dynamo traces the model once, each pairing is compiled from that trace:
  :class:`~lp_fx.tools.evaluation.compiled.PairingSwitch`) against the independent eager reference
  of the same pairing on the same device (:mod:`lp_fx.tools.evaluation.reference`: patched layer
  forwards, no FX): the largest logit difference and both perplexities; each row is written as
  soon as it is measured.
- **speed**, in the first dtype, per batch: the unpaired model, the ``lp`` pairing and the pairing
  fused, timed interleaved (:class:`lp_fx.tools.frontier.speed.SpeedBench`), every variant through
  the backend (the unpaired one with no pairs) so all are compiled alike. On CUDA the backend gets
  CUDA graphs from its own ``cudagraphs`` option, which it passes to Inductor
  (``triton.cudagraphs``): ``torch.compile``'s ``mode="reduce-overhead"`` cannot be given together
  with a backend's options.
- **llama.cpp**: the ``lp`` export against the unpaired export, or one line saying why not.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from lp_fx.files import check_folder_writable
from lp_fx.pairing import BASELINE, Pairing, check_range, load_plan, pairs_from_range
from lp_fx.tools import data
from lp_fx.tools.console import say
from lp_fx.tools.device_check import report
from lp_fx.tools.device_check.options import DTYPES, TOLERANCE, CheckOptions, Sizes
from lp_fx.tools.evaluation import scoring
from lp_fx.tools.evaluation.compiled import LogitsFn, PairingSwitch, check_pairing
from lp_fx.tools.evaluation.reference import eager_pairing
from lp_fx.tools.frontier.speed import LlamaCppBench, SpeedBench
from lp_fx.tools.models import LoadedModel, load_model, load_random_weights

log = logging.getLogger(__name__)


class CheckFailed(RuntimeError):
    """A compiled pairing that does not compute what its eager reference does."""


@dataclass
class Run:
    """What the phases share: the model asked for, the options, the device, what was loaded, and the
    record the files are written from."""

    model: str
    options: CheckOptions
    device: torch.device
    record: dict
    loaded: LoadedModel | None = None
    windows: torch.Tensor | None = None
    pairings: list[Pairing] = field(default_factory=list)

    @property
    def sizes(self) -> Sizes:
        return self.options.sizes()

    @property
    def contiguous_lp(self) -> Pairing:
        """The ``lp`` pairing over ``start:end``: the one timed."""
        return self.pairings[1]


Phase = Callable[[Run], str | None]  # a phase's work: None when done, else the line saying why it skipped


def device_of(name: str) -> torch.device:
    """``auto``: CUDA when present, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here; give --device auto or cpu")
    return torch.device(name)


def phases(run: Run) -> list[tuple[str, Phase]]:
    """``(name, work)`` of every phase after the load, in run order: the first dtype's correctness
    and speed (the one timed: bf16 on CUDA, the serving dtype of the speed claim), the other dtypes'
    correctness, llama.cpp."""
    first, *others = run.options.dtypes_on(run.device)
    return [
        (f"correctness {first}", lambda run: correctness(run, first)),
        *((f"speed {first} batch {batch}", lambda run, batch=batch: speed(run, first, batch)) for batch in run.sizes.batches),
        *((f"correctness {dtype}", lambda run, dtype=dtype: correctness(run, dtype)) for dtype in others),
        ("llama.cpp", llamacpp_speed),
    ]


def load(run: Run) -> None:
    """The model (fp32, on the CPU: each phase copies it to the device in its dtype), the windows
    and the pairings, each pairing checked against the model."""
    options = run.options
    run.loaded = load_random_weights(run.model) if options.random_weights else load_model(run.model, progress=False)
    layers = run.loaded.num_layers
    run.windows = scoring.wikitext_windows(run.loaded.tokenizer, data.resolve_data_dir(options.data_dir),
                                           run.sizes.window, "all", run.sizes.windows)
    pairs = pairs_from_range(options.start, options.end)
    run.pairings = [BASELINE, *(Pairing(f"{mode} {options.start}:{options.end}", pairs, (mode,) * len(pairs))
                                for mode in ("lp", "block"))]
    if options.plan != "none":
        run.pairings.append(Pairing.parse(options.plan, layers))
    for pairing in run.pairings:
        check_pairing(run.loaded.model, pairing)
    delta = options.end - options.start
    run.record.update(model=run.loaded.name, weights="random (seed 0)" if options.random_weights else run.model,
                      layers=layers, delta=delta, ideal=layers / (layers - delta / 2),
                      windows=int(run.windows.shape[0]), window=run.sizes.window,
                      pairings=[pairing.to_json() for pairing in run.pairings])


def on_device(run: Run, dtype: str) -> torch.nn.Module:
    """A copy of the model on the run's device in ``dtype``."""
    return copy.deepcopy(run.loaded.model).to(device=run.device, dtype=DTYPES[dtype])


def correctness(run: Run, dtype: str) -> None:
    """Each pairing compiled (``inner`` behind the backend) against its eager reference, on the same
    windows; a row is written as soon as it is measured, with its seconds (its compile included)."""
    model = on_device(run, dtype)
    windows = run.windows.to(run.device)
    switch = PairingSwitch(model, run.options.inner)
    for pairing in run.pairings:
        began = time.monotonic()
        switch.set_pairing(pairing)  # the compile, but the first: Dynamo traces at the first call
        row = {"dtype": dtype, "pairing": pairing.name, **compare(model, switch.logits, pairing, windows)}
        row.update(ok=row["relative_diff"] <= TOLERANCE[dtype], seconds=round(time.monotonic() - began, 1))
        run.record["correctness"].append(row)
        report.write_outputs(run.options.out, run.record)
        log.info("correctness %s %s: %s", dtype, pairing.name, row)
    torch._dynamo.reset()
    wrong = [row["pairing"] for row in run.record["correctness"] if row["dtype"] == dtype and not row["ok"]]
    if wrong:
        raise CheckFailed(f"{', '.join(wrong)}: logits differ from the eager reference by more than {TOLERANCE[dtype]:g} "
                          "of the largest logit")


def compare(model: torch.nn.Module, paired: LogitsFn, pairing: Pairing, windows: torch.Tensor) -> dict:
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

    with eager_pairing(model, pairing.pairs, pairing.modes_or("lp")):
        eager = scoring.perplexity(reference, windows, progress=False)
    got = scoring.perplexity(compiled, windows, progress=False)
    scale = max(logits.float().abs().max().item() for logits in expected)
    return {"pairs": [list(pair) for pair in pairing.pairs], "modes": list(pairing.modes or ()),
            "max_abs_diff": max(diffs), "max_abs_logit": scale, "relative_diff": max(diffs) / scale,
            "ppl_eager": eager.ppl, "ppl_compiled": got.ppl, "ppl_relative_diff": got.ppl / eager.ppl - 1}


def speed(run: Run, dtype: str, batch: int) -> None:
    """Unpaired, ``lp`` paired and paired + fuse, compiled alike, timed interleaved at ``batch``."""
    cuda = run.device.type == "cuda" and run.options.inner == "inductor"  # CUDA graphs are Inductor's
    sizes = run.sizes
    bench = SpeedBench(run.loaded.tokenizer, run.options.inner, sizes.tokens, sizes.rounds, batch=batch,
                       shared={"cudagraphs": cuda})
    lp = run.contiguous_lp
    skips = counters["inductor"]["cudagraph_skips"]
    record = bench.one_device(on_device(run, dtype), [(lp, lp.to_options(mode="lp"))])[0]
    record.update(dtype=dtype, pairing=lp.name, cudagraphs=cuda,
                  cudagraph_skips=counters["inductor"]["cudagraph_skips"] - skips)
    run.record["speed"].append(record)
    log.info("speed %s batch %d: %s", dtype, batch, record["ratio"])


def llamacpp_speed(run: Run) -> str | None:
    """The ``lp`` export against the unpaired export in llama.cpp, or why not (a skip line)."""
    if run.options.no_llamacpp:
        return "skipped: --no-llamacpp"
    try:
        import llama_cpp  # lazy: optional (llama-cpp-python); without it this phase is one skip line
    except ImportError:
        return "skipped: llama_cpp (llama-cpp-python) is not importable here"
    if run.device.type == "cuda":
        return ("skipped: lp_fx.tools.speed.llamacpp opens GGUFs without GPU offload (no n_gpu_layers), so it "
                f"would time the CPU, not {torch.cuda.get_device_name(run.device)} (llama_cpp {llama_cpp.__version__})")
    with tempfile.TemporaryDirectory() as folder:
        bench = LlamaCppBench.of_model(run.model, run.loaded.name, Path(folder), run.sizes.tokens, run.sizes.rounds)
        run.record["llamacpp"] = bench.ratio(run.loaded.model, run.contiguous_lp)
    return None


def run_phase(run: Run, name: str, work: Phase, refused: tuple[type[BaseException], ...] = ()) -> None:
    """Run one phase, record its status and time, write both files. A failure is recorded, not
    raised, except one of ``refused`` (bad input: raised before anything is written)."""
    say(f"gpu-check: {name} …")
    began = time.monotonic()
    entry: dict = {"name": name}
    try:
        entry["status"] = work(run) or "ok"
    except refused:
        raise
    except Exception as error:  # noqa: BLE001 - recorded; the later phases still measure what they can
        log.exception("phase %s failed", name)
        entry["status"] = f"failed: {type(error).__name__}: {error}"
    entry["seconds"] = round(time.monotonic() - began, 1)
    run.record["phases"].append(entry)
    report.write_outputs(run.options.out, run.record)
    say(f"gpu-check: {name}: {entry['status']} ({entry['seconds']} s)")


def check_device(model: str, options: CheckOptions) -> dict:
    """Refuse a bad input before any work (a ``ValueError`` or ``OSError`` naming it, nothing
    written), then run every phase; the record written (a failed phase is one of its
    :func:`~lp_fx.tools.device_check.report.failed_phases`)."""
    device = device_of(options.device)
    check_range(options.start, options.end)
    if options.plan != "none":
        load_plan(options.plan)
    data.resolve_data_dir(options.data_dir)
    check_folder_writable(options.out)
    run = Run(model, options, device, report.new_record(options, device))
    say(f"gpu-check on {run.record['device']}, writing {report.JSON_NAME} and {report.TABLE_NAME} in {options.out} "
        "after each phase")
    run_phase(run, "load", load, refused=(ValueError, OSError))  # the model, data and pairings, or a refusal
    for name, work in phases(run):
        run_phase(run, name, work)
    return run.record
