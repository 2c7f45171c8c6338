"""The one way the tools write a JSON file: whole or not at all.

The payload goes to a temporary file in the same folder, is flushed to disk, and replaces the
target with one rename, so a reader (or a run interrupted mid-write) sees the old file or the new
one, never half of one. Missing folders are created.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_json(path: str | Path, payload: Any, indent: int = 2) -> Path:
    """Write ``payload`` as JSON to ``path`` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(payload, indent=indent, default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
