"""The one way the package writes a file: whole or not at all, after checking up front that it can be.

The content goes to a temporary file in the same folder, is flushed to disk, and replaces the
target with one rename, so a reader (or a run interrupted mid-write) sees the old file or the new
one, never half of one. Missing folders are created then, when there is something to write; the
checks before the work (:func:`check_files_writable`) create nothing, so a refusal leaves no trace.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# A temporary file or folder nothing has written to for this long was left by a killed writer
# (SIGKILL, power loss: no chance to remove it), not one still at work.
STALE_TEMPORARY_S = 3600.0


class OutputError(ValueError):
    """An output path that cannot be written, found before any work."""


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
    return path


def temporary_name(path: str | Path) -> re.Pattern:
    """The names of ``path``'s temporary files and folders, ``.NAME.<8 random characters>.tmp``, as
    :func:`atomic_write` (``mkstemp``) and ``mkdtemp`` make them with that prefix and suffix (8 of
    ``[a-z0-9_]`` between)."""
    return re.compile(re.escape(f".{Path(path).name}.") + r"[a-z0-9_]{8}" + re.escape(".tmp"))


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporary files and folders of ``path`` (:func:`temporary_name`) that nothing has
    written to for :data:`STALE_TEMPORARY_S`, left by writers killed before they could remove them;
    recent ones may belong to a writer still at work and stay. Returns those removed."""
    path = Path(path)
    pattern = temporary_name(path)
    removed: list[Path] = []
    if not path.parent.is_dir():
        return removed
    for leftover in (p for p in path.parent.iterdir() if pattern.fullmatch(p.name)):
        try:
            if time.time() - _last_written(leftover) <= STALE_TEMPORARY_S:
                continue
        except FileNotFoundError:  # renamed into place or removed by its writer since the listing
            continue
        log.info("removing %s, left by a write of %s that did not finish", leftover, path.name)
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed


def _last_written(path: Path) -> float:
    """The newest modification time of ``path`` and, for a folder, of everything in it (a file
    being written into a folder changes its own time, not the folder's)."""
    times = [path.lstat().st_mtime]
    for folder, folders, files in os.walk(path):  # no walk for a file; a folder gone meanwhile is skipped
        for name in folders + files:
            with contextlib.suppress(FileNotFoundError):
                times.append(os.lstat(os.path.join(folder, name)).st_mtime)
    return max(times)


def current_umask() -> int:
    """The process's umask (there is no call that only reads it: it is set and set back)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def give_default_permissions(folder: str | Path) -> None:
    """``folder`` and everything in it with the modes ``mkdir`` and ``open`` give (0o777 and 0o666
    less the umask: 0755 and 0644 under the usual 022). ``mkdtemp`` makes a folder 0700, and some
    writers (safetensors) make files 0600: right for a temporary name, not for the published output."""
    mask = current_umask()
    for root, _, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def write_json(path: str | Path, payload: Any, indent: int = 2) -> Path:
    """Write ``payload`` as JSON to ``path`` atomically; returns the path."""
    text = json.dumps(payload, indent=indent, default=str) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def check_folder_writable(folder: str | Path, error: type[Exception] = OutputError) -> Path:
    """Check, creating nothing, that files can be written in ``folder`` or, when it does not exist
    yet, in the nearest folder above it that does (a probe file is made and removed there); return
    that folder. A failure raises ``error`` naming it."""
    folder = Path(folder)
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    if not existing.is_dir():
        raise error(f"cannot write to {existing}: it is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-check.")
    except OSError as failure:
        raise error(f"cannot write to {existing}: {failure.strerror or failure}") from None
    os.close(fd)
    os.unlink(probe)
    return existing


def check_files_writable(*paths: str | Path) -> None:
    """Check, before the work starts and creating nothing, that each of ``paths`` can be written
    as a file: not a directory, and its folder writable (:func:`check_folder_writable`)."""
    for path in map(Path, paths):
        if path.is_dir():
            raise OutputError(f"{path} is a directory; give a file name")
        check_folder_writable(path.parent)


def read_bytes(path: Path, error: type[Exception], missing: str, folder: str, unreadable: str) -> bytes:
    """The bytes of ``path``, or one ``error``: ``missing`` when there is no such file, ``folder``
    when it is a directory, ``unreadable: <the system's reason>`` otherwise (plans and checkpoints
    read their files through this)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise error(missing) from None
    except IsADirectoryError:
        raise error(folder) from None
    except OSError as reason:
        raise error(f"{unreadable}: {reason.strerror or reason}") from None


def read_json(path: Path, error: type[Exception], missing: str, folder: str, unreadable: str, invalid: str) -> Any:
    """The JSON value in ``path``, or one ``error``: as :func:`read_bytes`, and ``invalid`` (its
    ``{reason}`` the parser's) when the bytes are not JSON."""
    text = read_bytes(path, error, missing=missing, folder=folder, unreadable=unreadable)
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as reason:
        raise error(invalid.format(reason=reason)) from None
