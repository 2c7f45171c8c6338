"""Fine-tuned pairings on disk: save all-or-nothing, recognise the model, check, load in place.

A checkpoint directory ``D`` holds one complete checkpoint in a folder of its own, and a link
``D/current`` that names that folder::

    D/current -> ckpt-step000020-k3j9x1q2
    D/ckpt-step000020-k3j9x1q2/trained.safetensors   the trained tensors only, named as in state_dict()
    D/ckpt-step000020-k3j9x1q2/pairing.json          pairs, modes, layer stack, the model's shape,
                                                     and name, shape, dtype and sha256 of each tensor
    D/ckpt-step000020-k3j9x1q2/train.json            what the run was asked for and what it measured
    D/pairing.json -> current/pairing.json           (and the two others: links, to read by hand;
                                                     pairing.json is also a plan file)

Saving writes the three files into a new folder, fsyncs them and the folder, then switches
``D/current`` to it with one ``rename`` of a new link over the old one: the only step that changes
what ``D`` holds, and rename is atomic. Interrupted before it, ``current`` still names the previous
folder, which nothing has touched; after it, the new folder is complete. So a load always sees
one whole checkpoint, never files of two. Folders no longer named by ``current`` (replaced ones,
or one an interrupted save left half-written) are removed by the next save.

A checkpoint written before this layout (format ``lp_fx.finetuned/1``: the three files directly in
``D``, no checksums) still loads: its tensor names, shapes and values are checked, and a warning
says it has no checksums.

Serving is ``torch.compile(model, backend="layer_parallel", options=load_finetuned(model, dir))``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lp_fx.config import PAIRING_MODES, LayerParallelError, Pair, config_from_options, validate_pairs
from lp_fx.find_layers import layer_lists
from lp_fx.tools.files import write_json

log = logging.getLogger(__name__)

TENSORS = "trained.safetensors"
PAIRING = "pairing.json"
RECORD = "train.json"
FILES = (PAIRING, TENSORS, RECORD)
CURRENT = "current"
FORMAT = "lp_fx.finetuned/2"
LEGACY_FORMAT = "lp_fx.finetuned/1"  # files directly in the directory, no checksums
_VERSION = re.compile(r"^ckpt-step\d+-[A-Za-z0-9_]+$")
_TEMPORARY_LINK = re.compile(r"^\.lp_fx-link-[0-9a-f]+$")


class CheckpointError(LayerParallelError):
    """A checkpoint that cannot be used: missing, unreadable, corrupt, or made for another model."""


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
    (also a plan file: ``pairs``, ``modes``, ``num_layers``)."""
    signature = model_signature(model)
    return {
        "format": FORMAT,
        "pairs": [list(pair) for pair in pairs],
        "modes": list(modes),
        "num_layers": signature["num_layers"],
        "model": signature,
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


def sha256_of(tensor: torch.Tensor) -> str:
    """sha256 of the tensor's bytes as safetensors stores them (contiguous, little-endian)."""
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data).hexdigest()


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def tensor_records(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Name -> shape, dtype and sha256 of each tensor: the list ``pairing.json`` records."""
    return {
        name: {"shape": list(t.shape), "dtype": _dtype_name(t), "sha256": sha256_of(t)} for name, t in tensors.items()
    }


def save_checkpoint(
    directory: str | Path,
    tensors: Mapping[str, torch.Tensor],
    pairing: Mapping[str, Any],
    record: Mapping[str, Any],
) -> Path:
    """Write a complete checkpoint into ``directory`` all-or-nothing (see the module docstring);
    return the folder that holds its files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pairing = {**pairing, "model": {**pairing["model"], "tensors": tensor_records(tensors)}}
    folder = _write_version(directory, tensors, pairing, record)
    _point_current_to(directory, folder.name)  # the commit
    _fsync_directory(directory)
    _link_files(directory)
    _remove_stale(directory)
    return folder


def _write_version(
    directory: Path, tensors: Mapping[str, torch.Tensor], pairing: Mapping[str, Any], record: Mapping[str, Any]
) -> Path:
    """A new folder in ``directory`` with the three files, all on disk; nothing else is touched."""
    from safetensors.torch import save_file

    step = int(record.get("step", 0) or 0)
    folder = Path(tempfile.mkdtemp(dir=directory, prefix=f"ckpt-step{step:06d}-"))
    try:
        folder.chmod(0o755)
        write_json(folder / PAIRING, pairing)
        _write_file(
            folder / TENSORS,
            lambda path: save_file(dict(tensors), str(path), metadata={"format": FORMAT, "step": str(step)}),
        )
        write_json(folder / RECORD, record)
        _fsync_directory(folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def _write_file(path: Path, write: Callable[[Path], None]) -> None:
    write(path)
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_with_link(path: Path, target: str) -> None:
    """Make ``path`` a symlink to ``target`` with one rename (no moment without ``path``)."""
    tmp = path.parent / f".lp_fx-link-{os.urandom(6).hex()}"
    os.symlink(target, tmp)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _point_current_to(directory: Path, folder: str) -> None:
    _replace_with_link(directory / CURRENT, folder)


def _link_files(directory: Path) -> None:
    """``D/pairing.json -> current/pairing.json`` and the others (replacing a legacy checkpoint's
    files, after ``current`` made them unused)."""
    for name in FILES:
        target = f"{CURRENT}/{name}"
        path = directory / name
        if not (path.is_symlink() and os.readlink(path) == target):
            _replace_with_link(path, target)


def _remove_stale(directory: Path) -> None:
    """Remove the checkpoint folders ``current`` does not name, and leftover temporary links."""
    keep = os.readlink(directory / CURRENT)
    for entry in directory.iterdir():
        if _VERSION.match(entry.name) and entry.name != keep and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        elif _TEMPORARY_LINK.match(entry.name) and entry.is_symlink():
            entry.unlink(missing_ok=True)


def check_writable(directory: str | Path) -> Path:
    """Create ``directory`` if needed and check that files can be written there, before any work."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _probe_write(directory)
    except OSError as error:
        raise CheckpointError(f"cannot write to {directory}: {error.strerror or error}") from None
    return directory


def _probe_write(directory: Path) -> None:
    fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-check.")
    os.close(fd)
    os.unlink(probe)


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
    writable = directory
    while not writable.exists():
        writable = writable.parent
    if not writable.is_dir():
        raise CheckpointError(f"cannot create checkpoint directory {directory}: {writable} is a file")
    try:
        _probe_write(writable)
    except OSError as error:
        raise CheckpointError(f"cannot write to {writable}: {error.strerror or error}") from None
    return directory


def _refuse_other_contents(directory: Path, model: nn.Module | None) -> None:
    entries = sorted(entry.name for entry in directory.iterdir())
    if not entries:
        return
    replace = "give another directory, or --overwrite (overwrite=True) to replace it"
    if not (directory / CURRENT).is_symlink() and not (directory / PAIRING).exists():
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


def checkpoint_folder(directory: str | Path) -> Path:
    """The folder holding the files of the checkpoint in ``directory``: the one ``current``
    names, or ``directory`` itself for a checkpoint in the legacy layout."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint path {directory} is a file, not a checkpoint directory")
    current = directory / CURRENT
    if current.is_symlink():
        folder = directory / os.readlink(current)
        if not folder.is_dir():
            raise CheckpointError(f"{current} names {folder}, which is not a directory: the checkpoint is damaged")
        return folder
    return current if current.is_dir() else directory


def _read_bytes(path: Path, missing: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {missing}") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a directory, not a file: the checkpoint is damaged") from None
    except PermissionError:
        raise CheckpointError(f"{path} cannot be read: permission denied") from None
    except OSError as error:
        raise CheckpointError(f"{path} cannot be read: {error.strerror or error}") from None


def read_pairing(directory: str | Path) -> dict[str, Any]:
    """``pairing.json`` of a checkpoint, checked for the fields the loader needs."""
    return _read_pairing_in(checkpoint_folder(directory))


def _read_pairing_in(folder: Path) -> dict[str, Any]:
    path = folder / PAIRING
    text = _read_bytes(path, "not a checkpoint written by `lp-fx finetune`")
    try:
        pairing = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}): the checkpoint is corrupt") from None
    if not isinstance(pairing, dict) or pairing.get("format") not in (FORMAT, LEGACY_FORMAT):
        raise CheckpointError(
            f"{path}: not an lp_fx fine-tuning checkpoint (expected format {FORMAT!r} or {LEGACY_FORMAT!r})"
        )
    for key, kind in (("pairs", list), ("modes", list), ("num_layers", int), ("model", dict)):
        if not isinstance(pairing.get(key), kind):
            raise CheckpointError(f"{path}: field {key!r} is missing or not a {kind.__name__}")
    if not isinstance(pairing["model"].get("tensors"), dict):
        raise CheckpointError(f"{path}: field 'model.tensors' (the list of trained tensors) is missing or not an object")
    return pairing


def _check_same_model(model: nn.Module, pairing: Mapping[str, Any], folder: Path) -> None:
    """The checkpoint's model is this one, and its pairing is valid for it: the backend's rules
    for the options (types, consecutive, disjoint, modes) and every layer in range."""
    here = model_signature(model)
    difference = other_model(pairing["model"], here)
    if difference is None and pairing["num_layers"] != here["num_layers"]:
        difference = f"num_layers {pairing['num_layers']!r}, this model has {here['num_layers']!r}"
    if difference:
        raise CheckpointError(f"checkpoint {folder} was made for another model: {difference}")
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


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = folder / TENSORS
    data = _read_bytes(path, "the checkpoint has no trained tensors")
    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path} is not a valid safetensors file ({error}): the checkpoint is corrupt") from None


def _recorded_tensors(pairing: Mapping[str, Any], folder: Path) -> dict[str, dict[str, Any]]:
    """The tensor list of ``pairing.json``: name -> shape (and dtype, sha256 but in the legacy format)."""
    legacy = pairing["format"] == LEGACY_FORMAT
    keys = ("shape",) if legacy else ("shape", "dtype", "sha256")
    recorded = {}
    for name, entry in pairing["model"]["tensors"].items():
        entry = {"shape": entry} if legacy else entry
        if not isinstance(entry, dict) or any(key not in entry for key in keys):
            raise CheckpointError(
                f"{folder / PAIRING}: the entry of tensor {name!r} needs {', '.join(keys)}: the checkpoint is corrupt"
            )
        recorded[name] = entry
    if legacy:
        log.warning("%s has no checksums (format %s, written before them): its tensors are checked for names, "
                    "shapes and finite values only", folder, LEGACY_FORMAT)
    return recorded


def _check_tensors(model: nn.Module, pairing: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], folder: Path) -> None:
    """Every tensor is the one ``pairing.json`` lists (names, shape, dtype, checksum), finite,
    and fits this model."""
    path = folder / TENSORS
    recorded = _recorded_tensors(pairing, folder)
    for name in recorded:
        if name not in tensors:
            raise CheckpointError(f"{path} lacks tensor {name!r}, which {PAIRING} lists: the checkpoint is corrupt")
    state = model.state_dict()
    for name, tensor in tensors.items():
        entry = recorded.get(name)
        if entry is None:
            raise CheckpointError(f"{path} has tensor {name!r}, which {PAIRING} does not list: the checkpoint is corrupt")
        if list(tensor.shape) != entry["shape"] or entry.get("dtype", _dtype_name(tensor)) != _dtype_name(tensor):
            raise CheckpointError(
                f"{path}: tensor {name!r} is {_dtype_name(tensor)} {list(tensor.shape)}, {PAIRING} lists "
                f"{entry.get('dtype', '')} {entry['shape']}: the checkpoint is corrupt"
            )
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{path}: tensor {name!r} has {bad} non-finite values (NaN or inf): the checkpoint is corrupt")
        if "sha256" in entry and sha256_of(tensor) != entry["sha256"]:
            raise CheckpointError(
                f"{path}: tensor {name!r} does not match its sha256 in {PAIRING}: the file is corrupt or was changed"
            )
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
    list in ``pairing.json`` (names, shapes, dtypes, sha256) and for finite values — and any
    problem raises :class:`CheckpointError` naming the file, leaving ``model`` untouched.
    """
    folder = checkpoint_folder(directory)
    pairing = _read_pairing_in(folder)
    _check_same_model(model, pairing, folder)
    tensors = _read_tensors(folder)
    _check_tensors(model, pairing, tensors, folder)
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in tensors.items():
            state[name].copy_(tensor)
    return finetuned_options(pairing)


def finetuned_options(pairing: Mapping[str, Any]) -> dict[str, Any]:
    """Backend options for a checkpoint's pairing: its layer stack, its pairs and their modes."""
    return {
        "stack": pairing["model"]["stack"],
        "pairs": [tuple(pair) for pair in pairing["pairs"]],
        "modes": list(pairing["modes"]),
    }
