"""Write a folded pairing (:mod:`lp_fx.tools.export.fold`) as a file a stock engine serves: a GGUF
(:mod:`lp_fx.tools.export.gguf_writer`) or a Hugging Face folder, every check done before the first
byte is written."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from lp_fx.checkpoint import load_finetuned
from lp_fx.files import check_folder_writable
from lp_fx.pairing import Pair
from lp_fx.tools.export.fold import ExportError, Folded, Source, build_model, check_pairing, fold
from lp_fx.tools.export.gguf_writer import check_gguf, write_gguf

log = logging.getLogger(__name__)

FORMATS = ("gguf", "hf")
DTYPES = ("f32", "f16", "q8_0")


def check_output(folded_wide: bool, fmt: str, dtype: str, out: Path) -> None:
    """Refuse a format, dtype or output path that cannot hold the export."""
    if fmt not in FORMATS:
        raise ExportError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if fmt == "hf":
        if folded_wide:
            raise ExportError(
                "an lp pairing has layers of two widths, which no Hugging Face config describes: "
                "use --format gguf (llama.cpp's deci architecture), or prune/merge pairs"
            )
        if dtype == "q8_0":
            raise ExportError("dtype q8_0 is a GGUF type: with --format hf use f32 or f16")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ExportError(f"{out} exists and is not an empty directory; give a new directory for --format hf")
    elif out.is_dir():
        raise ExportError(f"{out} is a directory; give a .gguf file name")
    check_folder_writable(out.parent, ExportError)


def export(
    model: nn.Module,
    pairs: Sequence[Pair],
    modes: Sequence[str],
    out: str | Path,
    source: Source,
    fmt: str = "gguf",
    dtype: str = "f32",
    checkpoint: str | Path | None = None,
) -> Folded:
    """Write ``model`` with ``pairs`` folded in to ``out``; return what was written.

    A fine-tuned ``checkpoint`` (``lp-fx finetune``) is loaded into ``model`` first. Every check
    (pairing, format, dtype, output path, GGUF support, tokenizer) runs before the first byte is
    written; the file or folder is written under a temporary name in ``out``'s folder and renamed.
    """
    out = Path(out)
    check_pairing(model, pairs, modes)
    check_output("lp" in modes, fmt, dtype, out)
    if fmt == "gguf":
        check_gguf(model.config, source)
    if checkpoint is not None:
        load_finetuned(model, checkpoint)
    folded = fold(model, pairs, modes)
    if fmt == "gguf":
        write_gguf(folded, out, dtype, source)
    else:
        write_hf(folded, out, dtype)
    log.info("wrote %s: %d layers (%s)", out, len(folded.layers), ", ".join(layer.how for layer in folded.layers))
    return folded


def write_hf(folded: Folded, out: Path, dtype: str) -> None:
    """A Hugging Face folder (config.json with the new layer count, safetensors), written next to
    ``out`` and renamed to it."""
    model = build_model(folded, torch.float16 if dtype == "f16" else torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        model.config.lp_fx_export = folded.pairing
        model.save_pretrained(tmp)
        if out.exists():
            out.rmdir()  # checked empty
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
