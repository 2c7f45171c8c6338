"""The planner's search settings, one declaration for ``lp-fx plan``, ``lp-fx frontier`` (which
embeds them), :func:`lp_fx.tools.planning.search.make_plan` and the records they write."""

from __future__ import annotations

from dataclasses import dataclass

from lp_fx.config import PAIRING_MODES
from lp_fx.tools.options import names_from, non_negative_float, non_negative_int, option, positive_int

MODES = PAIRING_MODES  # the planner gates the modes in which both layers run
parse_modes = names_from(MODES)  # comma-separated pairing modes, each one of MODES, each once


@dataclass(frozen=True)
class SearchOptions:
    """How the planner searches (see :mod:`lp_fx.tools.planning.search`)."""

    calib_windows: int = option(4, parse=positive_int)
    """windows from the first half of WikiText-2 on which each set of pairs is scored"""
    screen_windows: int = option(2, parse=positive_int)
    """windows (from the same half) on which single pairs are scored to rank them"""
    modes: tuple[str, ...] = option(("lp", "block"), parse=parse_modes, metavar="MODES")
    """modes to consider per pair: lp, block or lp,block"""
    refine: int = option(3, parse=positive_int)
    """cheapest candidates (alone) tried with the chosen pairs at each step (growing and swapping)"""
    passes: int = option(2, parse=non_negative_int)
    """rounds of swapping each chosen pair for a better one (0: grow only)"""
    race_margin: float = option(0.01, parse=non_negative_float, exclusive="race")
    """score each step's trial sets on the screen's windows first and drop those more than this (relative
    perplexity) above the best there before the other windows"""
    no_race: bool = option(False, exclusive="race")
    """score every trial set on every window (no racing)"""

    @property
    def margin(self) -> float | None:
        """The race margin, or None (no racing)."""
        return None if self.no_race else self.race_margin
