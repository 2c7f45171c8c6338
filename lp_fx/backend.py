"""The ``layer_parallel`` torch.compile backend.

``torch.compile(model, backend="layer_parallel", options={...})`` reaches :func:`layer_parallel`
through the ``torch_dynamo_backends`` entry point (so this module must not register the name
itself: torch would raise "duplicate name"). ``LayerParallel(**options)`` is the same backend as
an object that keeps one :class:`GraphReport` per compiled graph.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import fx

from .config import PAIRING_MODES, LayerParallelError, LPConfig, Pair, Shuffle, config_from_options, validate_pairs
from .find_layers import LayerStack, available_stacks, find_layers
from .fx_utils import copy_graph_module
from .graph_breaks import last_graph_break
from .gates import GATE_VALUES, OFF, gate_pairs
from .fuse import FuseResult, checked_call, count_gemms, fuse_pairs
from .merge import merge_problem, merged_inputs
from .report import GraphReport, LayerInfo
from .rewrite import PairRewrite, pair_problem, rewrite_pairs, skip_problem
from .shuffle import shuffle_layers, shuffle_problem
from .weights import WeightStore, keep_own_weights, unique_bytes

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
        report = GraphReport(graph=len(self.reports))
        self.reports.append(report)
        if self.config.fuse:
            gm = copy_graph_module(gm)  # fusing adds inputs: Dynamo must not see them in its graph
        stack = find_layers(gm, self.config.stack)
        rewrites: list[PairRewrite] = []
        replaced: dict[int, Provider] = {}  # input position -> what to pass there instead, from the call's inputs
        if stack is None:
            self._no_layers(gm, report)
        else:
            rewrites, merged = self._rewrite(gm, example_inputs, stack, report)
            replaced = {i: _average_of_inputs(self.weights, i, j) for i, j in merged.items()}
        if self.config.mesh is not None:
            from .placement import place

            gm = place(gm, example_inputs, stack, rewrites, self.config, report, self._say)
            if self.config.free_weights and report.collectives is not None:  # placed on several ranks
                slices, report.released_bytes = keep_own_weights(gm, example_inputs, self.weights)
                replaced = {i: _fixed(t) for i, t in slices.items()}
        fused = self._fuse(gm, example_inputs, stack, rewrites, report) if self.config.fuse and rewrites else None
        traced = fused.traced if fused is not None else {}
        now = {i: provide(example_inputs) for i, provide in replaced.items()}
        inputs = _replace(list(example_inputs), {**traced, **_static_fakes(example_inputs, now)})
        if fused is not None and fused.buffers:
            inputs += _static_fakes(example_inputs, dict(enumerate(fused.buffers))).values()
        logger.debug("%s", report.summary())
        compiled = compile_inner(gm, inputs, self.config.inner, self.config.cudagraphs)
        if fused is not None and fused.buffers:
            compiled = checked_call(compiled, fused.checks, fused.buffers)
        return _with_inputs_replaced(compiled, replaced) if replaced else compiled

    def _fuse(
        self, gm: fx.GraphModule, example_inputs: Sequence[Any], stack: LayerStack, rewrites: list[PairRewrite],
        report: GraphReport,
    ) -> FuseResult:
        """Fuse the rewritten pairs' GEMMs (:mod:`lp_fx.fuse`) and report what it did."""
        params = [v for v in example_inputs if isinstance(v, torch.nn.Parameter)]
        before, gemms = unique_bytes(params), count_gemms(gm)
        result = fuse_pairs(gm, example_inputs, stack, [r.pair for r in rewrites], self.weights)
        held = self.weights.buffers()
        report.gemms = (gemms, count_gemms(gm))
        report.fuse_bytes = (before, unique_bytes([*params, *held]))
        report.pairs_fused = result.fused
        report.fuse_skipped = result.skipped
        for pair, why in result.skipped:
            self._say(f"pair {pair}: not all of its GEMMs fused: {why}")
        return result

    def _no_layers(self, gm: fx.GraphModule, report: GraphReport) -> None:
        if not self.config.has_pairs and self.config.shuffle is None:
            return
        found = available_stacks(gm) if self.config.stack is not None else []
        if found:
            raise LayerParallelError(
                f"no layer stack {self.config.stack!r} in this graph; stacks found: {', '.join(found)} "
                "(give 'stack' as the module path from the model object, e.g. 'model.layers')"
            )
        where = last_graph_break()
        if where is None:
            msg = "no decoder layers found in this graph (no module list of same-class children); compiled without pairing"
        else:
            msg = (
                f"no layer stack in this graph: split by a graph break at {where}; a graph break inside the "
                "layer loop makes Dynamo compile each layer on its own, so no graph holds both layers of a "
                "pair and nothing is paired (remove the graph break: torch._dynamo.explain lists them)"
            )
        report.notes.append(msg)
        self._say(msg)

    def _rewrite(
        self, gm: fx.GraphModule, example_inputs: Sequence[Any], stack: LayerStack, report: GraphReport
    ) -> tuple[list[PairRewrite], dict[int, int]]:
        """Apply the pairs and the shuffle to ``gm``; returns the summed pairs and, for merged
        pairs, ``{position of a parameter of A: position of B's}`` (:func:`lp_fx.merge.merged_inputs`)."""
        _describe_layers(report, stack)
        present = {i for i, layer in stack.layers.items() if layer.nodes}
        complete = _holds_whole_stack(stack, present)
        self._check_fits(stack, complete)
        todo: list[tuple[Pair, str]] = []
        for pair in self.config.requested_pairs(max(stack.layers) + 1):
            mode = self.config.mode_of(pair)
            reason = self._why_not(stack, pair, mode, present, complete)
            if reason is None and mode == "merge":
                reason = merge_problem(gm, example_inputs, stack.layers[pair[0]], stack.layers[pair[1]])
            if reason is None:
                todo.append((pair, mode))
            elif reason:
                report.pairs_skipped.append((pair, reason))
                self._say(f"pair {pair} not rewritten: {reason}")
        report.pairs_rewritten = todo
        merged = [(stack.layers[i], stack.layers[j]) for (i, j), mode in todo if mode == "merge"]
        averaged = merged_inputs(gm, example_inputs, merged)
        rewrites = rewrite_pairs(gm, stack, todo)
        if self.config.shuffle is not None:
            self._shuffle(gm, stack, self.config.shuffle, report, present, complete)
        return rewrites, averaged

    def _why_not(self, stack: LayerStack, pair: Pair, mode: str, present: set[int], complete: bool) -> str | None:
        """None: rewrite it. "": not in this graph, nothing to say. Otherwise the reason to skip."""
        i, j = pair
        if complete and j >= len(stack):
            raise LayerParallelError(
                f"pair {pair} is out of range: {stack.path} has {len(stack)} layers, valid indices 0..{len(stack) - 1}"
            )
        if mode == "prune":  # needs layer B only: a graph holding it can skip it
            return skip_problem(stack.layers[j]) if j in present else ""
        if i in present and j in present:
            return pair_problem(stack.layers[i], stack.layers[j], mode)
        if i in present or j in present:
            here, missing = (i, j) if i in present else (j, i)
            return _missing_partner(here, missing)
        return ""

    def _shuffle(
        self, gm: fx.GraphModule, stack: LayerStack, shuffle: Shuffle, report: GraphReport, present: set[int],
        complete: bool,
    ) -> None:
        """Run the shuffled range of ``gm`` in its seeded order, or say why it stays as it is."""
        indices = range(shuffle.start, shuffle.end)
        if complete and shuffle.end > len(stack):
            raise LayerParallelError(
                f"shuffle range {shuffle.start}..{shuffle.end - 1} is out of range: {stack.path} has {len(stack)} "
                f"layers, valid indices 0..{len(stack) - 1} (end <= {len(stack)})"
            )
        here = [k for k in indices if k in present]
        if not here:
            return
        missing = [k for k in indices if k not in present]
        reason = _missing_partner(here, missing) if missing else shuffle_problem(stack, indices)
        if reason is None:
            shuffle_layers(gm, stack, shuffle.order)
            report.shuffled = shuffle.order
            if list(shuffle.order) == list(indices):
                report.notes.append(f"shuffle seed {shuffle.seed} keeps layers {here} in their order; try another seed")
        else:
            report.shuffle_skipped = reason
            self._say(f"shuffle of layers {shuffle.start}..{shuffle.end - 1} not applied: {reason}")

    def _check_fits(self, stack: LayerStack, complete: bool) -> None:
        """Refuse a plan made for another layer count, or a ``start``/``end`` range past the last layer."""
        wanted, span = self.config.plan_num_layers, self.config.span
        if complete and wanted is not None and wanted != len(stack):
            raise LayerParallelError(
                f"the plan was made for a model with {wanted} layers, but {stack.path} has {len(stack)}: "
                "make a plan for this model with `lp-fx plan`"
            )
        if complete and span is not None and span[1] > len(stack):
            raise LayerParallelError(
                f"start={span[0]}, end={span[1]} is out of range: {stack.path} has {len(stack)} layers, "
                f"so end <= {len(stack)}"
            )

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
        report = GraphReport(graph=len(self.reports))
        self.reports.append(report)
        gm = copy_graph_module(gm)
        stack = find_layers(gm, self.config.stack)
        if stack is None or len(stack) != self.num_layers:
            found = "no layer stack" if stack is None else f"{len(stack)} layers in {stack.path}"
            raise LayerParallelError(
                f"gates need the whole stack of {self.num_layers} layers in one graph; this graph has {found}"
            )
        _describe_layers(report, stack)
        gate_pairs(gm, stack, self.modes)
        report.notes.append(f"gated: pairs (0, 1) .. ({len(stack) - 2}, {len(stack) - 1}) in {', '.join(self.modes)}")
        logger.debug("%s", report.summary())
        gate_input = _static_fakes(example_inputs, {0: self.gates})[0]
        compiled = compile_inner(gm, [*example_inputs, gate_input], self.config.inner)
        return _with_input_appended(compiled, self.gates)


def _describe_layers(report: GraphReport, stack: LayerStack) -> None:
    report.stack = stack.path
    report.layers = [
        LayerInfo(index=l.index, path=l.path, cls=l.cls, sub_blocks=len(l.blocks), note=l.problem)
        for l in stack.layers.values()
    ]


def _missing_partner(here: int | list[int], missing: int | list[int]) -> str:
    """Why layer(s) ``here`` of this graph go without ``missing``: a graph break Dynamo made, or
    else the model not running them in this graph (a skipped layer is no graph break)."""
    where = last_graph_break()
    if where is None:
        return f"{_named(missing)} not run in this graph (skipped by the model, not a graph break); {_named(here)} run here"
    return f"split by a graph break at {where}: {_named(here)} in this graph, {_named(missing)} not"


def _named(layers: int | list[int]) -> str:
    """``layer 3`` or ``layers 3, 4``."""
    if isinstance(layers, int) or len(layers) == 1:
        return f"layer {layers if isinstance(layers, int) else layers[0]}"
    return "layers " + ", ".join(map(str, layers))


def _holds_whole_stack(stack: LayerStack, present: set[int]) -> bool:
    """Whether the graph holds every layer of the stack, so an index past the end is an error.

    True when layers 0..n-1 are all here and the last one's output feeds the rest of the model
    (not only the graph's output, which a graph break right after the loop would cause).
    """
    if present != set(range(len(stack))):
        return False
    last = stack.layers[len(stack) - 1].output
    return last is not None and any(u.op != "output" for u in last.users)


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
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches={"triton.cudagraphs": True} if cudagraphs else None)


def _replace(args: list[Any], by_position: Mapping[int, Any]) -> list[Any]:
    """``args`` with the values at some positions replaced, in place."""
    for i, value in by_position.items():
        args[i] = value
    return args


def _static_fakes(example_inputs: Sequence[Any], tensors: Mapping[int, torch.Tensor]) -> dict[int, Any]:
    """Fake copies of ``tensors`` with static shapes, in the fake mode Dynamo traced with.

    AOTAutograd fakifies a real input it has not seen with fresh, sourceless size symbols, which
    Dynamo cannot turn into guards; a fake tensor of its own mode is taken as it is.
    """
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    if fake_mode is None:
        return dict(tensors)
    return {i: fake_mode.from_tensor(t, static_shapes=True) for i, t in tensors.items()}


Provider = Callable[[Sequence[Any]], Any]


def _fixed(tensor: torch.Tensor) -> Provider:
    """Pass ``tensor`` (this rank's slice of a released parameter) whatever the call's inputs."""
    return lambda args: tensor


def _average_of_inputs(store: WeightStore, i: int, j: int) -> Provider:
    """Pass the average of the call's inputs ``i`` and ``j`` (a merged pair's parameters), kept by
    ``store`` and computed again only when either parameter changed."""
    return lambda args: store.average_of(args[i], args[j])


def _with_inputs_replaced(compiled: Callable, by_position: Mapping[int, Provider]) -> Callable:
    """``compiled`` called with some inputs replaced by what ``by_position`` makes of the call's inputs."""

    def call(*args: Any) -> Any:
        return compiled(*_replace(list(args), {i: provide(args) for i, provide in by_position.items()}))

    return call


def _with_input_appended(compiled: Callable, extra: Any) -> Callable:
    """``compiled`` called with one more input after the graph's own (the gate tensor)."""

    def call(*args: Any) -> Any:
        return compiled(*args, extra)

    return call


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
