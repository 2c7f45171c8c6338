"""The points of a frontier: the variants, the budgets Δ checked against the model, and the order
in which the points are measured."""

from __future__ import annotations

from collections.abc import Sequence

VARIANTS = ("contiguous", "planned", "finetuned")
TIMED = VARIANTS[:2]  # a fine-tuned pairing runs the planned pairing's graph: its speed is the planned one's
DEFAULT_BUDGETS = (2, 4, 6, 8, 10, 12, 14)
GATED_VARIANTS = ("baseline", "contiguous", "planned")  # perplexities from the gated graph (fine-tuning changes weights)


def check_budgets(budgets: Sequence[int], num_layers: int, contiguous_start: int) -> tuple[int, ...]:
    """The budgets, sorted; each an even Δ >= 2 whose Δ/2 disjoint pairs fit the model and whose
    contiguous range from ``contiguous_start`` ends inside it. Errors name what is valid."""
    if not budgets:
        raise ValueError("no budgets given; give even Δ values such as 2,4,6")
    repeated = sorted({delta for delta in budgets if list(budgets).count(delta) > 1})
    if repeated:
        raise ValueError(f"budget Δ={repeated[0]} is given more than once")
    most = num_layers - num_layers % 2
    for delta in budgets:
        if delta < 2 or delta % 2:
            raise ValueError(f"budget Δ={delta} is not valid: Δ counts the layers paired, 2 per pair; give an "
                             f"even Δ from 2 to {most}")
        if delta > num_layers:
            raise ValueError(f"budget Δ={delta} is more than the model's {num_layers} layers; give an even Δ "
                             f"from 2 to {most}")
        if contiguous_start + delta > num_layers:
            raise ValueError(
                f"budget Δ={delta}: the contiguous range {contiguous_start}:{contiguous_start + delta} ends past "
                f"the model's {num_layers} layers; from start {contiguous_start} Δ may be at most "
                f"{(num_layers - contiguous_start) // 2 * 2}, or give --contiguous-start <= {num_layers - delta}"
            )
    return tuple(sorted(budgets))


def ideal_speedup(num_layers: int, delta: int) -> float:
    """L / (L − Δ/2): time proportional to depth."""
    return num_layers / (num_layers - delta // 2)


def check_variants(variants: Sequence[str] | None, finetune_steps: int) -> tuple[str, ...]:
    """The variants to measure, in :data:`VARIANTS` order; by default every one (``finetuned`` only
    with fine-tuning steps). Errors name what is valid."""
    if variants is None:
        return VARIANTS if finetune_steps else VARIANTS[:2]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        raise ValueError(f"variants {', '.join(map(repr, unknown)) or '(none given)'}: give some of {', '.join(VARIANTS)}")
    if "finetuned" in variants and not finetune_steps:
        raise ValueError("the finetuned variant needs fine-tuning steps: give --finetune-steps N (N >= 1)")
    return tuple(variant for variant in VARIANTS if variant in variants)


def point_keys(budgets: Sequence[int], variants: Sequence[str]) -> list[tuple[str, int]]:
    """``(variant, Δ)`` of every point, in the order measured: the baseline (every retention and
    ratio is relative to it), then each budget's ``variants``."""
    return [("baseline", 0), *((variant, delta) for delta in budgets for variant in variants)]
