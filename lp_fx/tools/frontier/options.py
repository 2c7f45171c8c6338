"""The options a frontier run's numbers depend on (the budgets aside): a resumed JSON must match them."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lp_fx.tools.planning import search as planner


@dataclass(frozen=True)
class FrontierOptions:
    """Everything a point's numbers depend on (the budgets aside): a resumed JSON must match it."""

    model: str
    num_layers: int
    contiguous_start: int
    window: int = 512
    ppl_windows: int = 16
    tasks: tuple[str, ...] = ()
    limit: int | None = 500
    seed: int = 1234
    batch_size: int = 8
    inner: str = "eager"
    plan_modes: tuple[str, ...] = ("lp", "block")
    calib_windows: int = 4
    screen_windows: int = 2
    refine: int = 3
    passes: int = 2
    race_margin: float | None = planner.RACE_MARGIN  # see lp_fx.tools.planning.search.RacedMeasure; None: no racing
    finetune_steps: int = 0
    finetune_train: str = "paired"  # what fine-tuning trains: the paired layers, or "all" parameters
    speed_inner: str = "inductor"
    speed_tokens: int = 32
    speed_rounds: int = 5
    llamacpp: bool = False

    def to_json(self) -> dict:
        return as_json(asdict(self))


def as_json(options: dict) -> dict:
    """Options with tuples as lists, as JSON stores them."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in options.items()}
