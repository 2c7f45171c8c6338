"""The suite's pytest-xdist workers and the gloo ranks a test spawns take turns on the cores.

Spawned ranks keep every core busy. Run beside another worker's tests, three or more busy processes
time-sliced the 2 cores and the suite took 1201 s, against 177 s for the gloo modules alone plus 508 s
for the rest alone. So while ranks run no other test runs: a test holds the shared lock; spawning
ranks takes it exclusively, after announcing itself on a second lock so that the workers' next tests
wait instead of starving it (``fcntl.flock``; one pair of files per test run, in pytest's base
temporary folder that the workers share).
"""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path
from typing import IO, Iterator


class CoresLock:
    """Shared for a test, exclusive while ranks run; across the worker processes of one test run.
    One object per process: a process that holds it shared and asks for it alone converts its own
    lock (``flock`` on the same file) instead of waiting for itself, and holds nothing once alone ends."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._wanted: IO = open(folder / "ranks_wanted.lock", "a+")
        self._running: IO = open(folder / "running.lock", "a+")

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        """An ordinary test: waits while ranks run or wait to run."""
        fcntl.flock(self._wanted, fcntl.LOCK_SH)
        fcntl.flock(self._wanted, fcntl.LOCK_UN)
        fcntl.flock(self._running, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(self._running, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def alone(self) -> Iterator[None]:
        """Spawned ranks: once the tests running now have finished, nothing else runs."""
        fcntl.flock(self._wanted, fcntl.LOCK_EX)
        try:
            fcntl.flock(self._running, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._running, fcntl.LOCK_UN)
        finally:
            fcntl.flock(self._wanted, fcntl.LOCK_UN)
