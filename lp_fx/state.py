"""What the passes share about one graph (:class:`GraphState`), and the one call wrapper that
gives the compiled graph what the passes asked for (:func:`wrap_call`).

A pass may change what the graph reads without changing its signature, in three ways: an input
replaced at every call by what a :data:`Provider` makes of the call's inputs (a merged pair's
averages, a rank's weight slices), an input traced with another fake than Dynamo's (a parameter
that became a view of a fused buffer), and inputs appended after the graph's own, also made by a
provider at every call (fused buffers, the gates). Checks run on the call's inputs before each
call (a rank releasing the weights it does not read).

Everything a provider passes is made from the call's own inputs, never kept from the compile:
Dynamo reuses one compiled graph for every model of the same class, so the parameters a call
passes may be another model's than those the graph was compiled with, and each model must get
its own averages, slices and buffers (held by :class:`~lp_fx.weights.WeightStore`, keyed by the
parameters they were made from).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from .config import LPConfig, Pair
from .find_layers import LayerStack
from .report import GraphReport
from .rewrite import PairRewrite
from .weights import WeightStore

Provider = Callable[[Sequence[Any]], Any]  # the call's inputs -> the value to pass at one position
Check = Callable[[Sequence[Any]], None]  # run on the call's inputs before each call


@dataclass
class GraphState:
    """One graph on its way through the passes (:data:`lp_fx.passes.PASSES`)."""

    gm: fx.GraphModule
    example_inputs: Sequence[Any]
    config: LPConfig
    report: GraphReport
    weights: WeightStore
    say: Callable[[str], None]  # logs once, or raises with strict=True
    stack: LayerStack | None = None  # the layers as the graph is now: found again after a pass changes them
    pairs: list[tuple[Pair, str]] = field(default_factory=list)  # the pairs this graph rewrites, with their modes
    rewrites: list[PairRewrite] = field(default_factory=list)  # what the summed pairs left in the graph
    replaced: dict[int, Provider] = field(default_factory=dict)  # input position -> what to pass there
    traced: dict[int, Any] = field(default_factory=dict)  # input position -> the fake to trace with
    appended: list[Provider] = field(default_factory=list)  # what to pass after the graph's own inputs
    checks: list[Check] = field(default_factory=list)


def fixed(tensor: torch.Tensor) -> Provider:
    """Pass ``tensor`` whatever the call's inputs (state of the backend object, not of a model:
    the gates)."""
    return lambda args: tensor


def slice_of_input(store: WeightStore, i: int, shard: tuple[int, int, int]) -> Provider:
    """Pass this rank's slice ``(dim, start, size)`` of the call's input ``i`` (a parameter whose
    storage is released once its slice is made), kept by ``store``."""
    return lambda args: store.slice_of(args[i], *shard)


def average_of_inputs(store: WeightStore, i: int, j: int) -> Provider:
    """Pass the average of the call's inputs ``i`` and ``j`` (a merged pair's parameters), kept by
    ``store`` and computed again only when either parameter changed."""
    return lambda args: store.average_of(args[i], args[j])


def inputs_to_trace(state: GraphState) -> list[Any]:
    """The example inputs the inner compiler traces with: the replaced and appended inputs as
    static fakes (:func:`static_fakes`), and the fakes the passes chose."""
    now = {i: provide(state.example_inputs) for i, provide in state.replaced.items()}
    inputs = list(state.example_inputs)
    for i, value in {**state.traced, **static_fakes(state.example_inputs, now)}.items():
        inputs[i] = value
    appended = {i: provide(state.example_inputs) for i, provide in enumerate(state.appended)}
    return [*inputs, *static_fakes(state.example_inputs, appended).values()]


def static_fakes(example_inputs: Sequence[Any], tensors: dict[int, torch.Tensor]) -> dict[int, Any]:
    """Fake copies of ``tensors`` with static shapes, in the fake mode Dynamo traced with.

    AOTAutograd fakifies a real input it has not seen with fresh, sourceless size symbols, which
    Dynamo cannot turn into guards; a fake tensor of its own mode is taken as it is.
    """
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    if fake_mode is None:
        return dict(tensors)
    return {i: fake_mode.from_tensor(t, static_shapes=True) for i, t in tensors.items()}


def wrap_call(compiled: Callable, state: GraphState) -> Callable:
    """``compiled`` as Dynamo calls it: the checks run, then the replaced inputs are replaced and
    the appended ones appended."""
    if not (state.replaced or state.appended or state.checks):
        return compiled
    checks, replaced, appended = list(state.checks), dict(state.replaced), list(state.appended)

    def call(*args: Any) -> Any:
        for check in checks:
            check(args)
        given = list(args)
        for i, provide in replaced.items():
            given[i] = provide(args)
        return compiled(*given, *(provide(args) for provide in appended))

    return call
