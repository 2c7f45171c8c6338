"""Fine-tuned pairings and the model they were made for: recognise the model, check, load in place.

The files of a checkpoint (written all-or-nothing, read back against their sha256) are
:mod:`lp_fx.checkpoint_files`; this module holds what needs the model: which tensors a
pairing trains, the signature that recognises the model, the checks that a checkpoint fits it, and
:func:`load_finetuned`. It is also the one import for the tools (``__all__``).

A checkpoint records the class of the model it was trained from and the fingerprint of that
model's weights before training (:mod:`lp_fx.model_identity`); loading it into another
class, or into other weights, is refused. A checkpoint written before the fingerprint was recorded
loads with a warning that its base weights cannot be checked.

Serving is ``torch.compile(model, backend="layer_parallel", options=load_finetuned(model, dir))``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lp_fx.adapter import adapted_modules, check_adapter_fits, checked_record, merge_adapter, read_adapter_config
from lp_fx.config import PAIRING_MODES, LayerParallelError, config_from_options
from lp_fx.find_layers import layer_lists
from lp_fx.checkpoint_files import (
    CURRENT,
    FILES,
    FORMAT,
    LEGACY_FORMAT,
    LOCK,
    PAIRING,
    RECORD,
    TENSORS,
    CheckpointError,
    checkpoint_folder,
    complete_versions,
    hold_checkpoint_dir,
    read_pairing,
    read_pairing_in,
    read_tensors,
    save_checkpoint,
)
from lp_fx.files import check_folder_writable
from lp_fx.model_identity import model_identity
from lp_fx.pairing import Pair, Pairing, validate_pairs

__all__ = [
    "CURRENT", "LEGACY_FORMAT", "PAIRING", "RECORD", "TENSORS", "CheckpointError", "check_checkpoint_dir",
    "checkpoint_folder", "finetuned_options", "hold_checkpoint_dir", "layer_parameter_names", "layer_stack_of",
    "load_finetuned", "model_signature", "other_model", "pairing_record", "read_pairing", "save_checkpoint",
    "unique_tensors",
]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ the layer stack


def layer_stack_of(model: nn.Module) -> tuple[str, int]:
    """``(path, count)`` of the model's decoder layers, by the pass's own rule
    (:func:`lp_fx.find_layers.layer_lists`) applied to ``model.named_modules()``."""
    children: dict[str, dict[str, tuple[str, str]]] = defaultdict(dict)
    for path, module in model.named_modules():
        container, _, key = path.rpartition(".")
        if container:
            children[container][key] = (path, type(module).__qualname__)
    stacks = layer_lists(children)
    if not stacks:
        raise LayerParallelError(
            f"{type(model).__name__} has no list of decoder layers (a module list of numbered children "
            "of one class)"
        )
    path = next(iter(stacks))
    return path, len(stacks[path])


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


def other_model(saved: Mapping[str, Any], here: Mapping[str, Any]) -> str | None:
    """How a checkpoint's model signature differs from this model's, or None when they agree."""
    if saved.get("class") != here["class"]:
        return f"class {saved.get('class')!r}, this model is a {here['class']!r}"
    for key in ("stack", "num_layers", "hidden_size", "vocab_size"):
        if saved.get(key) != here[key]:
            return (
                f"{key} {saved.get(key)!r} ({saved.get('class')}, {saved.get('num_layers')} layers in "
                f"{saved.get('stack')}), this model has {here[key]!r} ({here['class']}, {here['num_layers']} "
                f"layers in {here['stack']})"
            )
    return None


# ---------------------------------------------------------------------------------------- save


def pairing_record(model: nn.Module, pairs: Sequence[Pair], modes: Sequence[str]) -> dict[str, Any]:
    """The content of ``pairing.json`` but the tensor list, which :func:`save_checkpoint` adds
    (also a plan file: ``pairs``, ``modes``, ``num_layers``). Made before training: ``model.weights``
    is the fingerprint of the base weights."""
    signature = model_signature(model)
    return {
        "format": FORMAT,
        "pairs": [list(pair) for pair in pairs],
        "modes": list(modes),
        "num_layers": signature["num_layers"],
        "model": {**signature, **model_identity(model)},
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


def check_checkpoint_dir(directory: str | Path, model: nn.Module | None = None, overwrite: bool = False) -> Path:
    """Check, before any work and creating nothing, that a run may write its checkpoints to
    ``directory``: a new or empty directory, or one holding a checkpoint of this model (replaced
    at the first save). Another model's checkpoint (known once ``model`` is given), an unreadable
    one, or other files are refused unless ``overwrite``; a file in the way always is."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} is a file; give a directory")
    if directory.is_dir():
        for name in (*FILES, CURRENT):
            if (directory / name).is_dir() and not (directory / name).is_symlink():
                raise CheckpointError(
                    f"{directory / name} is a directory: a checkpoint cannot be written in {directory}; "
                    "give another directory"
                )
        if not overwrite:
            _refuse_other_contents(directory, model)
    check_folder_writable(directory, CheckpointError)
    return directory


def _refuse_other_contents(directory: Path, model: nn.Module | None) -> None:
    entries = sorted(entry.name for entry in directory.iterdir() if entry.name != LOCK)
    if not entries:
        return
    replace = "give another directory, or --overwrite (overwrite=True) to replace it"
    holds_checkpoint = (directory / CURRENT).is_symlink() or (directory / PAIRING).exists() or complete_versions(directory)
    if not holds_checkpoint:
        raise CheckpointError(
            f"{directory} is not empty ({len(entries)} entries, e.g. {entries[0]!r}) and holds no checkpoint; "
            "give a new or empty directory, or --overwrite (overwrite=True) to write the checkpoint there"
        )
    try:
        pairing = read_pairing(directory)
    except CheckpointError as error:
        raise CheckpointError(f"{directory} holds a checkpoint that cannot be used ({error}); {replace}") from None
    if model is None:
        return
    difference = other_model(pairing["model"], model_signature(model))
    if difference:
        raise CheckpointError(f"{directory} holds a checkpoint of another model: {difference}; {replace}")
    log.info("%s holds a checkpoint of this model: the run replaces it", directory)


# ---------------------------------------------------------------------------------------- load


def _check_same_model(model: nn.Module, pairing: Mapping[str, Any], folder: Path) -> None:
    """The checkpoint's model is this one, and its pairing is valid for it: the backend's rules
    for the options (types, consecutive, disjoint, modes) and every layer in range."""
    here = model_signature(model)
    difference = other_model(pairing["model"], here)
    if difference is None and pairing["num_layers"] != here["num_layers"]:
        difference = f"num_layers {pairing['num_layers']!r}, this model has {here['num_layers']!r}"
    if difference:
        raise CheckpointError(f"checkpoint {folder} was made for another model: {difference}")
    _check_same_base(model, pairing["model"], folder)
    try:
        pairs = validate_pairs(pairing["pairs"])
        modes = pairing["modes"]
        if len(modes) != len(pairs):
            raise LayerParallelError(f"'modes' has {len(modes)} entries for {len(pairs)} pairs: give one mode per pair")
        for mode in modes:
            if mode not in PAIRING_MODES:
                raise LayerParallelError(
                    f"mode {mode!r} is not a fine-tuned pairing mode; valid: {', '.join(map(repr, PAIRING_MODES))}"
                )
        for pair in pairs:
            if pair[1] >= here["num_layers"]:
                raise LayerParallelError(
                    f"pair {pair} is out of range: {here['stack']} has {here['num_layers']} layers, "
                    f"valid indices 0..{here['num_layers'] - 1}"
                )
        config_from_options(finetuned_options(pairing))
    except LayerParallelError as error:
        raise CheckpointError(f"{folder / PAIRING}: {error}") from None


def _check_same_base(model: nn.Module, saved: Mapping[str, Any], folder: Path) -> None:
    """The checkpoint was trained from this model's weights (its recorded fingerprint, when it has one)."""
    if "weights" not in saved:
        log.warning("%s records no fingerprint of the weights it was fine-tuned from (written before it was "
                    "recorded): loaded without checking that this model has them", folder)
        return
    here = model_identity(model)["weights"]
    if saved["weights"] != here:
        raise CheckpointError(
            f"checkpoint {folder} was fine-tuned from other weights: base weights {saved['weights']} recorded, this "
            f"{type(model).__name__} has {here}; load it into the model it was fine-tuned from (the same weights, "
            "in the dtype it was trained in), or fine-tune this model"
        )


def _check_fits(model: nn.Module, tensors: Mapping[str, torch.Tensor], folder: Path) -> None:
    """Every tensor is one of this model's, with its shape."""
    state = model.state_dict()
    for name, tensor in tensors.items():
        if name not in state:
            raise CheckpointError(f"checkpoint {folder} has tensor {name!r}, which this {type(model).__name__} does not have")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"checkpoint {folder}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"this model's has {tuple(state[name].shape)}"
            )


def load_finetuned(model: nn.Module, directory: str | Path) -> dict[str, Any]:
    """Load a fine-tuned pairing into ``model`` in place; return its backend options.

    ``torch.compile(model, backend="layer_parallel", options=load_finetuned(model, dir))``
    serves what was trained. Everything is checked before the first tensor is copied — the
    pairing against the model (the backend's rules, layers in range), the tensors against the
    list in ``pairing.json`` (names, shapes, dtypes, sha256) and for finite values, a LoRA
    adapter's config against its record and its factors against the modules they adapt — and any
    problem raises :class:`CheckpointError` naming the file, leaving ``model`` untouched. A LoRA
    adapter is merged into the weights (:func:`lp_fx.adapter.merge_adapter`).
    """
    folder = checkpoint_folder(directory)
    pairing = read_pairing_in(folder)
    _check_same_model(model, pairing, folder)
    adapter = None
    if "adapter" in pairing:
        adapter = checked_record(pairing, folder)
        read_adapter_config(folder, adapter)
    tensors = read_tensors(folder, pairing)
    if adapter is not None:
        adapter = {**adapter, "modules": adapted_modules(model, adapter["modules"])}  # peft's short names as paths
        check_adapter_fits(model, tensors, adapter, folder)
        merge_adapter(model, tensors, adapter)
        return finetuned_options(pairing)
    _check_fits(model, tensors, folder)
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in tensors.items():
            state[name].copy_(tensor)
    return finetuned_options(pairing)


def finetuned_options(pairing: Mapping[str, Any]) -> dict[str, Any]:
    """Backend options for a checkpoint's pairing: its layer stack, its pairs and their modes."""
    return Pairing.from_checkpoint(pairing, "").to_options(stack=pairing["model"]["stack"])
