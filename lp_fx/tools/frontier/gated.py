"""The perplexities of a frontier's baseline, contiguous and planned points from the planner's gated
graph, run lazily, window by window, before anything else is compiled (a ``torch._dynamo.reset``
would make it compile again).

On each window a pairing is computed from the first layer where it differs from the unpaired model
or from the previous pairing of its variant on that window, whose values are kept until the next
window: the layers before a budget's first new pair run once for all budgets, and what is kept is
one window's values. Each point is checked: its calibration perplexity through the gated graph must
equal its plain compile's (the plain compiles share one Dynamo trace,
:class:`lp_fx.tools.evaluation.compiled.PairingSwitch`)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from lp_fx.pairing import Pairing
from lp_fx.tools.evaluation.compiled import PairingSwitch
from lp_fx.tools.evaluation.scoring import Perplexity, perplexity
from lp_fx.tools.planning import search as planner
from lp_fx.tools.planning.scorers import GatedScorer

CALIB = "calib"
Key = tuple[str, int]  # (variant, Δ)


def gated_points(
    scorer: GatedScorer, model: torch.nn.Module, pairings: dict[Key, Pairing], windows: dict[str, torch.Tensor],
    calib: torch.Tensor, inner: str, progress: bool = True,
) -> dict[Key, tuple[dict[str, Perplexity], dict]]:
    """Per point: its perplexities on ``windows`` and ``calib`` through the gated graph, and the
    record of its check against its plain compile (:func:`check_gated`)."""
    every = {**windows, CALIB: calib}
    nll, seconds = _gated_nll(scorer, pairings, every, progress)
    plain = PairingSwitch(model, inner)
    out = {}
    for key, pairing in pairings.items():
        began = time.monotonic()
        gated = {name: Perplexity.of(nll[key][name], rows) for name, rows in every.items()}
        plain.set_pairing(pairing)
        plain_ppl = perplexity(plain.logits, calib, progress=False).ppl
        check = check_gated(pairing.name, gated[CALIB].ppl, plain_ppl)
        out[key] = (gated, {**check, "seconds": round(seconds[key] + time.monotonic() - began, 1)})
    return out


def _gated_nll(
    scorer: GatedScorer, pairings: dict[Key, Pairing], windows: dict[str, torch.Tensor], progress: bool
) -> tuple[dict[Key, dict[str, float]], dict[Key, float]]:
    """``(NLL summed over each set of windows, seconds)`` of each point, window by window."""
    keys: Sequence[Key] = list(pairings)
    nll = {key: dict.fromkeys(windows, 0.0) for key in keys}
    seconds = dict.fromkeys(keys, 0.0)
    every_window = [(name, row) for name, rows in windows.items() for row in rows]
    for name, row in tqdm(every_window, desc="perplexity windows (gated graph)", disable=not progress):
        previous: dict[str, Pairing] = {}
        for key in keys:
            began = time.monotonic()
            nll[key][name] += scorer.window_nll(pairings[key], row)
            previous[key[0]] = pairings[key]
            scorer.keep_only(list(previous.values()))
            seconds[key] += time.monotonic() - began
        scorer.forget()  # one window's values at a time: the memory of a window, not of every window
    return nll, seconds


def check_gated(name: str, gated: float, plain: float) -> dict:
    """The record of a point's check: the gated graph's calibration perplexity against its plain
    compile's; an error when they differ by more than :data:`lp_fx.tools.planning.search.PLAIN_TOLERANCE`."""
    if abs(gated - plain) > planner.PLAIN_TOLERANCE * plain:
        raise ValueError(
            f"{name}: the gated graph's calibration perplexity, {gated:.4f}, differs from the plain compile's, "
            f"{plain:.4f}, by more than {planner.PLAIN_TOLERANCE:.1%}; its held-out perplexities cannot be trusted"
        )
    return {"windows": CALIB, "gated_ppl": gated, "plain_ppl": plain}
