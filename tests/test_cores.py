"""The lock that keeps other tests off the cores while gloo ranks run (tests/cores.py)."""

import fcntl
import threading
import time
from pathlib import Path

from .cores import CoresLock


def _wait_until_taken_alone(path: Path, timeout: float = 10.0) -> None:
    with open(path, "a+") as probe:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            fcntl.flock(probe, fcntl.LOCK_UN)
            time.sleep(0.01)
    raise AssertionError(f"{path.name} was not taken alone within {timeout} s")


def test_ranks_wait_for_the_running_test_and_the_next_test_waits_for_the_ranks(tmp_path):
    worker, other_worker = CoresLock(tmp_path), CoresLock(tmp_path)  # two files opened: two holders
    order = []

    def spawn_ranks() -> None:
        with other_worker.alone():
            order.append("ranks")
            time.sleep(0.2)

    ranks = threading.Thread(target=spawn_ranks)
    with worker.shared():
        ranks.start()
        _wait_until_taken_alone(tmp_path / "ranks_wanted.lock")  # the ranks are waiting for this test
        time.sleep(0.1)
        order.append("test")
    with worker.shared():
        order.append("next test")
    ranks.join()
    assert order == ["test", "ranks", "next test"]


def test_a_process_holding_the_lock_shared_can_take_it_alone(tmp_path):
    cores = CoresLock(tmp_path)
    with cores.shared(), cores.alone():
        pass
