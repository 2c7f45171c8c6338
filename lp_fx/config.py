"""Backend options -> a validated :class:`LPConfig`, the one place the options are declared,
documented and given their defaults. Pairs, ranges and plan files are :mod:`lp_fx.pairing`'s.

Every check here is about the options alone; what depends on the model (a pair past the last
layer, a plan made for another layer count, a post-norm layer) is checked when a graph arrives
(:mod:`lp_fx.choose`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

from lp_fx.errors import LayerParallelError
from lp_fx.pairing import MODES, SKIP_MODES, Pair, Shuffle, apart, check_range, integer, load_plan, pairs_in_order
from lp_fx.pairing import PAIRING_MODES, validate_pairs  # noqa: F401 (the pass's modules import them from here)

INNER_COMPILERS = ("inductor", "aot_eager", "eager")
SHUFFLE_KEYS = ("start", "end", "seed")

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
    in_order = pairs_in_order(pairs)
    return apart(in_order), _modes_of(in_order, modes, source)


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
    start, end, seed = map(integer, given)
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
