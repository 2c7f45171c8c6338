"""A fine-tuning checkpoint's files: written all-or-nothing, read back verified.

A checkpoint directory ``D`` holds one complete checkpoint in a folder of its own, and a link
``D/current`` that names that folder::

    D/current -> ckpt-step000020-k3j9x1q2
    D/ckpt-step000020-k3j9x1q2/trained.safetensors   the trained tensors only, named as in state_dict()
    D/ckpt-step000020-k3j9x1q2/pairing.json          pairs, modes, layer stack, the model's shape,
                                                     and name, shape, dtype and sha256 of each tensor
    D/ckpt-step000020-k3j9x1q2/train.json            what the run was asked for and what it measured
    D/pairing.json -> current/pairing.json           (and the two others: links, to read by hand;
                                                     pairing.json is also a plan file)

A LoRA checkpoint (``lp-fx finetune --lora``) holds peft's two adapter files in place of
``trained.safetensors``: ``adapter_model.safetensors`` (listed in ``pairing.json`` as the trained
tensors are) and ``adapter_config.json``, linked from ``D`` too, so that ``D`` is also an adapter
directory peft reads (:mod:`lp_fx.adapter`).

Saving writes the three files into a new folder, fsyncs them and the folder, then switches
``D/current`` to it with one ``rename`` of a new link over the old one: the only step that changes
what ``D`` holds, and rename is atomic. Interrupted before it, ``current`` still names the previous
folder, which nothing has touched; after it, the new folder is complete. So a load always sees
one whole checkpoint, never files of two. Folders no longer named by ``current`` (replaced ones,
or one an interrupted save left half-written) are removed by the next save.

A run holds ``D`` while it writes there (:func:`hold_checkpoint_dir`: an ``flock`` on
``D/.lp_fx-finetune.lock``, which the kernel releases when the process ends, however it ends), so
a second run into ``D`` is refused instead of replacing the first one's checkpoints unseen.

A directory copied without its links (``rsync -r`` without ``-l``: the version folder survives,
``current`` and the links do not) loads its one complete version folder, with a warning.

A checkpoint written before this layout (format ``lp_fx.finetuned/1``: the three files directly in
``D``, no checksums) still loads: its tensor names, shapes and values are checked, and a warning
says it has no checksums. What the files say about the model is checked against a model by
:mod:`lp_fx.checkpoint`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from lp_fx.errors import LayerParallelError
from lp_fx.files import read_bytes, read_json, write_json

log = logging.getLogger(__name__)

TENSORS = "trained.safetensors"
PAIRING = "pairing.json"
RECORD = "train.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_TENSORS = "adapter_model.safetensors"
FILES = (PAIRING, TENSORS, RECORD, ADAPTER_CONFIG, ADAPTER_TENSORS)  # what D links to, when current has it
CURRENT = "current"
LOCK = ".lp_fx-finetune.lock"  # held by the run writing in the directory (hold_checkpoint_dir)
FORMAT = "lp_fx.finetuned/2"
LEGACY_FORMAT = "lp_fx.finetuned/1"  # files directly in the directory, no checksums
_VERSION = re.compile(r"^ckpt-step\d+-[A-Za-z0-9_]+$")
_TEMPORARY_LINK = re.compile(r"^\.lp_fx-link-[0-9a-f]+$")


class CheckpointError(LayerParallelError):
    """A checkpoint that cannot be used: missing, unreadable, corrupt, or made for another model."""


# ---------------------------------------------------------------------------------------- write


def sha256_of(tensor: torch.Tensor) -> str:
    """sha256 of the tensor's bytes as safetensors stores them (contiguous, little-endian)."""
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data).hexdigest()


def dtype_name(tensor: torch.Tensor) -> str:
    """The tensor's dtype as ``pairing.json`` records it (``float32``)."""
    return str(tensor.dtype).removeprefix("torch.")


def tensor_records(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Name -> shape, dtype and sha256 of each tensor: the list ``pairing.json`` records."""
    return {
        name: {"shape": list(t.shape), "dtype": dtype_name(t), "sha256": sha256_of(t)} for name, t in tensors.items()
    }


def save_checkpoint(
    directory: str | Path,
    tensors: Mapping[str, torch.Tensor],
    pairing: Mapping[str, Any],
    record: Mapping[str, Any],
    adapter_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint into ``directory`` all-or-nothing (see the module docstring);
    return the folder that holds its files. With ``adapter_config`` (peft's, as JSON), ``tensors``
    are a LoRA adapter's, written as peft writes them, and ``pairing`` records the adapter."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pairing = {**pairing, "model": {**pairing["model"], "tensors": tensor_records(tensors)}}
    folder = _write_version(directory, tensors, pairing, record, adapter_config)
    _replace_with_link(directory / CURRENT, folder.name)  # the commit
    _fsync_directory(directory)
    _link_files(directory)
    _remove_stale(directory)
    return folder


def _write_version(
    directory: Path,
    tensors: Mapping[str, torch.Tensor],
    pairing: Mapping[str, Any],
    record: Mapping[str, Any],
    adapter_config: Mapping[str, Any] | None,
) -> Path:
    """A new folder in ``directory`` with the checkpoint's files, all on disk; nothing else is touched."""
    from safetensors.torch import save_file  # lazy: only reading or writing a checkpoint needs safetensors

    step = int(record.get("step", 0) or 0)
    folder = Path(tempfile.mkdtemp(dir=directory, prefix=f"ckpt-step{step:06d}-"))
    try:
        folder.chmod(0o755)
        write_json(folder / PAIRING, pairing)
        if adapter_config is not None:
            write_json(folder / ADAPTER_CONFIG, adapter_config)
        tensor_file = folder / tensors_file(pairing)
        save_file(dict(tensors), str(tensor_file), metadata={"format": "pt" if adapter_config else FORMAT, "step": str(step)})
        with open(tensor_file, "rb") as handle:
            os.fsync(handle.fileno())
        write_json(folder / RECORD, record)
        _fsync_directory(folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


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


def _link_files(directory: Path) -> None:
    """``D/pairing.json -> current/pairing.json`` and the others ``current`` holds (replacing a
    legacy checkpoint's files, after ``current`` made them unused); a link to a file ``current``
    does not hold (a full checkpoint replaced by a LoRA one) is removed."""
    for name in FILES:
        target = f"{CURRENT}/{name}"
        path = directory / name
        if not (directory / CURRENT / name).exists():
            if path.is_symlink() and os.readlink(path) == target:
                path.unlink()
        elif not (path.is_symlink() and os.readlink(path) == target):
            _replace_with_link(path, target)


def _remove_stale(directory: Path) -> None:
    """Remove the checkpoint folders ``current`` does not name, and leftover temporary links."""
    keep = os.readlink(directory / CURRENT)
    for entry in directory.iterdir():
        if _VERSION.match(entry.name) and entry.name != keep and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        elif _TEMPORARY_LINK.match(entry.name) and entry.is_symlink():
            entry.unlink(missing_ok=True)


@contextlib.contextmanager
def hold_checkpoint_dir(directory: str | Path) -> Iterator[Path]:
    """Hold ``directory`` for the run writing its checkpoints there, or refuse at once when another
    run holds it. Made if missing, and removed again (with the folders made above it) if the run
    leaves it empty; the lock file is removed when the run ends, and one left by a killed run holds
    nothing (the kernel dropped its lock)."""
    directory = Path(directory)
    made = [folder for folder in (directory, *directory.parents) if not folder.exists()]  # deepest first
    fd = _locked(directory)
    try:
        yield directory
    finally:
        (directory / LOCK).unlink(missing_ok=True)  # while still held: a run that opened it meanwhile is refused
        os.close(fd)
        _remove_empty(made)


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders``, deepest first, up to the first that is not empty (nothing was saved there)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _locked(directory: Path) -> int:
    """A descriptor of ``directory``'s lock file, locked by this process (its pid written in it)."""
    path = directory / LOCK
    while True:
        directory.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the directory was removed by a run that ended meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise CheckpointError(
                f"{directory} is held by another fine-tuning run (process {holder}) writing its checkpoints there; "
                "wait for it to end, or give another directory"
            ) from None
        if _same_file(fd, path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)  # locked a file its run removed when it ended: lock the one at the path now


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


# ----------------------------------------------------------------------------------------- read


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
    if current.is_dir():
        return current
    if (directory / PAIRING).exists():
        return directory
    return _only_version(directory)


def complete_versions(directory: Path) -> list[Path]:
    """The checkpoint folders in ``directory`` that hold every file, by name: the pairing, the
    record, and the trained tensors or an adapter's two files."""
    return sorted(entry for entry in directory.iterdir() if _VERSION.match(entry.name) and _is_complete(entry))


def _is_complete(folder: Path) -> bool:
    def has(*names: str) -> bool:
        return all((folder / name).is_file() for name in names)

    return folder.is_dir() and has(PAIRING, RECORD) and (has(TENSORS) or has(ADAPTER_CONFIG, ADAPTER_TENSORS))


def tensors_file(pairing: Mapping[str, Any]) -> str:
    """The file of a checkpoint's tensors: the adapter's for a LoRA checkpoint, else the trained ones."""
    return ADAPTER_TENSORS if "adapter" in pairing else TENSORS


def _only_version(directory: Path) -> Path:
    """The one complete checkpoint folder of a directory copied without its links (``current`` and
    the files beside it), as ``rsync -r`` without ``-l`` copies; several are refused, naming them."""
    versions = complete_versions(directory)
    if not versions:
        return directory  # not a checkpoint: reading its pairing.json says so
    if len(versions) > 1:
        raise CheckpointError(
            f"{directory} has no {CURRENT} link (copied without symlinks?) and {len(versions)} complete checkpoints: "
            f"{', '.join(v.name for v in versions)}; give one of them as the checkpoint directory, or link the one "
            f"to load: ln -s NAME {directory / CURRENT}"
        )
    log.warning("%s has no %s link (copied without symlinks?): loading its one complete checkpoint %s; "
                "ln -s %s %s restores the link", directory, CURRENT, versions[0].name, versions[0].name, directory / CURRENT)
    return versions[0]


def _read_bytes(path: Path, missing: str) -> bytes:
    return read_bytes(path, CheckpointError, missing=f"{path} is missing: {missing}",
                      folder=f"{path} is a directory, not a file: the checkpoint is damaged",
                      unreadable=f"{path} cannot be read")


def read_pairing(directory: str | Path) -> dict[str, Any]:
    """``pairing.json`` of a checkpoint, checked for the fields the loader needs."""
    return read_pairing_in(checkpoint_folder(directory))


def read_pairing_in(folder: Path) -> dict[str, Any]:
    """``pairing.json`` in a checkpoint's own folder (:func:`checkpoint_folder`), checked."""
    path = folder / PAIRING
    pairing = read_json(path, CheckpointError, missing=f"{path} is missing: not a checkpoint written by `lp-fx finetune`",
                        folder=f"{path} is a directory, not a file: the checkpoint is damaged",
                        unreadable=f"{path} cannot be read", invalid=f"{path} is not valid JSON ({{reason}}): the checkpoint is corrupt")
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


def read_tensors(folder: Path, pairing: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The trained tensors in ``folder``, each the one ``pairing.json`` lists (names, shape, dtype,
    sha256) and finite; any difference raises :class:`CheckpointError` naming the tensor."""
    from safetensors import SafetensorError  # lazy: only reading or writing a checkpoint needs safetensors
    from safetensors.torch import load  # lazy: only reading or writing a checkpoint needs safetensors

    path = folder / tensors_file(pairing)
    data = _read_bytes(path, "the checkpoint has no trained tensors")
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path} is not a valid safetensors file ({error}): the checkpoint is corrupt") from None
    recorded = _recorded_tensors(pairing, folder)
    for name in recorded:
        if name not in tensors:
            raise CheckpointError(f"{path} lacks tensor {name!r}, which {PAIRING} lists: the checkpoint is corrupt")
    for name, tensor in tensors.items():
        if name not in recorded:
            raise CheckpointError(f"{path} has tensor {name!r}, which {PAIRING} does not list: the checkpoint is corrupt")
        _check_recorded(path, name, tensor, recorded[name])
    return tensors


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


def _check_recorded(path: Path, name: str, tensor: torch.Tensor, entry: Mapping[str, Any]) -> None:
    """The tensor has the shape, dtype and sha256 of its entry in ``pairing.json``, and finite values."""
    if list(tensor.shape) != entry["shape"] or entry.get("dtype", dtype_name(tensor)) != dtype_name(tensor):
        raise CheckpointError(
            f"{path}: tensor {name!r} is {dtype_name(tensor)} {list(tensor.shape)}, {PAIRING} lists "
            f"{entry.get('dtype', '')} {entry['shape']}: the checkpoint is corrupt"
        )
    if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(f"{path}: tensor {name!r} has {bad} non-finite values (NaN or inf): the checkpoint is corrupt")
    if "sha256" in entry and sha256_of(tensor) != entry["sha256"]:
        raise CheckpointError(
            f"{path}: tensor {name!r} does not match its sha256 in {PAIRING}: the file is corrupt or was changed"
        )
