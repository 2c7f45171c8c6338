"""``lp-fx finetune``: win back what a pairing costs by fine-tuning through the compiled pairing."""

from __future__ import annotations

import argparse
import contextlib
import os
from dataclasses import dataclass
import re
from pathlib import Path
from typing import Any

import torch

from lp_fx.checkpoint import check_checkpoint_dir, hold_checkpoint_dir
from lp_fx.pairing import RANGE, Pairing
from lp_fx.tools import data
from lp_fx.tools.cli import common as options
from lp_fx.config import INNER_COMPILERS
from lp_fx.tools.cli.common import add_command, PairedModelArgs
from lp_fx.tools.console import say
from lp_fx.tools.evaluation import scoring as evaluate
from lp_fx.tools.options import option, positive_float, positive_int
from lp_fx.tools.training import finetune, plot, self_text
from lp_fx.tools.training.finetune import LOSSES, TRAIN_SETS, FinetuneConfig
from lp_fx.tools.training.texts import FileText, SelfText, mixed

SELF_GROUP = "self-generated training text (--train-data self)"
LORA_GROUP = "LoRA adapters (peft) in place of the weights (--lora RANK)"


def module_names(text: str) -> tuple[str, ...]:
    """An argparse ``type``: comma-separated names of linear layers, e.g. ``q_proj,v_proj``."""
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r}: give names of linear layers, e.g. q_proj,v_proj")
    return names


module_names.__name__ = "names of linear layers"


@dataclass(frozen=True)
class FinetuneArgs(PairedModelArgs):
    """``lp-fx finetune``'s options; the training's defaults are
    :class:`~lp_fx.tools.training.finetune.FinetuneConfig`'s."""

    inner: str = option(FinetuneConfig.inner, choices=INNER_COMPILERS)
    """compiler behind the layer_parallel backend (aot_eager: the backward runs through AOTAutograd)"""
    pairs: str | None = option(None, metavar="SPEC", exclusive="which", required=True)
    """a range START:END (e.g. 14:28), pairs like 14-15,20-21, or 'baseline' (no pairs: the unpaired control,
    with --loss lm and --train-layers)"""
    plan: str | None = option(None, metavar="FILE", exclusive="which", required=True)
    """a plan JSON from `lp-fx plan` (per-pair modes)"""
    loss: str = option(FinetuneConfig.loss, choices=LOSSES)
    """distill: KL to the unpaired model (default); lm: next-token loss"""
    train: str = option(FinetuneConfig.train, choices=TRAIN_SETS)
    """paired: only the paired layers' parameters (default); all: every parameter"""
    train_layers: str | None = option(None, metavar="SPEC")
    """train these layers instead of the paired ones: START:END or 3,4,5"""
    train_data: list[str] | None = option(None, action="append", metavar="FILE|wikitext|self")
    """plain text to train on (default, or 'wikitext': wikitext-2/train.txt in the data directory; the tokenized
    WikiText release is detokenized first); 'self': the unpaired model's own answers to --self-prompts through
    its chat template. Given more than once, every batch takes its sequences from each text in equal shares"""
    self_prompts: str | None = option(None, metavar="FILE", group=SELF_GROUP)
    """instructions, one per line (default: examples/self_distill_prompts.txt)"""
    self_max_tokens: int | None = option(None, parse=positive_int, group=SELF_GROUP)
    """longest answer in tokens (default 256)"""
    self_temperature: float | None = option(None, parse=float, group=SELF_GROUP)
    """0: greedy answers (default); > 0: sampled at this temperature with --seed"""
    self_batch: int | None = option(None, parse=positive_int, group=SELF_GROUP)
    """prompts generated together (default 16)"""
    cache: str | None = option(None, metavar="FILE", group=SELF_GROUP)
    """JSON Lines file of the generated answers, reused by later runs (default: OUT.self-text.jsonl next to
    --out)"""
    steps: int = option(FinetuneConfig.steps)
    """optimizer steps"""
    lr: float | None = option(None, parse=positive_float)
    """peak learning rate (AdamW; default 1e-4, or 1e-3 with --lora)"""
    batch: int = option(FinetuneConfig.batch)
    """sequences per step"""
    seq_len: int = option(FinetuneConfig.seq_len)
    """tokens per sequence"""
    seed: int = option(FinetuneConfig.seed)
    """fixes the data order and the run"""
    warmup: int | None = option(FinetuneConfig.warmup, parse=int)
    """warm-up steps (default: steps / 10)"""
    clip: float = option(FinetuneConfig.clip, parse=positive_float)
    """gradient norm clipping"""
    eval_every: int = option(FinetuneConfig.eval_every)
    """held-out perplexity every N steps"""
    eval_windows: int = option(8, parse=positive_int)
    """held-out windows from the WikiText-2 raw test split (never trained on)"""
    save_every: int = option(FinetuneConfig.save_every)
    """checkpoint every N steps (and at the end)"""
    lora: int | None = option(None, parse=positive_int, metavar="RANK", group=LORA_GROUP)
    """train LoRA adapters of this rank on the trained layers' linear layers instead of their weights; the
    checkpoint holds them in peft's format and loading merges them into the weights"""
    lora_alpha: float | None = option(None, parse=positive_float, group=LORA_GROUP)
    """the adapters' scale is alpha / rank (default alpha: twice the rank)"""
    lora_targets: tuple[str, ...] | None = option(None, parse=module_names, metavar="NAMES", group=LORA_GROUP)
    """adapt only these linear layers of the trained layers, e.g. q_proj,v_proj (default: all of them)"""
    mesh: str | None = option(None, choices=("auto",))
    """auto: one rank per process under torchrun, each training the branch it computes"""
    out: str | None = option(None, metavar="DIR", required=True)
    """checkpoint directory (created)"""
    overwrite: bool = option(False)
    """write into --out even when it holds another model's checkpoint or other files"""


def register(subparsers: argparse._SubParsersAction) -> None:
    add_command(
        subparsers, "finetune", "train the paired layers through the compiled pairing to win back accuracy", FinetuneArgs, run,
    )


SELF_OPTIONS = ("self_prompts", "self_max_tokens", "self_temperature", "self_batch", "cache")


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
    if args.lora is None and (args.lora_alpha is not None or args.lora_targets is not None):
        raise ValueError(f"--{'lora-alpha' if args.lora_alpha is not None else 'lora-targets'} is used only with --lora RANK")
    if args.lora is not None and args.mesh is not None:
        raise ValueError("--lora trains in one process: drop --mesh, or fine-tune the weights on the mesh")
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
    loaded, _ = options.load(args)
    check_checkpoint_dir(out, loaded.model, args.overwrite)  # another model's checkpoint: known once loaded
    pairing = Pairing.parse(args.plan or args.pairs, loaded.num_layers)
    config = finetune.FinetuneConfig(
        pairs=pairing.pairs, modes=pairing.modes, mode=args.mode, loss=args.loss, train=args.train,
        train_layers=_layer_list(args.train_layers), steps=args.steps, lr=args.lr, batch=args.batch,
        seq_len=args.seq_len, seed=args.seed, warmup=args.warmup, clip=args.clip,
        eval_every=args.eval_every, save_every=args.save_every, inner=args.inner,
        lora_rank=args.lora, lora_alpha=args.lora_alpha, lora_targets=args.lora_targets,
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
        plot.plot_record(record, out / "loss.png")
        say(f"wrote {out / 'loss.png'}")


def _init_mesh(mesh: str | None) -> str | None:
    """``auto``: join the process group torchrun set up (gloo on CPU, nccl on GPU)."""
    if mesh is None:
        return None
    if "RANK" not in os.environ:
        raise ValueError("--mesh auto needs torchrun: torchrun --nproc_per_node 2 -m lp_fx.tools.cli finetune ...")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return mesh
