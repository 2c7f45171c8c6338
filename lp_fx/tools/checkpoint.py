"""Fine-tuned pairings on disk: save atomically, recognise the model, load in place.

A checkpoint directory holds

- ``trained.safetensors``: the trained tensors only, named as in the model's ``state_dict()``;
- ``pairing.json``: the pairs and their modes, the layer stack, and enough of the model's shape
  to recognise it (layer count, hidden size, vocabulary, class, shapes of the trained tensors);
  it is also a valid plan file (``options={"plan": path}``);
- ``train.json``: what the run was asked for and what it measured (see ``lp_fx.tools.finetune``).

Every file is written to a temporary name in the same directory and renamed over the old one,
so an interrupted run leaves the previous complete file, never a half-written one.

Serving is ``torch.compile(model, backend="layer_parallel", options=load_finetuned(model, dir))``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lp_fx.config import LayerParallelError, Pair

TENSORS = "trained.safetensors"
PAIRING = "pairing.json"
RECORD = "train.json"
FORMAT = "lp_fx.finetuned/1"


class CheckpointError(LayerParallelError):
    """A checkpoint that cannot be used: missing, corrupt, or made for another model."""


# ------------------------------------------------------------------------------ the layer stack


def layer_stack_of(model: nn.Module) -> tuple[str, int]:
    """``(path, count)`` of the model's decoder layers: the longest module list of numbered
    children of one class (``model.layers``, ``transformer.h``), the outermost on a tie."""
    best: tuple[str, int] | None = None
    for path, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            continue
        children = dict(module.named_children())
        if not children or not all(key.isdigit() for key in children):
            continue
        if len({type(child) for child in children.values()}) != 1:
            continue
        if best is None or len(children) > best[1]:
            best = (path, len(children))
    if best is None:
        raise LayerParallelError(
            f"{type(model).__name__} has no list of decoder layers (a ModuleList or ModuleDict of "
            "numbered children of one class)"
        )
    return best


def layer_parameter_names(model: nn.Module, stack: str, layers: Sequence[int]) -> list[str]:
    """Names of the parameters that belong to the given layers of ``stack``."""
    prefixes = tuple(f"{stack}.{i}." for i in layers)
    return [name for name, _ in model.named_parameters() if name.startswith(prefixes)]


def model_signature(model: nn.Module) -> dict[str, Any]:
    """What identifies a model for a checkpoint: its class, layer stack and main sizes."""
    stack, count = layer_stack_of(model)
    config = getattr(model, "config", None)
    return {
        "class": type(model).__name__,
        "stack": stack,
        "num_layers": count,
        "hidden_size": getattr(config, "hidden_size", None),
        "vocab_size": getattr(config, "vocab_size", None),
    }


# ---------------------------------------------------------------------------------------- save


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename ``tmp`` over ``path``: readers see the old file or the new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2) + "\n"))


def pairing_record(
    model: nn.Module, pairs: Sequence[Pair], modes: Sequence[str], trained: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    """The content of ``pairing.json`` (also a plan file: ``pairs``, ``modes``, ``num_layers``)."""
    signature = model_signature(model)
    return {
        "format": FORMAT,
        "pairs": [list(pair) for pair in pairs],
        "modes": list(modes),
        "num_layers": signature["num_layers"],
        "model": {**signature, "tensors": {name: list(t.shape) for name, t in trained.items()}},
    }


def unique_tensors(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The named tensors of ``model``'s state dict, one name per storage (tied weights once)."""
    state = model.state_dict(keep_vars=True)
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name in names:
        tensor = state[name].detach()
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        out[name] = tensor.contiguous().cpu()
    return out


def save_checkpoint(
    directory: str | Path,
    tensors: Mapping[str, torch.Tensor],
    pairing: Mapping[str, Any],
    record: Mapping[str, Any],
) -> None:
    """Write (or replace) the three files of a checkpoint, each atomically."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_json(directory / PAIRING, pairing)
    step = str(record.get("step", ""))
    atomic_write(
        directory / TENSORS,
        lambda tmp: save_file(dict(tensors), str(tmp), metadata={"format": FORMAT, "step": step}),
    )
    _write_json(directory / RECORD, record)


def check_writable(directory: str | Path) -> Path:
    """Create ``directory`` if needed and check that files can be written there, before any work."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise CheckpointError(f"cannot write to {directory}: {error.strerror or error}") from None
    return directory


# ---------------------------------------------------------------------------------------- load


def read_pairing(directory: str | Path) -> dict[str, Any]:
    """``pairing.json`` of a checkpoint, checked for the fields the loader needs."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    path = directory / PAIRING
    try:
        pairing = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: not a checkpoint written by `lp-fx finetune`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}): the checkpoint is corrupt") from None
    if not isinstance(pairing, dict) or pairing.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an lp_fx fine-tuning checkpoint (expected format {FORMAT!r})")
    for key, kind in (("pairs", list), ("modes", list), ("num_layers", int), ("model", dict)):
        if not isinstance(pairing.get(key), kind):
            raise CheckpointError(f"{path}: field {key!r} is missing or not a {kind.__name__}")
    return pairing


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / TENSORS
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint has no trained tensors")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path} cannot be read ({error}): the checkpoint is corrupt") from None


def _check_same_model(model: nn.Module, pairing: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], where: Path) -> None:
    saved = pairing["model"]
    here = model_signature(model)
    for key in ("stack", "num_layers", "hidden_size", "vocab_size"):
        if saved.get(key) != here[key]:
            raise CheckpointError(
                f"checkpoint {where} was made for another model: {key} {saved.get(key)!r} "
                f"({saved.get('class')}, {saved.get('num_layers')} layers in {saved.get('stack')}), "
                f"this model has {here[key]!r} ({here['class']}, {here['num_layers']} layers in {here['stack']})"
            )
    state = model.state_dict()
    for name, tensor in tensors.items():
        if name not in state:
            raise CheckpointError(f"checkpoint {where} has tensor {name!r}, which this {here['class']} does not have")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"checkpoint {where}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"this model's has {tuple(state[name].shape)}"
            )


def load_finetuned(model: nn.Module, directory: str | Path) -> dict[str, Any]:
    """Load a fine-tuned pairing into ``model`` in place; return its backend options.

    ``torch.compile(model, backend="layer_parallel", options=load_finetuned(model, dir))``
    serves what was trained. Everything is checked before the first tensor is copied: a missing
    or corrupt file, or a checkpoint made for another model, raises :class:`CheckpointError` and
    leaves ``model`` untouched.
    """
    directory = Path(directory)
    pairing = read_pairing(directory)
    tensors = _read_tensors(directory)
    _check_same_model(model, pairing, tensors, directory)
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in tensors.items():
            state[name].copy_(tensor)
    return finetuned_options(pairing, directory)


def finetuned_options(pairing: Mapping[str, Any], directory: Path) -> dict[str, Any]:
    """Backend options for a checkpoint's pairing: ``pairs``/``mode``, or the file as a plan when
    pairs have different modes."""
    modes = set(pairing["modes"])
    options: dict[str, Any] = {"stack": pairing["model"]["stack"]}
    if len(modes) > 1:
        return {**options, "plan": str(directory / PAIRING)}
    return {**options, "pairs": [tuple(pair) for pair in pairing["pairs"]], "mode": modes.pop() if modes else "lp"}
