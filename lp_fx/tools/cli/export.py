"""``lp-fx export``: a pairing as a plain checkpoint (lp pairs as one wide layer each, prune/merge as fewer layers)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from lp_fx.checkpoint import read_pairing
from lp_fx.config import MODES
from lp_fx.files import check_folder_writable
from lp_fx.pairing import Pairing
from lp_fx.tools.cli.common import add_command, ModelSpec
from lp_fx.tools.console import say
from lp_fx.tools.export.fold import Source
from lp_fx.tools.export.write import DTYPES, FORMATS, export
from lp_fx.tools import models
from lp_fx.tools.options import option


@dataclass(frozen=True)
class ExportArgs(ModelSpec):
    """``lp-fx export``'s options."""

    pairs: str | None = option(None, metavar="SPEC", exclusive="which")
    """a range START:END (e.g. 14:28), pairs like 14-15,20-21, or 'baseline' (no pairs)"""
    plan: str | None = option(None, metavar="FILE", exclusive="which")
    """a plan JSON from `lp-fx plan` (per-pair modes)"""
    mode: str | None = option(None, choices=MODES)
    """mode of the --pairs, or of a plan without modes (lp, prune, merge export; default lp); a checkpoint, or a
    plan with modes, fixes its own"""
    checkpoint: str | None = option(None, metavar="DIR")
    """a fine-tuned pairing from `lp-fx finetune`, folded in first (its pairing is used when --pairs/--plan are
    not given, and must match them when they are)"""
    format: str = option("gguf", choices=FORMATS)
    """gguf (llama.cpp) or hf (prune/merge only)"""
    dtype: str = option("f32", choices=DTYPES)
    """weights of the matrices (norms stay f32)"""
    out: str | None = option(None, required=True)
    """a .gguf file, or a new directory with --format hf"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """``lp-fx export``: the pairing as a plain checkpoint (:mod:`lp_fx.tools.export`)."""
    add_command(
        subparsers, "export", "write a pairing as a plain checkpoint: lp pairs as one wide layer each (GGUF, llama.cpp's "
        "deci architecture), prune/merge as the model with fewer layers (GGUF or a Hugging Face folder)", ExportArgs, run,
    )


def run(args: argparse.Namespace) -> None:
    check_folder_writable(Path(args.out).parent)  # before the model is loaded
    directory, gguf_file = models.resolve_model_path(args.model)
    checkpoint = Pairing.from_checkpoint(read_pairing(args.checkpoint), args.checkpoint) if args.checkpoint else None
    if checkpoint is None and not (args.pairs or args.plan):
        raise ValueError("give --pairs, --plan or --checkpoint")
    if checkpoint is not None and args.mode is not None:
        raise ValueError(f"--mode {args.mode} with --checkpoint {args.checkpoint}: a checkpoint's pairing fixes its "
                         f"modes ({', '.join(checkpoint.modes)}); drop --mode")
    loaded = models.load_model(args.model)
    pairing = Pairing.parse(args.plan or args.pairs, loaded.num_layers) if args.pairs or args.plan else checkpoint
    modes = export_modes(args, pairing, checkpoint)
    if checkpoint is not None and (list(pairing.pairs), list(modes)) != (list(checkpoint.pairs), list(checkpoint.modes)):
        raise ValueError(f"--checkpoint {args.checkpoint} was trained for pairs {list(checkpoint.pairs)} modes "
                         f"{list(checkpoint.modes)}, not {pairing.name} {list(pairing.pairs)} modes {list(modes)}")
    source = Source(loaded.name, directory / gguf_file if gguf_file else directory)
    folded = export(loaded.model, pairing.pairs, modes, args.out, source, args.format, args.dtype, args.checkpoint)
    widths = ", ".join(f"{layer.source}->{layer.heads}h/{layer.ffn}" for layer in folded.layers if layer.how == "lp")
    say(f"{loaded.name} {pairing.name}: {loaded.num_layers} -> {len(folded.layers)} layers "
        f"({args.format}, {args.dtype}){'; wide layers ' + widths if widths else ''}")
    say(f"wrote {args.out}")


def export_modes(args: argparse.Namespace, pairing: Pairing, checkpoint: Pairing | None) -> tuple[str, ...]:
    """Each pair's mode: a plan's own, else the checkpoint's, else ``--mode`` (default lp). ``--mode``
    with a plan that has modes is refused (with a checkpoint it was refused before the model loaded)."""
    if pairing.modes is not None and args.mode is not None:
        raise ValueError(f"--mode {args.mode} with --plan {args.plan}: the plan gives each pair its mode "
                         f"({', '.join(pairing.modes)}); drop --mode, which sets the mode of --pairs")
    if pairing.modes is not None:
        return pairing.modes
    if checkpoint is not None:
        return checkpoint.modes
    return pairing.modes_or(args.mode or "lp")
