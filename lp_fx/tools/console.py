"""What the command line shows its user: the one place tool commands write to standard output,
and the one line a refused command writes to standard error.

Library code logs (``logging``); a command's results (tables, "wrote PATH") are the command's
output, written here so that they are not mixed into the library's log stream.
"""

from __future__ import annotations

import sys


def say(text: object = "") -> None:
    """One block of the command's output on standard output, flushed (a long run shows it at once)."""
    sys.stdout.write(f"{text}\n")
    sys.stdout.flush()


# What a refused argument raises: LayerParallelError is a ValueError, data.DataError an OSError
# (as is a path that cannot be read).
ERRORS = (OSError, ValueError)


def refuse(program: str, error: BaseException) -> int:
    """Report a refused command as ``PROGRAM: error: REASON`` on one line of standard error (a
    reason of several lines, as some libraries give, joined); its exit status, 2."""
    reason = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    sys.stderr.write(f"{program}: error: {reason}\n")
    return 2
