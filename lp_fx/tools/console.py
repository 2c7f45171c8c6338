"""What the command line shows its user: the one place tool commands write to standard output.

Library code logs (``logging``); a command's results (tables, "wrote PATH") are the command's
output, written here so that they are not mixed into the library's log stream.
"""

from __future__ import annotations

import sys


def say(text: object = "") -> None:
    """One block of the command's output on standard output, flushed (a long run shows it at once)."""
    sys.stdout.write(f"{text}\n")
    sys.stdout.flush()
