"""The ``layer_parallel`` torch.compile backend.

``torch.compile(model, backend="layer_parallel", options={...})`` reaches :func:`layer_parallel`
through the ``torch_dynamo_backends`` entry point (so this module must not register the name
itself: torch would raise "duplicate name"). ``LayerParallel(**options)`` is the same backend as
an object that keeps one :class:`GraphReport` per compiled graph. Each graph goes through the
passes of :data:`lp_fx.passes.PASSES`, then the inner compiler, then one call wrapper
(:func:`lp_fx.state.wrap_call`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import fx

from .config import PAIRING_MODES, LayerParallelError, LPConfig, Pair, config_from_options, validate_pairs
from .fx_utils import copy_graph_module
from .gates import GATE_VALUES, OFF, gate_pairs
from .passes import find_stack, run_passes
from .report import GraphReport
from .state import GraphState, fixed, inputs_to_trace, wrap_call
from .weights import WeightStore

logger = logging.getLogger("lp_fx")


class LayerParallel:
    """A configurable ``torch.compile`` backend; ``reports`` holds one report per graph."""

    def __init__(self, options: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        self.config: LPConfig = config_from_options(options, **kwargs)
        self.reports: list[GraphReport] = []
        self.weights = WeightStore()
        self._said: set[str] = set()

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable:
        if kwargs.get("options") or kwargs.get("mode"):
            raise LayerParallelError(
                "this LayerParallel object already has its options; pass them to LayerParallel(...), "
                "not to torch.compile"
            )
        report = GraphReport(index=len(self.reports))
        self.reports.append(report)
        if self.config.fuse:
            gm = copy_graph_module(gm)  # fusing adds inputs: Dynamo must not see them in its graph
        state = GraphState(gm, example_inputs, self.config, report, self.weights, self._say)
        run_passes(state)
        logger.debug("%s", report.summary())
        compiled = compile_inner(state.gm, inputs_to_trace(state), self.config.inner, self.config.cudagraphs)
        return wrap_call(compiled, state)

    def _say(self, msg: str) -> None:
        """Raise with ``strict=True``; otherwise log the message once per backend object."""
        if self.config.strict:
            raise LayerParallelError(msg)
        if msg not in self._said:
            self._said.add(msg)
            logger.warning("lp_fx: %s", msg)


class GatedLayerParallel:
    """A backend for choosing pairs: one compiled graph in which every pair ``(i, i + 1)`` is
    switched off, or on in one of ``modes``, by :meth:`set_pairing`, without a recompile.

    The graph is rewritten by :func:`lp_fx.gates.gate_pairs` (what is computed, and its cost) and
    reads the gate tensor ``self.gates`` (one entry per pair) as one more input, which the callable
    returned to Dynamo appends. All gates off is the unpaired model, gate ``i`` on the compiled
    pairing ``(i, i + 1)``. Every graph must hold the whole stack of ``num_layers`` layers, with no
    KV cache written (``use_cache=False``) when ``lp`` is gated.
    """

    def __init__(
        self, num_layers: int, modes: Sequence[str] = PAIRING_MODES, inner: str | Callable = "inductor",
        stack: str | None = None,
    ) -> None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 2:
            raise LayerParallelError(
                f"num_layers must be an integer >= 2 (the model's layer count), got {num_layers!r}"
            )
        if isinstance(modes, str) or not modes or set(modes) - set(PAIRING_MODES):
            raise LayerParallelError(f"gated modes {modes!r}: give some of {', '.join(map(repr, PAIRING_MODES))}")
        self.num_layers = num_layers
        self.modes = tuple(dict.fromkeys(modes))
        self.config = config_from_options(inner=inner, stack=stack)
        self.gates = torch.full((num_layers - 1,), OFF, dtype=torch.long)
        self.reports: list[GraphReport] = []

    def set_pairing(self, pairs: Sequence[Pair], modes: Sequence[str]) -> None:
        """Switch ``pairs`` on, each in its mode (``modes``, one per pair), and every other pair off.
        The next call of the compiled model computes that pairing."""
        validate_pairs(pairs)
        if len(modes) != len(pairs):
            raise LayerParallelError(f"give one mode per pair: {len(pairs)} pairs, {len(modes)} modes")
        values = torch.full_like(self.gates, OFF)
        for (i, j), mode in zip(pairs, modes):
            if j >= self.num_layers:
                last = self.num_layers - 1
                raise LayerParallelError(
                    f"pair {(i, j)} is out of range: valid pairs are (0, 1) .. ({last - 1}, {last})"
                )
            if mode not in self.modes:
                raise LayerParallelError(f"mode {mode!r} is not gated here; gated modes: {', '.join(self.modes)}")
            values[i] = GATE_VALUES[mode]
        self.gates.copy_(values)

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        report = GraphReport(index=len(self.reports))
        self.reports.append(report)
        state = GraphState(copy_graph_module(gm), example_inputs, self.config, report, WeightStore(), logger.warning)
        find_stack(state)
        stack = state.stack
        if stack is None or len(stack) != self.num_layers:
            found = "no layer stack" if stack is None else f"{len(stack)} layers in {stack.path}"
            raise LayerParallelError(
                f"gates need the whole stack of {self.num_layers} layers in one graph; this graph has {found}"
            )
        gate_pairs(state.gm, stack, self.modes)
        report.notes.append(f"gated: pairs (0, 1) .. ({len(stack) - 2}, {len(stack) - 1}) in {', '.join(self.modes)}")
        logger.debug("%s", report.summary())
        state.appended.append(fixed(self.gates))
        return wrap_call(compile_inner(state.gm, inputs_to_trace(state), self.config.inner), state)


def compile_inner(
    gm: fx.GraphModule, example_inputs: Sequence[Any], inner: str | Callable, cudagraphs: bool = False
) -> Callable:
    """Hand the (rewritten) graph to the inner compiler (Inductor with CUDA graphs if asked)."""
    if callable(inner):
        return inner(gm, example_inputs)
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx  # lazy: Inductor takes seconds to import; eager never needs it

    return compile_fx(gm, example_inputs, config_patches={"triton.cudagraphs": True} if cudagraphs else None)


_BY_OPTIONS: dict[str, LayerParallel] = {}


def layer_parallel(
    gm: fx.GraphModule, example_inputs: Sequence[Any], options: Mapping[str, Any] | None = None, mode: str | None = None
) -> Callable:
    """The backend behind ``backend="layer_parallel"``.

    One :class:`LayerParallel` is kept per distinct set of options, so each message is logged
    once however many graphs Dynamo compiles. ``torch.compile``'s own ``mode=`` cannot choose a
    pairing (torch refuses ``mode`` together with ``options``), so it is ignored, and said so once.
    """
    if mode is not None:
        _say_once(
            f"torch.compile(mode={mode!r}) is ignored by layer_parallel: torch passes no options with mode=, so "
            "nothing is paired; give the LP mode with the pairs, options={'pairs': [...], 'mode': 'block'}"
        )
    opts = dict(options or {})
    key = repr(sorted(opts.items(), key=lambda kv: kv[0]))
    if key not in _BY_OPTIONS:
        _BY_OPTIONS[key] = LayerParallel(opts)
    return _BY_OPTIONS[key](gm, example_inputs)


_SAID_BY_NAME: set[str] = set()


def _say_once(msg: str) -> None:
    if msg not in _SAID_BY_NAME:
        _SAID_BY_NAME.add(msg)
        logger.warning("lp_fx: %s", msg)
