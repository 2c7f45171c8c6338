"""Backend options -> a validated :class:`LPConfig`, the one place the options are declared,
documented and given their defaults; and plan files.

Every check here is about the options alone; what depends on the model (a pair past the last
layer, a plan made for another layer count, a post-norm layer) is checked when a graph arrives
(:mod:`lp_fx.choose`).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

PAIRING_MODES = ("lp", "block")  # both layers run, their updates summed: what placement and fine-tuning handle
SKIP_MODES = ("prune", "merge")  # the second layer of the pair is removed
MODES = PAIRING_MODES + SKIP_MODES
INNER_COMPILERS = ("inductor", "aot_eager", "eager")
SHUFFLE_KEYS = ("start", "end", "seed")

Pair = tuple[int, int]


class LayerParallelError(ValueError):
    """Bad options, or (with ``strict=True``) a pairing that cannot be applied to a graph."""


@dataclass(frozen=True)
class Shuffle:
    """Layers ``start .. end - 1`` run in a seeded random order, each keeping its own cache slot."""

    start: int
    end: int
    seed: int = 0

    @property
    def order(self) -> tuple[int, ...]:
        """The layer indices in the order they run (the same for every graph and every run)."""
        return tuple(random.Random(self.seed).sample(range(self.start, self.end), self.end - self.start))


def _made_from(*options: str) -> dict[str, tuple[str, ...]]:
    """Field metadata: the field is made from these options, not from an option of its own name."""
    return {"options": options}


@dataclass(frozen=True)
class LPConfig:
    """The backend's options, checked by :func:`config_from_options`. Each field is the option of
    its name unless its metadata names the options it is made from; the accepted option names
    (:data:`OPTION_NAMES`) and the defaults (:data:`DEFAULTS`) are read from these fields. Neither
    ``pairs`` nor ``span`` means no pair is rewritten."""

    pairs: tuple[Pair, ...] = ()
    """``(i, i + 1)`` layer indices in the model's own layer list, sorted: the option ``pairs``
    (a list of pairs), or the pairs of a ``plan``."""
    span: tuple[int, int] | None = field(default=None, metadata=_made_from("start", "end"))
    """The paper's contiguous range, options ``start`` and ``end``: ``(start, start + 1),
    (start + 2, start + 3), ...`` below ``end`` (Δ = end - start even), paired once a graph shows
    how many layers there are (:meth:`requested_pairs`)."""
    plan_num_layers: int | None = field(default=None, metadata=_made_from("plan"))
    """The layer count the option ``plan`` (a JSON file of ``lp-fx plan``) was made for; the plan
    also gives ``pairs`` and ``modes``. A model with another layer count is refused."""
    mode: str = "lp"
    """How a pair without a mode of its own is rewritten, one of :data:`MODES`: ``lp`` (each
    sub-block of both layers reads the same stream, deltas summed), ``block`` (whole layers read
    the same input), ``prune`` (layer B skipped), ``merge`` (B skipped, A with the averages of A's
    and B's weights; inference only)."""
    modes: Mapping[Pair, str] = field(default_factory=dict)
    """A mode per pair: the option ``modes``, one of :data:`MODES` per pair of ``pairs`` in the
    order given, or a plan's ``modes``."""
    shuffle: Shuffle | None = None
    """``{"start": s, "end": e, "seed": k}`` (seed optional, 0): layers ``s .. e - 1`` run in a
    seeded order (:class:`Shuffle`), clear of every pair; one device only."""
    inner: str | Callable = "inductor"
    """The compiler of the rewritten graph: one of :data:`INNER_COMPILERS`, or a backend callable."""
    stack: str | None = None
    """Which layer list, as the module path from the model object (``"model.layers"``); None:
    the longest."""
    strict: bool = False
    """True: what cannot be rewritten raises; False: it is logged once and left as it was."""
    mesh: Any = None
    """A 1-D ``DeviceMesh`` (or ``"auto"``): each rank computes its branch of every summed pair."""
    tp: bool = True
    """With a mesh: the layers that are not paired run tensor-parallel (False: replicated)."""
    free_weights: bool = False
    """With a mesh, inference only: each rank releases the weights it does not compute with."""
    fuse: bool = False
    """One device, inference only: each ``lp``/``block`` pair's GEMMs run as batched GEMMs."""
    cudagraphs: bool = False
    """Inductor's CUDA graphs for the inner compile (``inner="inductor"`` only)."""

    @property
    def has_pairs(self) -> bool:
        return bool(self.pairs) or self.span is not None

    def requested_pairs(self, num_layers: int) -> tuple[Pair, ...]:
        """The pairs asked for; a ``start``/``end`` range's only as far as ``num_layers`` layers reach."""
        if self.span is None:
            return self.pairs
        start, end = self.span
        return tuple((i, i + 1) for i in range(start, min(end, num_layers - 1), 2))

    def mode_of(self, pair: Pair) -> str:
        """The mode for one pair: its own in ``modes``, else ``mode``."""
        return self.modes.get(pair, self.mode)


def _options_of(f: Field) -> tuple[str, ...]:
    return f.metadata.get("options", (f.name,))


OPTION_NAMES = tuple(dict.fromkeys(name for f in fields(LPConfig) for name in _options_of(f)))
DEFAULTS = {f.name: f.default for f in fields(LPConfig) if _options_of(f) == (f.name,) and f.default is not MISSING}
_FLAGS = tuple(f.name for f in fields(LPConfig) if isinstance(f.default, bool))


def config_from_options(options: Mapping[str, Any] | None = None, **kwargs: Any) -> LPConfig:
    """Validate backend options (a dict and/or keywords, same names) into an :class:`LPConfig`."""
    opts = dict(options or {})
    for key, value in kwargs.items():
        if key in opts:
            raise LayerParallelError(f"option {key!r} given twice (in options and as a keyword)")
        opts[key] = value
    unknown = sorted(set(opts) - set(OPTION_NAMES))
    if unknown:
        raise LayerParallelError(
            f"unknown option(s) {', '.join(map(repr, unknown))}; valid options: {', '.join(OPTION_NAMES)}"
        )
    pairs, span, plan_num_layers, modes = _layer_choice(opts)
    opts = {**DEFAULTS, **opts}
    config = LPConfig(
        pairs=pairs, span=span, plan_num_layers=plan_num_layers,
        mode=choice(opts["mode"], MODES, "mode"),
        modes=modes,
        shuffle=_shuffle(opts["shuffle"], pairs, span),
        inner=opts["inner"] if callable(opts["inner"]) else choice(opts["inner"], INNER_COMPILERS, "inner"),
        stack=_optional_str(opts["stack"], "stack"),
        mesh=opts["mesh"],
        **{name: _bool(opts[name], name) for name in _FLAGS},
    )
    _check_together(config)
    return config


def _check_together(config: LPConfig) -> None:
    """Refuse options that are each valid but not together."""
    if config.free_weights and config.mesh is None:
        raise LayerParallelError("free_weights=True needs a mesh: on one device every weight is computed with")
    if config.cudagraphs and config.inner != "inductor":
        raise LayerParallelError(
            f"cudagraphs=True is an Inductor setting: it needs inner='inductor', got inner={config.inner!r}"
        )
    if config.mesh is not None:
        _check_placeable(config.mode, config.modes, config.shuffle)
        if config.fuse:
            raise LayerParallelError(
                "fuse=True is for one device: with a mesh each rank already computes one branch of a pair, "
                "so there is nothing to fuse; drop 'fuse' or 'mesh'"
            )


def _layer_choice(opts: Mapping[str, Any]) -> tuple[tuple[Pair, ...], tuple[int, int] | None, int | None, dict[Pair, str]]:
    """``(pairs, span, plan_num_layers, modes)`` from the options that choose layers."""
    given = [k for k in ("pairs", "start", "plan") if opts.get(k) is not None]
    if opts.get("end") is not None and "start" not in given:
        given.append("start")
    if len(given) > 1:
        raise LayerParallelError(
            "give the layers to pair one way only: 'pairs', 'start'/'end', or 'plan' (got "
            + ", ".join(given) + ")"
        )
    if opts.get("modes") is not None and given != ["pairs"]:
        raise LayerParallelError("'modes' gives one mode per pair of 'pairs': give 'pairs' with it (a plan has its own)")
    if "plan" in given:
        plan = load_plan(_plan_path(opts["plan"]))
        pairs, modes = _pairs_and_modes(plan["pairs"], plan.get("modes"), f"plan {opts['plan']}")
        return pairs, None, plan["num_layers"], modes
    if "start" in given:
        return (), check_range(opts.get("start"), opts.get("end")), None, {}
    given_pairs = opts.get("pairs")
    pairs, modes = _pairs_and_modes(() if given_pairs is None else given_pairs, opts.get("modes"), "modes")
    return pairs, None, None, modes


def _pairs_and_modes(pairs: Any, modes: Any, source: str) -> tuple[tuple[Pair, ...], dict[Pair, str]]:
    """The checked, sorted pairs and ``{pair: mode}`` from ``modes``, one per pair in the order given."""
    in_order = _pairs_in_order(pairs)
    return _apart(in_order), _modes_of(in_order, modes, source)


def _modes_of(pairs: Sequence[Pair], modes: Any, source: str) -> dict[Pair, str]:
    """``{pair: mode}`` from ``modes``, one per pair of ``pairs`` (checked, in the order given)."""
    if modes is None:
        return {}
    if isinstance(modes, (str, bytes)) or not isinstance(modes, Sequence) or len(modes) != len(pairs):
        raise LayerParallelError(
            f"{source}: give one mode per pair ({len(pairs)} pairs), each one of {', '.join(map(repr, MODES))}; "
            f"got {modes!r}"
        )
    return {pair: choice(m, MODES, f"mode of pair {pair}") for pair, m in zip(pairs, modes)}


def _plan_path(value: Any) -> str | os.PathLike:
    """The option ``plan``, refused unless it is a path."""
    if not isinstance(value, (str, os.PathLike)):
        raise LayerParallelError(
            f"plan must be the path of a plan file written by `lp-fx plan` (a str or os.PathLike), got {value!r}"
        )
    return value


def check_range(start: Any, end: Any) -> tuple[int, int]:
    """``(start, end)`` of the paper's contiguous range, checked without making its pairs."""
    integers = _integer(start), _integer(end)
    if None in integers:
        raise LayerParallelError(f"'start' and 'end' must both be integers (got start={start!r}, end={end!r})")
    start, end = integers
    if start < 0 or end <= start:
        raise LayerParallelError(f"need 0 <= start < end (got start={start}, end={end})")
    delta = end - start
    if delta % 2:
        raise LayerParallelError(
            f"end - start = {delta} is odd: Δ must be even so that layers pair up "
            f"(e.g. end={end - 1} or end={end + 1})"
        )
    return start, end


def pairs_from_range(start: Any, end: Any) -> tuple[Pair, ...]:
    """The paper's contiguous range: (start, start+1), (start+2, start+3), ... below ``end``."""
    start, end = check_range(start, end)
    return tuple((i, i + 1) for i in range(start, end, 2))


def validate_pairs(pairs: Any) -> tuple[Pair, ...]:
    """Check a list of ``(i, i + 1)`` pairs (an ``(n, 2)`` integer array or tensor too): consecutive,
    non-negative, no layer used twice; sorted."""
    return _apart(_pairs_in_order(pairs))


def _pairs_in_order(pairs: Any) -> list[Pair]:
    """``pairs`` as ``(i, i + 1)`` tuples of ints in the order given, each checked on its own."""
    pairs = _listed(pairs)
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise LayerParallelError(f"'pairs' must be a list of (i, i + 1) layer indices, got {pairs!r}")
    checked: list[Pair] = []
    for given in pairs:
        p = _listed(given)
        indices = [] if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) else [_integer(i) for i in p]
        if len(indices) != 2 or None in indices:
            raise LayerParallelError(
                f"'pairs': each pair must be two layer indices (i, i + 1), integers, got {given!r}"
            )
        a, b = indices
        if a < 0:
            raise LayerParallelError(f"pair {(a, b)}: layer indices must be >= 0")
        if b != a + 1:
            raise LayerParallelError(
                f"pair {(a, b)} is not two consecutive layers: valid pairs look like (i, i + 1), e.g. {(a, a + 1)}"
            )
        checked.append((a, b))
    return checked


def _apart(pairs: Sequence[Pair]) -> tuple[Pair, ...]:
    """``pairs`` sorted, refused when two of them share a layer."""
    ordered = sorted(pairs)
    for (a0, b0), (a1, b1) in zip(ordered, ordered[1:]):
        if a1 <= b0:
            raise LayerParallelError(f"pairs {(a0, b0)} and {(a1, b1)} overlap: each layer can be in one pair only")
    return tuple(ordered)


# ------------------------------------------------------------------------------------ plan files


class PlanError(LayerParallelError):
    """A plan file that cannot be used (unreadable, malformed, or for another model)."""


PLAN_KEYS = ("version", "model", "num_layers", "pairs", "modes", "objective", "calibration", "search", "candidates",
             "steps")
"""The keys of a plan file: those ``lp-fx plan`` writes (every version; the first had no ``search``).
Pairing reads ``num_layers``, ``pairs`` and ``modes``; any other key is refused, as a misspelt one
(``"mode"``) would otherwise be ignored."""


def read_bytes(path: Path, error: type[Exception], missing: str, folder: str, unreadable: str) -> bytes:
    """The bytes of ``path``, or one ``error``: ``missing`` when there is no such file, ``folder``
    when it is a directory, ``unreadable: <the system's reason>`` otherwise (plans and checkpoints
    read their files through this)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise error(missing) from None
    except IsADirectoryError:
        raise error(folder) from None
    except OSError as reason:
        raise error(f"{unreadable}: {reason.strerror or reason}") from None


def load_plan(path: str | Path) -> dict:
    """Read a plan file: ``{"pairs": [[i, i+1], …], "num_layers": N, "modes"?: [...], …}``."""
    path = Path(path)
    text = read_bytes(path, PlanError, missing=f"plan file {path} not found; make one with `lp-fx plan`",
                      folder=f"plan file {path} is a directory; give the JSON file `lp-fx plan` wrote",
                      unreadable=f"cannot read plan file {path}")
    try:
        plan = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PlanError(f"plan file {path} is not valid JSON: {error}") from None
    if not isinstance(plan, dict):
        raise PlanError(f"plan file {path}: expected an object with a 'pairs' list")
    unknown = sorted(set(plan) - set(PLAN_KEYS))
    if unknown:
        raise PlanError(
            f"plan file {path}: unknown key(s) {', '.join(map(repr, unknown))}; "
            f"a plan's keys are {', '.join(PLAN_KEYS)}"
        )
    if not isinstance(plan.get("pairs"), list):
        raise PlanError(f"plan file {path}: expected an object with a 'pairs' list")
    if _integer(plan.get("num_layers")) is None:
        raise PlanError(f"plan file {path}: missing 'num_layers' (the layer count it was made for, an integer)")
    modes = plan.get("modes")
    if modes is not None and (not isinstance(modes, list) or len(modes) != len(plan["pairs"])):
        raise PlanError(
            f"plan file {path}: 'modes' must be a list of one mode per pair ({len(plan['pairs'])} pairs), "
            f"each one of {', '.join(map(repr, MODES))}; got {modes!r}"
        )
    return plan


def check_plan(plan: Mapping[str, Any], num_layers: int, source: str | Path = "plan", this: str = "this model") -> None:
    """Refuse a plan made for a model with another number of layers (``this`` has ``num_layers``)."""
    if plan["num_layers"] != num_layers:
        made_for = f" ({plan['model']})" if plan.get("model") else ""
        raise PlanError(
            f"{source} was made for a model with {plan['num_layers']} layers{made_for}, but {this} has "
            f"{num_layers}: make a plan for this model with `lp-fx plan`"
        )


def _shuffle(value: Any, pairs: Sequence[Pair], span: tuple[int, int] | None) -> Shuffle | None:
    """``{"start": s, "end": e, "seed": k}`` (seed optional, 0) -> :class:`Shuffle`, or None."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise LayerParallelError(f"shuffle must be a dict such as {{'start': 4, 'end': 12, 'seed': 0}}, got {value!r}")
    unknown = sorted(set(value) - set(SHUFFLE_KEYS))
    if unknown or "start" not in value or "end" not in value:
        raise LayerParallelError(
            f"shuffle takes the keys {', '.join(SHUFFLE_KEYS)} ('seed' optional), got {sorted(value)}"
        )
    given = value["start"], value["end"], value.get("seed", 0)
    start, end, seed = map(_integer, given)
    if None in (start, end, seed):
        raise LayerParallelError(f"shuffle start, end and seed must be integers (got {', '.join(map(repr, given))})")
    if start < 0 or end - start < 2:
        raise LayerParallelError(
            f"shuffle needs 0 <= start and end >= start + 2, at least two layers to reorder "
            f"(got start={start}, end={end})"
        )
    for first, last, what in [(i, j, f"pair {(i, j)}") for i, j in pairs] + (
        [(span[0], span[1] - 1, f"the range start={span[0]}, end={span[1]}")] if span else []
    ):
        if start <= last and first < end:
            raise LayerParallelError(
                f"{what} is inside the shuffled layers {start}..{end - 1}: pairs must lie outside that range"
            )
    return Shuffle(start, end, seed)


def _check_placeable(mode: str, modes: Mapping[Pair, str], shuffle: Shuffle | None) -> None:
    """A mesh places only summed pairs (lp, block): refuse the depth transforms with one."""
    skipped = sorted(({mode} | set(modes.values())) & set(SKIP_MODES))
    if skipped or shuffle is not None:
        what = f"mode {', '.join(map(repr, skipped))}" if skipped else "shuffle"
        raise LayerParallelError(
            f"{what} cannot be placed on a mesh: with 'mesh' use mode 'lp' or 'block', "
            "or compile for one device (no 'mesh')"
        )


def choice(value: Any, valid: Sequence[str], name: str, error: type[Exception] = LayerParallelError) -> Any:
    """``value`` when it is one of ``valid``; else ``error`` naming what is valid."""
    if value not in valid:
        raise error(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, valid))}")
    return value


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise LayerParallelError(f"{name} must be True or False, got {value!r}")
    return value


def _optional_str(value: Any, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise LayerParallelError(f"{name} must be a module path string such as 'model.layers', got {value!r}")
    return value


def _integer(value: Any) -> int | None:
    """``value`` as an int when it is integer-like: an int, a numpy integer, or an integer array or
    tensor of one element; else None (a bool is not an integer here, nor is a float)."""
    if isinstance(value, (np.generic, np.ndarray, torch.Tensor)):
        size = value.numel() if isinstance(value, torch.Tensor) else value.size
        if size != 1:
            return None
        value = value.item()
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _listed(value: Any) -> Any:
    """An array or tensor of one or more dimensions as nested lists (its elements as Python
    numbers); anything else as it is."""
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim > 0:
        return value.tolist()
    return value
