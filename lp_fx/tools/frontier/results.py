"""A frontier run's JSON: a new one, resuming one made with the same options (else each difference
named), and the points it already holds."""

from __future__ import annotations

import json
from pathlib import Path

from lp_fx.tools.frontier.options import FrontierOptions

VERSION = 1


def new_result(options: FrontierOptions) -> dict:
    """An empty result: ``plans`` by Δ, ``planner`` one record per planning (one gated graph each),
    ``points`` as measured, ``runs`` one record per invocation (wall time, load average)."""
    return {"version": VERSION, "options": options.to_json(), "plans": {}, "planner": [], "points": [], "runs": []}


def option_differences(stored: dict, current: dict) -> list[str]:
    """``name: stored -> current`` for every option that differs."""
    return [
        f"{key}: {stored.get(key)!r} -> {current.get(key)!r}"
        for key in sorted(set(stored) | set(current))
        if stored.get(key) != current.get(key)
    ]


def option_defaults() -> dict:
    """Each option's default, as JSON: what a record made before the option existed was measured with."""
    return FrontierOptions.defaults_json()


def resume_result(path: Path, options: FrontierOptions) -> dict:
    """The results in ``path``, made with ``options`` (else an error naming each difference)."""
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"--resume: cannot read {path} ({error})") from None
    if not isinstance(result, dict) or result.get("version") != VERSION or "options" not in result:
        raise ValueError(f"--resume: {path} is not a frontier JSON of version {VERSION}")
    differences = option_differences({**option_defaults(), **result["options"]}, options.to_json())
    if differences:
        raise ValueError(f"--resume: {path} was made with other options ({'; '.join(differences)}); run with the "
                         "options it was made with, or give another --out")
    return result


def measured(result: dict) -> set[tuple[str, int]]:
    return {(point["variant"], point["delta"]) for point in result["points"]}


def find_point(result: dict, variant: str, delta: int) -> dict | None:
    return next((p for p in result["points"] if (p["variant"], p["delta"]) == (variant, delta)), None)
