"""A pairing: which consecutive layers run side by side and in which modes, the one type the tools
pass around; its spec syntax (``baseline``, ``14:28``, ``14-15,20-21``, a plan file, a checkpoint);
plan files (read, checked, written, versioned); and :meth:`Pairing.to_options`, the one builder of
the backend options that serve it.

Everything here is about layer indices alone; what depends on a model's graph is checked when a
graph arrives (:mod:`lp_fx.choose`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lp_fx.errors import LayerParallelError
from lp_fx.files import read_json, write_json

Pair = tuple[int, int]

PAIRING_MODES = ("lp", "block")  # both layers run, their updates summed: what placement and fine-tuning handle
SKIP_MODES = ("prune", "merge")  # the second layer of the pair is removed
MODES = PAIRING_MODES + SKIP_MODES

PLAN_VERSION = 1  # what make_plan writes; a plan file without a version is read as version 1
RANGE = re.compile(r"^(\d+):(\d+)$")
PAIR_LIST = re.compile(r"^\d+-\d+(,\d+-\d+)*$")


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


# ------------------------------------------------------------------------------------ layer pairs


def integer(value: Any) -> int | None:
    """``value`` as an int when it is integer-like: an int, a numpy integer, or an integer array or
    tensor of one element; else None (a bool is not an integer here, nor is a float)."""
    if isinstance(value, (np.generic, np.ndarray, torch.Tensor)):
        size = value.numel() if isinstance(value, torch.Tensor) else value.size
        if size != 1:
            return None
        value = value.item()
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def listed(value: Any) -> Any:
    """An array or tensor of one or more dimensions as nested lists (its elements as Python
    numbers); anything else as it is."""
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim > 0:
        return value.tolist()
    return value


def check_range(start: Any, end: Any) -> tuple[int, int]:
    """``(start, end)`` of the paper's contiguous range, checked without making its pairs."""
    integers = integer(start), integer(end)
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
    return apart(pairs_in_order(pairs))


def pairs_in_order(pairs: Any) -> list[Pair]:
    """``pairs`` as ``(i, i + 1)`` tuples of ints in the order given, each checked on its own."""
    pairs = listed(pairs)
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise LayerParallelError(f"'pairs' must be a list of (i, i + 1) layer indices, got {pairs!r}")
    checked: list[Pair] = []
    for given in pairs:
        p = listed(given)
        indices = [] if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) else [integer(i) for i in p]
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


def apart(pairs: Sequence[Pair]) -> tuple[Pair, ...]:
    """``pairs`` sorted, refused when two of them share a layer."""
    ordered = sorted(pairs)
    for (a0, b0), (a1, b1) in zip(ordered, ordered[1:]):
        if a1 <= b0:
            raise LayerParallelError(f"pairs {(a0, b0)} and {(a1, b1)} overlap: each layer can be in one pair only")
    return tuple(ordered)


def out_of_range(what: str, num_layers: int) -> LayerParallelError:
    """The error for layers past the end of a model with ``num_layers`` layers."""
    return LayerParallelError(
        f"{what} is out of range: the model has {num_layers} layers, valid indices 0..{num_layers - 1}"
    )


# ------------------------------------------------------------------------------------ plan files


class PlanError(LayerParallelError):
    """A plan file that cannot be used (unreadable, malformed, of another version, or for another model)."""


PLAN_KEYS = ("version", "model", "num_layers", "pairs", "modes", "objective", "calibration", "search", "candidates",
             "steps")
"""The keys of a plan file: those ``lp-fx plan`` writes (every version; the first had no ``search``).
Pairing reads ``num_layers``, ``pairs`` and ``modes``; any other key is refused, as a misspelt one
(``"mode"``) would otherwise be ignored."""


def load_plan(path: str | Path) -> dict:
    """Read a plan file: ``{"version"?: 1, "pairs": [[i, i+1], …], "num_layers": N, "modes"?: [...], …}``."""
    path = Path(path)
    plan = read_json(path, PlanError, missing=f"plan file {path} not found; make one with `lp-fx plan`",
                     folder=f"plan file {path} is a directory; give the JSON file `lp-fx plan` wrote",
                     unreadable=f"cannot read plan file {path}", invalid=f"plan file {path} is not valid JSON: {{reason}}")
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
    version = plan.get("version", PLAN_VERSION)
    if version != PLAN_VERSION:
        raise PlanError(f"plan file {path} has version {version!r}; this lp_fx reads version {PLAN_VERSION}: "
                        "make the plan again with this `lp-fx plan`")
    if integer(plan.get("num_layers")) is None:
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


def save_plan(plan: Mapping[str, Any], path: str | Path) -> None:
    """Write a plan file (all or nothing), stamped with :data:`PLAN_VERSION`."""
    write_json(path, {"version": PLAN_VERSION, **plan})


# ------------------------------------------------------------------------------------ the pairing


@dataclass(frozen=True)
class Pairing:
    """A named set of layer pairs (each in its own mode, or all in the mode the caller gives), and
    optionally a shuffled range; :data:`BASELINE` has neither."""

    name: str
    pairs: tuple[Pair, ...] = ()
    modes: tuple[str, ...] | None = None
    shuffle: Shuffle | None = None

    @property
    def num_pairs(self) -> int:
        return len(self.pairs)

    def modes_or(self, mode: str) -> tuple[str, ...]:
        """The mode of each pair: its own, else ``mode``."""
        return self.modes or (mode,) * self.num_pairs

    def to_json(self) -> dict:
        out: dict = {"name": self.name, "pairs": [list(pair) for pair in self.pairs]}
        if self.modes is not None:
            out["modes"] = list(self.modes)
        if self.shuffle is not None:
            out["shuffle"] = {**asdict(self.shuffle), "order": list(self.shuffle.order)}
        return out

    def to_options(self, **options: Any) -> dict[str, Any]:
        """The backend options that serve this pairing (its pairs, their modes, its shuffle), with
        more ``options`` (``mode``, ``inner``, ``strict``, ``fuse``, ``mesh``, ...) beside them."""
        out: dict[str, Any] = {"pairs": list(self.pairs), **options}
        if self.modes is not None:
            out["modes"] = list(self.modes)
        if self.shuffle is not None:
            out["shuffle"] = asdict(self.shuffle)
        return out

    @classmethod
    def contiguous(cls, start: int, end: int, mode: str | None = None) -> Pairing:
        """The paper's range ``start:end`` (named so); ``mode``: every pair's own mode."""
        pairs = pairs_from_range(start, end)
        return cls(f"{start}:{end}", pairs, None if mode is None else (mode,) * len(pairs))

    @classmethod
    def from_plan(cls, plan: Mapping[str, Any], name: str) -> Pairing:
        """The pairing a plan describes."""
        modes = plan.get("modes")
        return cls(name, tuple((int(a), int(b)) for a, b in plan["pairs"]), tuple(modes) if modes is not None else None)

    @classmethod
    def from_checkpoint(cls, pairing: Mapping[str, Any], directory: str | Path) -> Pairing:
        """The pairing a fine-tuned checkpoint (its ``pairing.json`` record) was trained for."""
        pairs = tuple((int(a), int(b)) for a, b in pairing["pairs"])
        return cls(f"finetuned:{Path(directory).name}", pairs, tuple(pairing["modes"]))

    @classmethod
    def parse(cls, spec: str, num_layers: int) -> Pairing:
        """``baseline``, a range ``14:28``, pairs ``14-15,20-21``, or a plan file for this model.

        A range past the model's ``num_layers`` layers is refused before its pairs are listed; the
        other checks against the model are :func:`lp_fx.tools.evaluation.compiled.check_pairing`'s.
        """
        if spec == "baseline":
            return BASELINE
        if match := RANGE.match(spec):
            if int(match[2]) > num_layers:
                raise out_of_range(f"range {spec}", num_layers)
            return cls(spec, pairs_from_range(int(match[1]), int(match[2])))
        if PAIR_LIST.match(spec):
            return cls(spec, tuple((int(a), int(b)) for a, b in (pair.split("-") for pair in spec.split(","))))
        plan = load_plan(spec)
        check_plan(plan, num_layers, spec)
        validate_pairs(plan["pairs"])
        return cls.from_plan(plan, Path(spec).stem)


BASELINE = Pairing("baseline")
