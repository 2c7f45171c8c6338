"""``lp-fx finetune``: win back what a pairing costs by fine-tuning through the compiled pairing."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from lp_fx.tools import data, evaluate
from lp_fx.tools.arguments import positive_float, positive_int
from lp_fx.tools.commands import options
from lp_fx.tools.commands.options import RANGE, add_model_options, parse_pairing


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finetune", help="train the paired layers through the compiled pairing to win back accuracy"
    )
    add_model_options(parser)
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
    parser.add_argument("--clip", type=positive_float, default=1.0, help="gradient norm clipping")
    parser.add_argument("--eval-every", type=int, default=25, help="held-out perplexity every N steps")
    parser.add_argument("--eval-windows", type=positive_int, default=8,
                        help="held-out windows from the WikiText-2 raw test split (never trained on)")
    parser.add_argument("--save-every", type=int, default=25, help="checkpoint every N steps (and at the end)")
    parser.add_argument("--mesh", default=None, choices=["auto"],
                        help="auto: one rank per process under torchrun, each training the branch it computes")
    parser.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory (created)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into --out even when it holds another model's checkpoint or other files")
    parser.set_defaults(func=run)


def _layer_list(spec: str | None) -> tuple[int, ...] | None:
    if spec is None:
        return None
    if match := RANGE.match(spec):
        return tuple(range(int(match[1]), int(match[2])))
    if re.match(r"^\d+(,\d+)*$", spec):
        return tuple(int(i) for i in spec.split(","))
    raise ValueError(f"--train-layers {spec!r}: expected START:END (e.g. 14:28) or a list like 14,15,16")


def run(args: argparse.Namespace) -> None:
    from lp_fx.tools import finetune
    from lp_fx.tools.checkpoint import check_checkpoint_dir

    out = check_checkpoint_dir(args.out, overwrite=args.overwrite)  # before any work: a run must be able to save
    mesh = _init_mesh(args.mesh)
    train_path = Path(args.train_data) if args.train_data else None
    data_dir = data.resolve_data_dir(args.data_dir)
    train_path = train_path or data_dir / "wikitext-2" / "train.txt"
    text = data.load_training_text(train_path)
    loaded, _ = options.load(args)
    check_checkpoint_dir(out, loaded.model, args.overwrite)  # another model's checkpoint: known once loaded
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
        overwrite=args.overwrite,
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
