"""Command-line value types shared by the ``lp-fx`` commands and ``python -m lp_fx.tools.cli.bench``.

A count of 0 or a negative learning rate is refused while the command line is parsed, before a
model is loaded, with one line that names the option and what it accepts.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number ``>= minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give an integer >= {minimum}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is not valid; give an integer >= {minimum}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def finite_float(check: Callable[[float], bool], what: str) -> Callable[[str], float]:
    """An argparse ``type``: a finite number for which ``check`` holds, ``what`` saying which."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; give {what}") from None
        if not math.isfinite(value) or not check(value):
            raise argparse.ArgumentTypeError(f"{text} is not valid; give {what}")
        return value

    parse.__name__ = what
    return parse


positive_float = finite_float(lambda value: value > 0, "a finite number > 0")
non_negative_float = finite_float(lambda value: value >= 0, "a finite number >= 0")


def index_list(text: str) -> list[int]:
    """An argparse ``type``: comma-separated layer indices or counts (integers >= 0), e.g. ``2,6,10``."""
    try:
        return [non_negative_int(item) for item in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not valid; give comma-separated integers >= 0, e.g. 2,6,10"
        ) from None


class OneLineParser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` whose errors are one line (rc 2), like every other
    ``lp-fx`` error; ``--help`` still shows the usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
