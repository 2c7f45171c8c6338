"""``lp-fx finetune``: win back what a pairing costs by fine-tuning through the compiled pairing."""

from __future__ import annotations

import argparse
import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lp_fx.tools import data, evaluate, self_text
from lp_fx.tools.arguments import positive_float, positive_int
from lp_fx.tools.commands import options
from lp_fx.tools.commands.options import RANGE, add_model_options, parse_pairing
from lp_fx.tools.console import say


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
    parser.add_argument("--train-data", action="append", default=None, metavar="FILE|wikitext|self",
                        help="plain text to train on (default, or 'wikitext': wikitext-2/train.txt in the data "
                        "directory; the tokenized WikiText release is detokenized first); 'self': the unpaired "
                        "model's own answers to --self-prompts through its chat template. Given more than once, "
                        "every batch takes its sequences from each text in equal shares")
    _add_self_options(parser)
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


def _add_self_options(parser: argparse.ArgumentParser) -> None:
    """Options of ``--train-data self``; None by default, so that giving one without it is refused."""
    group = parser.add_argument_group("self-generated training text (--train-data self)")
    group.add_argument("--self-prompts", default=None, metavar="FILE",
                       help=f"instructions, one per line (default: {self_text.DEFAULT_PROMPTS.relative_to(data.REPO_ROOT)})")
    group.add_argument("--self-max-tokens", type=positive_int, default=None,
                       help=f"longest answer in tokens (default {self_text.GenerationSettings.max_new_tokens})")
    group.add_argument("--self-temperature", type=float, default=None,
                       help="0: greedy answers (default); > 0: sampled at this temperature with --seed")
    group.add_argument("--self-batch", type=positive_int, default=None,
                       help=f"prompts generated together (default {self_text.GenerationSettings.batch})")
    group.add_argument("--cache", default=None, metavar="FILE",
                       help="JSON Lines file of the generated answers, reused by later runs (default: "
                       "OUT.self-text.jsonl next to --out)")


SELF_OPTIONS = ("self_prompts", "self_max_tokens", "self_temperature", "self_batch", "cache")


@dataclass(frozen=True)
class TrainingIds:
    """The token stream to train on, what the run record says of it, and a line for the user."""

    ids: list[int] | list[list[int]]  # one stream, or several mixed in equal shares per batch
    record: dict[str, Any]
    description: str


@dataclass
class FileText:
    """A plain text file to train on, read before the model is loaded."""

    path: Path
    text: str

    def token_ids(self, loaded: Any, mesh: str | None, progress: bool) -> TrainingIds:
        ids = loaded.tokenizer.encode(self.text, add_special_tokens=False)
        return TrainingIds(ids, {"train_data": str(self.path)}, f"training text {self.path} ({len(ids)} tokens)")


@dataclass
class SelfText:
    """The unpaired model's answers to ``prompts``, generated (or read from ``cache``) once the
    model is loaded and before it is trained."""

    prompts_path: Path
    prompts: list[str]
    settings: self_text.GenerationSettings
    cache: Path

    def token_ids(self, loaded: Any, mesh: str | None, progress: bool) -> TrainingIds:
        """Under a mesh rank 0 generates and writes the cache; the other ranks then read it."""
        rank0 = mesh is None or torch.distributed.get_rank() == 0
        if rank0:
            samples = self._samples(loaded, progress)
        if mesh is not None:
            torch.distributed.barrier()
        if not rank0:
            samples = self._samples(loaded, False)
        ids = self_text.conversations_ids(loaded.tokenizer, samples)
        made = self_text.summary(samples, len(ids))
        record = {"train_data": self_text.SELF, "self_prompts": str(self.prompts_path), "cache": str(self.cache),
                  "self_generation": self.settings.cache_key(), "self_text": made}
        return TrainingIds(ids, record, self._describe(made))

    def _samples(self, loaded: Any, progress: bool) -> list[dict[str, Any]]:
        return self_text.training_samples(loaded.model, loaded.tokenizer, loaded.name, self.prompts, self.settings,
                                          self.cache, progress)

    def _describe(self, made: dict[str, Any]) -> str:
        mode = "greedy" if self.settings.greedy else f"sampled at temperature {self.settings.temperature}"
        return (f"training text: the unpaired model's {mode} answers to {len(self.prompts)} prompts of "
                f"{self.prompts_path}, {made['finished']:.0%} ended before {self.settings.max_new_tokens} "
                f"tokens ({made['tokens']} tokens with the chat template; cache {self.cache})")


WIKITEXT = "wikitext"  # the --train-data value naming the default text


def training_texts(args: argparse.Namespace, out: Path, data_dir: Path) -> list[FileText | SelfText]:
    """What ``--train-data`` and the self options ask for, checked before the model is loaded."""
    names = args.train_data or [WIKITEXT]
    keys = [name if name == self_text.SELF else _file_path(name, data_dir).resolve() for name in names]
    repeated = [name for name, key in zip(names, keys) if keys.count(key) > 1]
    if repeated:
        raise ValueError(f"--train-data {repeated[0]} is given more than once (as {' and '.join(repeated)}); "
                         "each text is mixed in once")
    given = [name for name in SELF_OPTIONS if getattr(args, name) is not None]
    if given and self_text.SELF not in names:
        raise ValueError(f"--{given[0].replace('_', '-')} is used only with --train-data self")
    return [_self_text(args, out) if name == self_text.SELF else _file_text(name, data_dir) for name in names]


def _file_path(name: str, data_dir: Path) -> Path:
    return data_dir / "wikitext-2" / "train.txt" if name == WIKITEXT else Path(name)


def _file_text(name: str, data_dir: Path) -> FileText:
    path = _file_path(name, data_dir)
    return FileText(path, data.load_training_text(path))


def _self_text(args: argparse.Namespace, out: Path) -> SelfText:
    prompts_path = Path(args.self_prompts) if args.self_prompts else self_text.DEFAULT_PROMPTS
    defaults = self_text.GenerationSettings()
    settings = self_text.GenerationSettings(
        max_new_tokens=_given(args.self_max_tokens, defaults.max_new_tokens),
        temperature=_given(args.self_temperature, defaults.temperature), seed=args.seed,
        batch=_given(args.self_batch, defaults.batch),
    )
    cache = Path(args.cache) if args.cache else out.parent / f"{out.name}.self-text.jsonl"
    options.writable(str(cache))
    return SelfText(prompts_path, self_text.load_prompts(prompts_path), settings, cache)


def mixed(texts: list[TrainingIds]) -> TrainingIds:
    """Several training texts as one: their streams, drawn from in equal shares per batch."""
    if len(texts) == 1:
        return texts[0]
    record = {key: value for text in texts for key, value in text.record.items()}
    record["train_data"] = [text.record["train_data"] for text in texts]
    description = " + ".join(text.description for text in texts)
    return TrainingIds([text.ids for text in texts], record, f"{description}; each batch takes from each in equal shares")


def _given(value: Any, default: Any) -> Any:
    return default if value is None else value


def _layer_list(spec: str | None) -> tuple[int, ...] | None:
    if spec is None:
        return None
    if match := RANGE.match(spec):
        return tuple(range(int(match[1]), int(match[2])))
    if re.match(r"^\d+(,\d+)*$", spec):
        return tuple(int(i) for i in spec.split(","))
    raise ValueError(f"--train-layers {spec!r}: expected START:END (e.g. 14:28) or a list like 14,15,16")


def run(args: argparse.Namespace) -> None:
    """Check what can be checked without the model, hold ``--out`` (rank 0: the rank that writes
    there; a run holding it already is refused), then train."""
    from lp_fx.tools.checkpoint import check_checkpoint_dir, hold_checkpoint_dir

    out = check_checkpoint_dir(args.out, overwrite=args.overwrite)  # before any work: a run must be able to save
    data_dir = data.resolve_data_dir(args.data_dir)
    sources = training_texts(args, out, data_dir)
    data.check_batch_shares(len(sources), args.batch)
    mesh = _init_mesh(args.mesh)
    rank0 = mesh is None or torch.distributed.get_rank() == 0
    with hold_checkpoint_dir(out) if rank0 else contextlib.nullcontext():
        _train(args, out, data_dir, sources, mesh, rank0)


def _train(
    args: argparse.Namespace, out: Path, data_dir: Path, sources: list[FileText | SelfText], mesh: str | None, rank0: bool
) -> None:
    from lp_fx.tools import finetune
    from lp_fx.tools.checkpoint import check_checkpoint_dir

    loaded, _ = options.load(args)
    check_checkpoint_dir(out, loaded.model, args.overwrite)  # another model's checkpoint: known once loaded
    pairing = parse_pairing(args.plan or args.pairs, loaded.num_layers)
    config = finetune.FinetuneConfig(
        pairs=pairing.pairs, modes=pairing.modes, mode=args.mode, loss=args.loss, train=args.train,
        train_layers=_layer_list(args.train_layers), steps=args.steps, lr=args.lr, batch=args.batch,
        seq_len=args.seq_len, seed=args.seed, warmup=args.warmup, clip=args.clip,
        eval_every=args.eval_every, save_every=args.save_every, inner=args.inner,
    )
    train = mixed([source.token_ids(loaded, mesh, rank0 and not args.no_progress) for source in sources])
    heldout = evaluate.wikitext_windows(loaded.tokenizer, data_dir, args.window, "all", args.eval_windows)
    if rank0:
        say(f"model {loaded.name}: {pairing.name}, loss {args.loss}, {train.description}, "
            f"held-out: {heldout.shape[0]} windows of WikiText-2 raw test")
    record = finetune.finetune(
        loaded.model, train.ids, config, out, heldout=heldout, mesh=mesh, progress=rank0 and not args.no_progress,
        extra_args={"model": args.model, "pairing": pairing.name, **train.record,
                    "eval_windows": args.eval_windows, "window": args.window},
        overwrite=args.overwrite,
    )
    if rank0:
        points = record["heldout"]
        say(f"held-out perplexity: {points[0]['ppl']:.3f} before, {points[-1]['ppl']:.3f} after "
            f"{record['step']} steps ({record['wall_s']:.0f} s); checkpoint in {out}")
        finetune.plot_record(record, out / "loss.png")
        say(f"wrote {out / 'loss.png'}")


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
