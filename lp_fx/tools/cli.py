"""``lp-fx``: measure what pairing costs (``eval``), sweep Δ (``sweep``), choose pairs (``plan``), win it back (``finetune``).

Each subcommand is registered by one small ``add_*`` function listed in ``SUBCOMMANDS``; a new
subcommand is one more function there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from lp_fx.config import check_plan, load_plan
from lp_fx.tools import data, evaluate, planner, sweep
from lp_fx.tools.evaluate import BASELINE, EvalSpec, Pairing
from lp_fx.tools.models import PRECISIONS, parse_precisions, quantize_weights

RESULTS = Path("lp-fx-results")  # where results go unless --out says otherwise
PAIR_LIST = re.compile(r"^\d+-\d+(,\d+-\d+)*$")
RANGE = re.compile(r"^(\d+):(\d+)$")


# ------------------------------------------------------------------------------ shared options


def _add_model_options(parser: argparse.ArgumentParser, mode: bool = True) -> None:
    parser.add_argument(
        "--model", default="smollm2",
        help="'smollm2' (the bundled SmolLM2-135M-Instruct GGUF), a .gguf file or a local HF model directory",
    )
    parser.add_argument(
        "--data-dir", default=None,
        help="evaluation data directory (default: ../shared/data next to the repo or the cwd)",
    )
    if mode:
        parser.add_argument("--mode", default="lp", choices=["lp", "block"], help="pairing mode")
    parser.add_argument(
        "--inner", default="eager", choices=["eager", "aot_eager", "inductor"],
        help="compiler behind the layer_parallel backend (eager is fastest to compile)",
    )
    parser.add_argument("--window", type=int, default=512, help="perplexity window in tokens")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")


def _add_eval_options(parser: argparse.ArgumentParser, tasks: str, split: str, windows: int | None) -> None:
    parser.add_argument(
        "--tasks", default=tasks,
        help=f"comma-separated, from: {', '.join(evaluate.TASKS)} (wikitext = perplexity)",
    )
    parser.add_argument("--limit", type=int, default=None, help="items per task (fixed-seed subset)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the --limit subsets")
    parser.add_argument(
        "--split", default=split, choices=["all", "calib", "heldout"],
        help="perplexity windows: all, the first half (calib) or the second half (heldout)",
    )
    parser.add_argument(
        "--ppl-windows", type=int, default=windows,
        help="use this many evenly spaced windows of the split (default: all)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="batch size for task scoring")


def _eval_spec(args: argparse.Namespace, data_dir: Path) -> EvalSpec:
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


def _spec_record(spec: EvalSpec) -> dict:
    """The spec as the results JSON records it."""
    return {**vars(spec), "data_dir": str(spec.data_dir)}


def _load(args: argparse.Namespace) -> tuple[object, Path]:
    from lp_fx.tools.models import load_model

    data_dir = data.resolve_data_dir(args.data_dir)  # fail on a bad data dir before loading
    return load_model(args.model), data_dir


def _add_quantize_option(parser: argparse.ArgumentParser, several: bool) -> None:
    """``--quantize``: one precision, or (``several``) a comma-separated list of them."""
    what = "comma-separated, each run in turn on the one loaded model (e.g. fp32,int8)" if several else "one of"
    parser.add_argument(
        "--quantize", default="fp32", choices=None if several else PRECISIONS,
        help=f"weights, {what} {', '.join(PRECISIONS)}; int8: torchao Int8WeightOnlyConfig on every linear, "
        "applied after loading",
    )


def parse_pairing(spec: str, num_layers: int) -> Pairing:
    """``baseline``, a range ``14:28``, pairs ``14-15,20-21``, or a plan file for this model."""
    if spec == "baseline":
        return BASELINE
    if match := RANGE.match(spec):
        from lp_fx.config import pairs_from_range

        return Pairing(spec, pairs_from_range(int(match[1]), int(match[2])))
    if PAIR_LIST.match(spec):
        pairs = tuple(tuple(map(int, pair.split("-"))) for pair in spec.split(","))
        return Pairing(spec, pairs)  # type: ignore[arg-type]
    plan = load_plan(spec)
    check_plan(plan, num_layers, spec)
    return planner.plan_pairing(plan, Path(spec).stem)


def _writable(*paths: str) -> None:
    """Create the folders of output files and check they can be written, before the work starts."""
    from lp_fx.tools.checkpoint import check_writable

    for path in paths:
        if Path(path).is_dir():
            raise ValueError(f"{path} is a directory; give a file name")
        check_writable(Path(path).parent)


def _write_json(payload: dict, path: str) -> None:
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


# ------------------------------------------------------------------------------------- tables


def format_table(names: Sequence[str], results: dict[str, dict]) -> str:
    """Metrics as rows (``[n]`` = items or windows), pairings as columns; after the baseline,
    ``value (LP/baseline)``; then the mean accuracy retention."""
    values = {name: evaluate.metric_values(results[name]) for name in names}
    baseline = values[names[0]]
    rows: list[tuple[str, list[str]]] = []
    for task, metric in baseline:
        size = results[names[0]][task].get("n", results[names[0]][task].get("windows"))
        cells = [f"{baseline[(task, metric)]:.4g}"]
        for name in names[1:]:
            value = values[name].get((task, metric))
            cells.append("n/a" if value is None else f"{value:.4g} ({value / baseline[(task, metric)]:.3f})")
        rows.append((f"{task}/{metric} [{size}]", cells))
    for key in ("mean_acc", "mean_acc_norm"):
        means = [evaluate.retention(results[name], results[names[0]]).get(key) for name in names[1:]]
        rows.append((f"retention {key}", ["", *("n/a" if m is None else f"{m:.3f}" for m in means)]))
    label = max(len(row[0]) for row in rows) + 2
    width = max(18, *(len(name) + 2 for name in names), *(len(c) + 2 for _, cells in rows for c in cells))
    lines = ["metric".ljust(label) + "".join(name.rjust(width) for name in names)]
    lines += [text.ljust(label) + "".join(cell.rjust(width) for cell in cells) for text, cells in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- subcommands


def add_eval(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="perplexity and task accuracy: baseline and pairings, with retention"
    )
    _add_model_options(parser)
    _add_eval_options(parser, ",".join(evaluate.TASKS), "all", None)
    parser.add_argument(
        "--pairs", action="append", default=[], metavar="SPEC",
        help="a pairing to compare with the baseline (repeatable): a range START:END (e.g. 14:28), "
        "pairs like 14-15,20-21, or a plan JSON from `lp-fx plan`",
    )
    parser.add_argument(
        "--checkpoint", action="append", default=[], metavar="DIR",
        help="a fine-tuned pairing from `lp-fx finetune` to compare as well (repeatable); "
        "its trained tensors are loaded for its column only",
    )
    _add_quantize_option(parser, several=False)
    parser.add_argument("--fuse", action="store_true",
                        help="fuse=True: run each pair's GEMMs batched (one device; same results, fewer GEMMs)")
    parser.add_argument("--out", default=str(RESULTS / "eval.json"), help="JSON results (folders are created)")
    parser.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> None:
    from lp_fx.tools.checkpoint import read_pairing

    if args.checkpoint and args.quantize != "fp32":
        raise ValueError(
            f"--checkpoint cannot be combined with --quantize {args.quantize}: the fine-tuned fp32 tensors are "
            "loaded into the model's weights, which quantizing replaces; evaluate checkpoints in fp32"
        )
    _writable(args.out)
    loaded, data_dir = _load(args)
    quantize_weights(loaded.model, args.quantize)
    pairings = [BASELINE] + [parse_pairing(spec, loaded.num_layers) for spec in args.pairs]
    checkpoints = {_checkpoint_pairing(read_pairing(d), d): d for d in args.checkpoint}  # checked before the work
    pairings += list(checkpoints)
    prepared = evaluate.prepare(loaded.tokenizer, _eval_spec(args, data_dir))
    print(f"model {loaded.name} ({loaded.num_layers} layers, {args.quantize} weights); "
          f"items per task: {prepared.sizes()}")
    results = {}
    for pairing in pairings:
        with _finetuned(loaded.model, checkpoints.get(pairing)):
            logits_fn = evaluate.compile_pairing(loaded.model, pairing, args.mode, args.inner, fuse=args.fuse)
            results[pairing.name] = evaluate.run_eval(logits_fn, prepared, not args.no_progress)
    names = [pairing.name for pairing in pairings]
    print(format_table(names, results))
    _write_json(
        {
            "model": loaded.name,
            "num_layers": loaded.num_layers,
            "mode": args.mode,
            "fuse": args.fuse,
            "quantize": args.quantize,
            "spec": _spec_record(_eval_spec(args, data_dir)),
            "sizes": prepared.sizes(),
            "pairings": [
                {
                    **pairing.to_json(),
                    "results": results[pairing.name],
                    "retention": evaluate.retention(results[pairing.name], results["baseline"]),
                }
                for pairing in pairings
            ],
        },
        args.out,
    )


def _checkpoint_pairing(pairing: dict, directory: str) -> Pairing:
    pairs = tuple(tuple(pair) for pair in pairing["pairs"])
    return Pairing(f"finetuned:{Path(directory).name}", pairs, tuple(pairing["modes"]))  # type: ignore[arg-type]


@contextlib.contextmanager
def _finetuned(model: object, directory: str | None) -> Iterator[None]:
    """The model with a checkpoint's tensors loaded, restored afterwards (None: unchanged)."""
    if directory is None:
        yield
        return
    from lp_fx.tools.checkpoint import load_finetuned

    state = model.state_dict()
    original = {name: tensor.clone() for name, tensor in state.items()}
    load_finetuned(model, directory)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, tensor in original.items():
                state[name].copy_(tensor)


def add_sweep(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep", help="perplexity against the number of layers transformed (contiguous ranges); JSON, table and PNG",
    )
    _add_model_options(parser, mode=False)
    _add_eval_options(parser, "wikitext", "heldout", 8)
    parser.add_argument(
        "--transforms", default="lp",
        help=f"comma-separated, from: {', '.join(sweep.TRANSFORMS)} (lp, block: pairs; prune, merge: the second "
        "layer of each pair removed, merge folding it into the first; shuffle: the range run in a seeded random order)",
    )
    parser.add_argument(
        "--starts", default=None,
        help="comma-separated start layers (default: 4 spread over the first half; with several transforms "
        "or shuffle, the last of them)",
    )
    parser.add_argument(
        "--deltas", default=None,
        help="comma-separated even Δ values, the number of layers transformed (default: every one that fits; "
        "with several transforms or shuffle, every second one: 2, 6, 10, …)",
    )
    parser.add_argument("--seeds", type=int, default=3, help="shuffle: seeds per range (distinct orders)")
    _add_quantize_option(parser, several=True)
    parser.add_argument("--out", default=str(RESULTS / "sweep.json"), help="JSON results (folders are created)")
    parser.add_argument("--plot", default=str(RESULTS / "sweep.png"), help="PNG plot of perplexity against Δ")
    parser.set_defaults(func=run_sweep)


def _int_list(text: str | None) -> list[int] | None:
    return None if text is None else [int(item) for item in text.split(",")]


def run_sweep(args: argparse.Namespace) -> None:
    transforms = sweep.parse_transforms(args.transforms)
    precisions = parse_precisions(args.quantize)
    if args.seeds < 1:
        raise ValueError(f"--seeds {args.seeds}: give at least 1 seed per shuffled range")
    _writable(args.out, args.plot)
    loaded, data_dir = _load(args)
    spec = _eval_spec(args, data_dir)
    prepared = evaluate.prepare(loaded.tokenizer, spec)
    starts, step = sweep.default_layout(loaded.num_layers, transforms)
    ranges = sweep.sweep_ranges(loaded.num_layers, _int_list(args.starts) or starts, _int_list(args.deltas), step)
    points = sweep.sweep_points(loaded.num_layers, transforms, ranges, args.seeds)
    print(f"model {loaded.name}: {', '.join(transforms)} on the ranges (start, Δ) {ranges}, "
          f"{len(points)} points, weights {', '.join(precisions)}; sizes {prepared.sizes()}")
    for skip in sweep.unsupported(transforms, precisions):
        print(f"left out: {skip['transform']} with {skip['quantize']} weights ({skip['why']})")

    def measure(pairing: Pairing) -> dict:
        logits_fn = evaluate.compile_pairing(loaded.model, pairing, inner=args.inner)
        return evaluate.run_eval(logits_fn, prepared, progress=False)

    result = sweep.run_sweep(
        measure, loaded.num_layers, points, precisions, lambda precision: quantize_weights(loaded.model, precision),
        not args.no_progress,
    )
    result.update(model=loaded.name, transforms=list(transforms), seeds=args.seeds)
    result.update(spec=_spec_record(spec), sizes=prepared.sizes())
    _write_json(result, args.out)
    if "wikitext" in spec.tasks:
        measured = f"WikiText-2 ({args.split}), {prepared.sizes()['wikitext']} windows of {args.window} tokens"
        print(f"{measured}: perplexity; shuffle: mean [min–max] over seeds")
        print(sweep.sweep_table(result))
        sweep.plot_sweep(result, args.plot, f"{loaded.name}, {measured}")
        print(f"wrote {args.plot}")


def add_plan(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan", help="choose disjoint pairs by measured perplexity cost on calibration text"
    )
    _add_model_options(parser)
    parser.add_argument("--num-pairs", type=int, default=None, help="how many pairs to choose")
    parser.add_argument(
        "--max-ppl-ratio", type=float, default=None,
        help="budget: stop before calibration perplexity exceeds this × baseline (e.g. 1.1)",
    )
    parser.add_argument("--calib-windows", type=int, default=4,
                        help="windows from the first half of WikiText-2 on which each set of pairs is scored")
    parser.add_argument("--screen-windows", type=int, default=2,
                        help="windows (from the same half) on which single pairs are scored to rank them")
    parser.add_argument("--modes", default="lp,block", help="modes to consider per pair: lp, block or lp,block")
    parser.add_argument(
        "--refine", type=int, default=3,
        help="cheapest candidates (alone) tried with the chosen pairs at each step (growing and swapping)",
    )
    parser.add_argument("--passes", type=int, default=2,
                        help="rounds of swapping each chosen pair for a better one (0: grow only)")
    parser.add_argument("--out", default=str(RESULTS / "plan.json"),
                        help="plan file, accepted by options={'plan': ...} (folders are created)")
    parser.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> None:
    if args.num_pairs is None and args.max_ppl_ratio is None:
        raise ValueError("give --num-pairs, --max-ppl-ratio, or both")
    _writable(args.out)
    loaded, data_dir = _load(args)
    windows, screen_windows = (
        evaluate.wikitext_windows(loaded.tokenizer, data_dir, args.window, "calib", count)
        for count in (args.calib_windows, args.screen_windows)
    )
    modes = tuple(args.modes.split(","))
    print(f"model {loaded.name} ({loaded.num_layers} layers); calibration: {windows.shape[0]} "
          f"windows of {args.window} tokens from the first half of WikiText-2 raw test "
          f"({screen_windows.shape[0]} for single pairs)")
    scorer = planner.GatedScorer(loaded.model, windows, modes, args.inner)
    plan = planner.make_plan(
        scorer,
        loaded.num_layers,
        loaded.name,
        num_pairs=args.num_pairs,
        max_ppl_ratio=args.max_ppl_ratio,
        modes=modes,
        refine=args.refine,
        passes=args.passes,
        calibration={"split": "calib", "windows": int(windows.shape[0]),
                     "screen_windows": int(screen_windows.shape[0]), "window": args.window},
        verify=planner.compiled_scorer(loaded.model, windows, args.inner),
        screen=scorer.on(screen_windows),
        progress=not args.no_progress,
    )
    plan["search"]["graphs_compiled"] = scorer.compiles
    calib, search = plan["calibration"], plan["search"]
    print(f"pairs {plan['pairs']} modes {plan['modes']}")
    print(f"calibration ppl: baseline {calib['baseline_ppl']:.3f}, plan {calib['plan_ppl']:.3f} "
          f"(compiled plainly: {calib['plan_ppl_plain']:.3f})")
    print(f"{search['pairings_scored']} pairings scored with {search['graphs_compiled']} compiled graph(s) "
          f"in {search['seconds']:.0f} s")
    planner.save_plan(plan, args.out)
    print(f"wrote {args.out}")
    problem = planner.plain_disagreement(plan)
    if problem:
        raise ValueError(f"{problem}: do not trust {args.out}")


def add_finetune(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finetune", help="train the paired layers through the compiled pairing to win back accuracy"
    )
    _add_model_options(parser)
    parser.set_defaults(inner="aot_eager")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--pairs", metavar="SPEC",
        help="a range START:END (e.g. 14:28), pairs like 14-15,20-21, or 'baseline' (no pairs: the "
        "unpaired control, with --loss lm and --train-layers)",
    )
    which.add_argument("--plan", metavar="FILE", help="a plan JSON from `lp-fx plan` (per-pair modes)")
    parser.add_argument("--loss", default="distill", choices=["distill", "lm"],
                        help="distill: KL to the unpaired model (default); lm: next-token loss")
    parser.add_argument("--train", default="paired", choices=["paired", "all"],
                        help="paired: only the paired layers' parameters (default); all: every parameter")
    parser.add_argument("--train-layers", default=None, metavar="SPEC",
                        help="train these layers instead of the paired ones: START:END or 3,4,5")
    parser.add_argument("--train-data", default=None, metavar="FILE",
                        help="plain text to train on (default: wikitext-2/train.txt in the data directory; "
                        "the tokenized WikiText release is detokenized first)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--seed", type=int, default=0, help="fixes the data order and the run")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: steps / 10)")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping")
    parser.add_argument("--eval-every", type=int, default=25, help="held-out perplexity every N steps")
    parser.add_argument("--eval-windows", type=int, default=8,
                        help="held-out windows from the WikiText-2 raw test split (never trained on)")
    parser.add_argument("--save-every", type=int, default=25, help="checkpoint every N steps (and at the end)")
    parser.add_argument("--mesh", default=None, choices=["auto"],
                        help="auto: one rank per process under torchrun, each training the branch it computes")
    parser.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory (created)")
    parser.set_defaults(func=run_finetune)


def _layer_list(spec: str | None) -> tuple[int, ...] | None:
    if spec is None:
        return None
    if match := RANGE.match(spec):
        return tuple(range(int(match[1]), int(match[2])))
    if re.match(r"^\d+(,\d+)*$", spec):
        return tuple(int(i) for i in spec.split(","))
    raise ValueError(f"--train-layers {spec!r}: expected START:END (e.g. 14:28) or a list like 14,15,16")


def run_finetune(args: argparse.Namespace) -> None:
    from lp_fx.tools import finetune
    from lp_fx.tools.checkpoint import check_writable

    out = check_writable(args.out)  # before any work: a run must not end unable to save
    mesh = _init_mesh(args.mesh)
    train_path = Path(args.train_data) if args.train_data else None
    data_dir = data.resolve_data_dir(args.data_dir)
    train_path = train_path or data_dir / "wikitext-2" / "train.txt"
    text = finetune.load_training_text(train_path)
    loaded, _ = _load(args)
    pairing = parse_pairing(args.plan or args.pairs, loaded.num_layers)
    config = finetune.FinetuneConfig(
        pairs=pairing.pairs, modes=pairing.modes, mode=args.mode, loss=args.loss, train=args.train,
        train_layers=_layer_list(args.train_layers), steps=args.steps, lr=args.lr, batch=args.batch,
        seq_len=args.seq_len, seed=args.seed, warmup=args.warmup, clip=args.clip,
        eval_every=args.eval_every, save_every=args.save_every, inner=args.inner,
    )
    train_ids = loaded.tokenizer.encode(text, add_special_tokens=False)
    heldout = evaluate.wikitext_windows(loaded.tokenizer, data_dir, args.window, "all", args.eval_windows)
    rank0 = mesh is None or torch.distributed.get_rank() == 0
    if rank0:
        print(f"model {loaded.name}: {pairing.name}, loss {args.loss}, training text {train_path} "
              f"({len(train_ids)} tokens), held-out: {heldout.shape[0]} windows of WikiText-2 raw test")
    record = finetune.finetune(
        loaded.model, train_ids, config, out, heldout=heldout, mesh=mesh, progress=rank0 and not args.no_progress,
        extra_args={"model": args.model, "pairing": pairing.name, "train_data": str(train_path),
                    "eval_windows": args.eval_windows, "window": args.window},
    )
    if rank0:
        points = record["heldout"]
        print(f"held-out perplexity: {points[0]['ppl']:.3f} before, {points[-1]['ppl']:.3f} after "
              f"{record['step']} steps ({record['wall_s']:.0f} s); checkpoint in {out}")
        finetune.plot_record(record, out / "loss.png")
        print(f"wrote {out / 'loss.png'}")


def _init_mesh(mesh: str | None) -> str | None:
    """``auto``: join the process group torchrun set up (gloo on CPU, nccl on GPU)."""
    if mesh is None:
        return None
    import os

    if "RANK" not in os.environ:
        raise ValueError("--mesh auto needs torchrun: torchrun --nproc_per_node 2 -m lp_fx.tools.cli finetune ...")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return mesh


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_eval, add_sweep, add_plan, add_finetune]
ERRORS = (data.DataError, FileNotFoundError, ValueError)  # LayerParallelError is a ValueError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lp-fx", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        _quiet_imports()
    try:
        args.func(args)
    except ERRORS as error:
        print(f"lp-fx {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


NOISY_LOGGERS = (
    "torchao",  # "Failed to load ….so" for the CUDA kernels of a CPU build, when transformers imports it
    "torch.utils._pytree",  # torchao's deprecated register_constant calls
)


def _quiet_imports() -> None:
    """Keep third-party import-time warnings that say nothing about the run out of our output."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def add_bench(subparsers: argparse._SubParsersAction) -> None:
    """``lp-fx bench``: decode tokens/s of TP, TP + LP and one device (lp_fx/bench.py)."""
    from lp_fx.tools import bench

    bench.register(subparsers)


SUBCOMMANDS.append(add_bench)


# ------------------------------------------------------------------------------------- export


def add_export(subparsers: argparse._SubParsersAction) -> None:
    """``lp-fx export``: the pairing as a plain checkpoint (lp_fx/tools/export.py)."""
    from lp_fx.config import MODES
    from lp_fx.tools.export import DTYPES, FORMATS

    parser = subparsers.add_parser(
        "export", help="write a pairing as a plain checkpoint: lp pairs as one wide layer each (GGUF, llama.cpp's "
        "deci architecture), prune/merge as the model with fewer layers (GGUF or a Hugging Face folder)",
    )
    parser.add_argument("--model", default="smollm2",
                        help="'smollm2' (the bundled SmolLM2-135M-Instruct GGUF), a .gguf file or a local HF model directory")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--pairs", metavar="SPEC",
                       help="a range START:END (e.g. 14:28), pairs like 14-15,20-21, or 'baseline' (no pairs)")
    which.add_argument("--plan", metavar="FILE", help="a plan JSON from `lp-fx plan` (per-pair modes)")
    parser.add_argument("--mode", default="lp", choices=MODES, help="mode of the --pairs (lp, prune, merge export)")
    parser.add_argument("--checkpoint", metavar="DIR",
                        help="a fine-tuned pairing from `lp-fx finetune`, folded in first (its pairing is used "
                        "when --pairs/--plan are not given, and must match them when they are)")
    parser.add_argument("--format", default="gguf", choices=FORMATS, help="gguf (llama.cpp) or hf (prune/merge only)")
    parser.add_argument("--dtype", default="f32", choices=DTYPES, help="weights of the matrices (norms stay f32)")
    parser.add_argument("--out", required=True, help="a .gguf file, or a new directory with --format hf")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> None:
    from lp_fx.tools.checkpoint import read_pairing
    from lp_fx.tools.export import Source, export
    from lp_fx.tools.models import load_model, resolve_model_path

    directory, gguf_file = resolve_model_path(args.model)
    checkpoint = _checkpoint_pairing(read_pairing(args.checkpoint), args.checkpoint) if args.checkpoint else None
    if checkpoint is None and not (args.pairs or args.plan):
        raise ValueError("give --pairs, --plan or --checkpoint")
    loaded = load_model(args.model)
    pairing = parse_pairing(args.plan or args.pairs, loaded.num_layers) if args.pairs or args.plan else checkpoint
    modes = pairing.modes or (args.mode,) * pairing.num_pairs
    if checkpoint is not None and (list(pairing.pairs), list(modes)) != (list(checkpoint.pairs), list(checkpoint.modes)):
        raise ValueError(f"--checkpoint {args.checkpoint} was trained for pairs {list(checkpoint.pairs)} modes "
                         f"{list(checkpoint.modes)}, not {pairing.name} {list(pairing.pairs)} modes {list(modes)}")
    source = Source(loaded.name, directory / gguf_file if gguf_file else directory)
    folded = export(loaded.model, pairing.pairs, modes, args.out, source, args.format, args.dtype, args.checkpoint)
    widths = ", ".join(f"{layer.source}->{layer.heads}h/{layer.ffn}" for layer in folded.layers if layer.how == "lp")
    print(f"{loaded.name} {pairing.name}: {loaded.num_layers} -> {len(folded.layers)} layers "
          f"({args.format}, {args.dtype}){'; wide layers ' + widths if widths else ''}")
    print(f"wrote {args.out}")


SUBCOMMANDS.append(add_export)


if __name__ == "__main__":
    sys.exit(main())
