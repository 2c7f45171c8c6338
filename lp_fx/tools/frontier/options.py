"""The options a frontier run's numbers depend on (the budgets aside): a resumed JSON must match them."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from lp_fx.tools.planning.options import SearchOptions


@dataclass(frozen=True)
class FrontierOptions:
    """Everything a point's numbers depend on, as the JSON records it. A default is what a record
    made before its option existed was measured with, so some differ from the command line's."""

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
    search: SearchOptions = field(default_factory=SearchOptions)  # the planner's, recorded flat (search_record)
    finetune_steps: int = 0
    finetune_train: str = "paired"  # what fine-tuning trains: the paired layers, or "all" parameters
    speed_inner: str = "inductor"
    speed_tokens: int = 32
    speed_rounds: int = 5
    llamacpp: bool = False

    def to_json(self) -> dict:
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "search"}
        return as_json({**own, **search_record(self.search)})

    @classmethod
    def from_json(cls, record: dict) -> FrontierOptions:
        """The options a JSON records (:meth:`to_json`'s inverse)."""
        own = {key: tuple(value) if isinstance(value, list) else value for key, value in record.items()
               if key not in SEARCH_NAMES}
        margin = record.get("race_margin", SearchOptions.race_margin)
        search = SearchOptions(modes=tuple(record.get("plan_modes", SearchOptions.modes)), no_race=margin is None,
                               race_margin=SearchOptions.race_margin if margin is None else margin,
                               **{name: record[name] for name in ("calib_windows", "screen_windows", "refine", "passes")
                                  if name in record})
        return cls(**own, search=search)

    @classmethod
    def defaults_json(cls) -> dict:
        """Each option's default, as JSON (the model and its layers have none)."""
        own = {f.name: f.default for f in fields(cls) if f.default is not MISSING}
        return as_json({**own, **search_record(SearchOptions())})


def search_record(search: SearchOptions) -> dict[str, Any]:
    """The planner's options under the names a frontier JSON gives them."""
    return {"plan_modes": search.modes, "calib_windows": search.calib_windows, "screen_windows": search.screen_windows,
            "refine": search.refine, "passes": search.passes, "race_margin": search.margin}


SEARCH_NAMES = tuple(search_record(SearchOptions()))


def as_json(options: dict) -> dict:
    """Options with tuples as lists, as JSON stores them."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in options.items()}
