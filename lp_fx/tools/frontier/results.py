"""A frontier run's JSON: a new one, resuming one made with the same options on the same model (else
each difference named; a JSON written before the model's identity was recorded resumes with a
warning and records it), and the points it already holds."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lp_fx.tools.frontier.options import FrontierOptions

log = logging.getLogger(__name__)

VERSION = 1


def new_result(options: FrontierOptions, model: dict[str, str]) -> dict:
    """An empty result for the model of identity ``model`` (:func:`lp_fx.model_identity.model_identity`):
    ``plans`` by Δ, ``planner`` one record per planning (one gated graph each), ``points`` as measured,
    ``runs`` one record per invocation (wall time, load average)."""
    return {"version": VERSION, "options": options.to_json(), "model_identity": dict(model), "plans": {},
            "planner": [], "points": [], "runs": []}


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


def resume_result(path: Path, options: FrontierOptions, model: dict[str, str]) -> dict:
    """The results in ``path``, made with ``options`` (else an error naming each difference) on the
    model of identity ``model`` (else an error naming both)."""
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
    _check_same_model(path, result, model)
    return result


def _check_same_model(path: Path, result: dict, model: dict[str, str]) -> None:
    """The model of ``result`` is ``model``; a result that does not record one takes it, with a warning."""
    recorded = result.get("model_identity")
    if recorded is None:
        log.warning("--resume: %s does not record the identity of its model (written before it was recorded): "
                    "resuming without checking that this is the model it was measured on, and recording it", path)
        result["model_identity"] = dict(model)
    elif recorded != model:
        raise ValueError(
            f"--resume: {path} was measured on another model ({recorded.get('class')} with weights "
            f"{recorded.get('weights')}), this one is a {model['class']} with weights {model['weights']}; resume with "
            "the model it was measured on, or give another --out"
        )


def measured(result: dict) -> set[tuple[str, int]]:
    return {(point["variant"], point["delta"]) for point in result["points"]}


def find_point(result: dict, variant: str, delta: int) -> dict | None:
    return next((p for p in result["points"] if (p["variant"], p["delta"]) == (variant, delta)), None)
