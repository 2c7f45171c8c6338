"""What the ``lp-fx`` subcommands share: the model and evaluation options, result files and tables."""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from lp_fx.checkpoint import load_finetuned
from lp_fx.config import INNER_COMPILERS, PAIRING_MODES
from lp_fx.tools import data, models
from lp_fx.tools.evaluation import retention
from lp_fx.tools.options import add_options, int_at_least, option
from lp_fx.tools.console import say
from lp_fx.tools.evaluation.scoring import EvalSpec
from lp_fx.files import write_json
from lp_fx.files import check_files_writable as writable  # each command checks its --out with it


RESULTS = Path("lp-fx-results")  # where results go unless --out says otherwise


def add_command(subparsers: argparse._SubParsersAction, name: str, help_text: str, options: type,
                run: Callable[[argparse.Namespace], None]) -> None:
    """The subcommand ``name``: its flags made from the ``options`` dataclass, ``run`` its work."""
    parser = subparsers.add_parser(name, help=help_text)
    add_options(parser, options)
    parser.set_defaults(func=run)


@dataclass(frozen=True)
class ModelSpec:
    """The model a command reads (every command that reads one)."""

    model: str = option("smollm2")
    """'smollm2' (the bundled SmolLM2-135M-Instruct GGUF), 'gemma3' (Gemma 3 270M, from the lp_fx[gemma3] extra), a
    .gguf file or a local HF model directory"""
    verbose: bool = option(False, flags=("-v", "--verbose"))
    """log at INFO level"""


@dataclass(frozen=True)
class ModelArgs(ModelSpec):
    """The model, its data and how it is compiled (every command that measures a model)."""

    data_dir: str | None = option(None)
    """evaluation data directory (default: $LP_FX_DATA, else ../shared/data next to the repository or the
    working directory)"""
    inner: str = option("eager", choices=INNER_COMPILERS)
    """compiler behind the layer_parallel backend (eager is fastest to compile)"""
    window: int = option(512, parse=int_at_least(2))
    """perplexity window in tokens"""
    no_progress: bool = option(False)
    """no progress bars"""


@dataclass(frozen=True)
class PairedModelArgs(ModelArgs):
    """A model with a pairing mode for pairs without one of their own."""

    mode: str = option("lp", choices=PAIRING_MODES)
    """pairing mode"""


def eval_spec(args: argparse.Namespace, data_dir: Path) -> EvalSpec:
    return EvalSpec(
        data_dir=data_dir,
        tasks=tuple(task.strip() for task in args.tasks.split(",") if task.strip()),
        limit=args.limit,
        seed=args.seed,
        ppl_split=args.split,
        ppl_windows=args.ppl_windows,
        window=args.window,
        batch_size=args.batch_size,
    )


def spec_record(spec: EvalSpec) -> dict:
    """The spec as the results JSON records it."""
    return {**vars(spec), "data_dir": str(spec.data_dir)}


def load(args: argparse.Namespace) -> tuple[object, Path]:
    """The model and the data directory; ``--window`` checked against the model's positions."""
    data_dir = data.resolve_data_dir(args.data_dir)  # fail on a bad data dir before loading
    loaded = models.load_model(args.model, progress=not args.no_progress)
    positions = getattr(loaded.model.config, "max_position_embeddings", None)
    if positions is not None and args.window > positions:
        raise ValueError(
            f"--window {args.window}: {loaded.name} takes at most {positions} positions; give --window <= {positions}"
        )
    return loaded, data_dir


def new_file(path: str) -> str:
    """``path``, its folders created."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return path


def write_results(payload: dict, path: str) -> None:
    write_json(path, payload)
    say(f"wrote {path}")


def format_table(names: Sequence[str], results: dict[str, dict]) -> str:
    """Metrics as rows (``[n]`` = items or windows), pairings as columns, ``value ± standard error``
    where lm-eval gave one; after the baseline, ``value (LP/baseline)``; then the mean accuracy retention."""
    values = {name: retention.metric_values(results[name]) for name in names}
    baseline = values[names[0]]
    rows: list[tuple[str, list[str]]] = []
    for task, metric in baseline:
        size = results[names[0]][task].get("n", results[names[0]][task].get("windows"))
        cells = [_with_stderr(baseline[(task, metric)], results[names[0]][task].get(f"{metric}_stderr"))]
        for name in names[1:]:
            value = values[name].get((task, metric))
            stderr = results[name].get(task, {}).get(f"{metric}_stderr")
            cells.append("n/a" if value is None else f"{_with_stderr(value, stderr)} ({_ratio(value, baseline[(task, metric)])})")
        rows.append((f"{task}/{metric} [{size}]", cells))
    kept = [retention.retention(results[name], results[names[0]]) for name in names[1:]]
    for key in ("mean_acc", "mean_acc_norm"):
        cells = ["n/a" if key not in k else _with_stderr(k[key], k.get(f"{key}_stderr"), ".3f") for k in kept]
        rows.append((f"retention {key}", ["", *cells]))
    label = max(len(row[0]) for row in rows) + 2
    width = max(18, *(len(name) + 2 for name in names), *(len(c) + 2 for _, cells in rows for c in cells))
    lines = ["metric".ljust(label) + "".join(name.rjust(width) for name in names)]
    lines += [text.ljust(label) + "".join(cell.rjust(width) for cell in cells) for text, cells in rows]
    return "\n".join(lines)


def _ratio(value: float, baseline: float) -> str:
    """``LP / baseline`` to 3 decimals; ``n/a`` for a baseline of 0 (an accuracy on few items can be)."""
    return f"{value / baseline:.3f}" if baseline else "n/a"


def _with_stderr(value: float, stderr: float | None, spec: str = ".4g") -> str:
    """``0.4567 ± 0.0123`` (lm-eval's standard error), or the value alone when there is none."""
    return f"{value:{spec}}" if stderr is None else f"{value:{spec}} ± {stderr:.2g}"


@contextlib.contextmanager
def finetuned(model: object, directory: str | None) -> Iterator[None]:
    """The model with a checkpoint's tensors loaded, restored afterwards (None: unchanged)."""
    if directory is None:
        yield
        return
    state = model.state_dict()
    original = {name: tensor.clone() for name, tensor in state.items()}
    try:
        load_finetuned(model, directory)
        yield
    finally:
        with torch.no_grad():
            for name, tensor in original.items():
                state[name].copy_(tensor)
