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
from typing import Any

import torch
from torch import nn

from lp_fx.checkpoint import load_finetuned
from lp_fx.files import check_folder_writable, give_default_permissions, remove_stale_temporaries
from lp_fx.pairing import Pair
from lp_fx.tools.export.fold import ExportError, Folded, Source, build_model, check_foldable, fold
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
    written; the file or folder is written under a temporary name in ``out``'s folder and renamed
    (the temporary names that killed exports of ``out`` left are removed first).
    """
    out = Path(out)
    check_foldable(model, pairs, modes)
    check_output("lp" in modes, fmt, dtype, out)
    if fmt == "gguf":
        check_gguf(model.config, source, wide="lp" in modes)
    else:
        tokenizer = source_tokenizer(source)
    if checkpoint is not None:
        load_finetuned(model, checkpoint)
    folded = fold(model, pairs, modes)
    remove_stale_temporaries(out)
    if fmt == "gguf":
        write_gguf(folded, out, dtype, source)
    else:
        write_hf(folded, out, dtype, tokenizer)
    log.info("wrote %s: %d layers (%s)", out, len(folded.layers), ", ".join(layer.how for layer in folded.layers))
    return folded


def source_tokenizer(source: Source) -> Any:
    """The tokenizer of ``source`` (its GGUF's or its folder's), as transformers loads it: an hf
    export holds it so that the folder is a model that tools load (``lp-fx eval --model``)."""
    if source.tokenizer is None:
        raise ExportError("no tokenizer to copy: an hf export holds its model's tokenizer; give the model as a GGUF "
                          "file or a Hugging Face folder with its tokenizer")
    from transformers import AutoTokenizer  # lazy: transformers' import takes seconds; `import lp_fx.tools` stays light

    path = source.tokenizer
    directory, gguf = (path.parent, {"gguf_file": path.name}) if path.suffix == ".gguf" else (path, {})
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True, **gguf)
    except (OSError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ExportError(f"{path}: no tokenizer that transformers loads ({reason}); an hf export holds its "
                          "model's tokenizer") from None


def write_hf(folded: Folded, out: Path, dtype: str, tokenizer: Any) -> None:
    """A Hugging Face folder (config.json with the new layer count, safetensors, ``tokenizer``'s
    files), written next to ``out`` with the permissions ``mkdir`` and ``open`` give, and renamed to it."""
    model = build_model(folded, torch.float16 if dtype == "f16" else torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        model.config.lp_fx_export = folded.pairing
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        give_default_permissions(tmp)
        if out.exists():
            out.rmdir()  # checked empty
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
