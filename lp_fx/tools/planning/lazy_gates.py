"""Running the planner's gated graph for one pairing, computing only what that pairing changes.

:class:`lp_fx.GatedLayerParallel` compiles one graph in which every pair ``(i, i + 1)`` sits behind
a gate (:mod:`lp_fx.gates`). Run as it is, every call computes every layer and every gated
alternative. :class:`LazyGatedGraph` runs the same graph for a known gate setting:

- a ``torch.where`` on a gate yields the operand the gate selects, and the other operand is not
  computed (an lp gate that is off skips its pair's second attention);
- a value depends only on the gates its inputs read (those of the pairs before it), so a value
  computed for one pairing serves every pairing that sets those gates the same way: a trial that
  adds a pair at layer ``x`` to a scored set runs the graph from layer ``x`` on. The values kept
  are those read by a node that depends on more gates (where a later pairing may start), per
  input window.

Each computed value is the same operation on the same operands as in the gated graph, so scores
equal the gated graph's (tested); only what is computed changes.
"""

from __future__ import annotations

import hashlib
import logging
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import fx
from lp_fx.fx_utils import mutated_input

log = logging.getLogger(__name__)

Gates = tuple[int, ...]


@dataclass(frozen=True)
class _Selector:
    """A ``torch.where`` whose condition is ``gates[index] == value``: the operand it yields."""

    index: int
    value: int
    when_on: fx.Node
    when_off: fx.Node

    def chosen(self, gates: Gates) -> fx.Node:
        return self.when_on if gates[self.index] == self.value else self.when_off


class LazyGatedGraph:
    """The gated graph ``gm`` (its last input the gate tensor), run for each call's gate setting
    computing only the selected operands, and reusing values known from earlier calls on the same
    inputs (see the module doc). Keeps values until :meth:`retain` drops them.

    The graph must not write any tensor in place (a kept value would change under it): such a
    graph is refused with :class:`ValueError`. It runs under ``torch.no_grad()`` only: a kept value
    would hold its autograd graph, every intermediate of its call.
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        writers = [n.name for n in self.nodes if _writes_in_place(n)]
        if writers:
            raise ValueError(f"the gated graph writes tensors in place ({', '.join(writers[:3])}): it cannot be run lazily")
        self.order = {node: i for i, node in enumerate(self.nodes)}
        self.placeholders = gm.graph.find_nodes(op="placeholder")
        self.gates_node = self.placeholders[-1]
        self.output = self.nodes[-1]
        self.deps = _gate_deps(self.nodes, self.gates_node)
        self.dep_order = {node: tuple(sorted(deps)) for node, deps in self.deps.items()}
        self.selectors = _selectors(self.nodes, self.gates_node)
        self.kept_nodes = {n for n in self.nodes if n.op != "placeholder" and any(self.deps[u] > self.deps[n] for u in n.users)}
        self.known: dict[tuple[str, fx.Node, Gates], object] = {}
        self.computed = 0  # nodes run (not counting the gates' selections), over all calls
        self.calls = 0

    def __call__(self, *args: torch.Tensor) -> object:
        if torch.is_grad_enabled():
            raise ValueError("the lazily run gated graph keeps values between calls: call it under torch.no_grad()")
        *inputs, gate_tensor = args
        gates = tuple(int(g) for g in gate_tensor.tolist())
        key = _inputs_key(inputs)
        env: dict[fx.Node, object] = dict(zip(self.placeholders, args))
        todo = self._to_compute(gates, key, env)
        self._run(todo, gates, key, env)
        self.calls += 1
        return fx.node.map_arg(self.output.args[0], env.__getitem__)

    def _gate_key(self, node: fx.Node, gates: Gates) -> Gates:
        return tuple(gates[i] for i in self.dep_order[node])

    def _to_compute(self, gates: Gates, key: str, env: dict[fx.Node, object]) -> list[fx.Node]:
        """The nodes to run for ``gates`` in graph order; fills ``env`` with the known values."""
        todo, seen = [], set(env)
        stack = list(self.output.all_input_nodes)
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            entry = (key, node, self._gate_key(node, gates)) if node in self.kept_nodes else None
            if entry in self.known:
                env[node] = self.known[entry]
                continue
            todo.append(node)
            selector = self.selectors.get(node)
            stack.extend([selector.chosen(gates)] if selector else node.all_input_nodes)
        return sorted(todo, key=self.order.__getitem__)

    def _run(self, todo: list[fx.Node], gates: Gates, key: str, env: dict[fx.Node, object]) -> None:
        """Compute ``todo`` in order, dropping each value after its last reader in ``todo``."""
        last_use = {}
        for node in todo:
            selector = self.selectors.get(node)
            for arg in [selector.chosen(gates)] if selector else node.all_input_nodes:
                last_use[arg] = node
        drop: dict[fx.Node, list[fx.Node]] = {}
        returned = set(self.output.all_input_nodes)
        for arg, reader in last_use.items():
            if arg.op != "placeholder" and arg not in returned:
                drop.setdefault(reader, []).append(arg)
        for node in todo:
            selector = self.selectors.get(node)
            env[node] = env[selector.chosen(gates)] if selector else self._compute(node, env)
            if node in self.kept_nodes:
                self.known[(key, node, self._gate_key(node, gates))] = env[node]
            for arg in drop.get(node, ()):
                env.pop(arg, None)
        self.computed += sum(1 for node in todo if node not in self.selectors)

    def _compute(self, node: fx.Node, env: dict[fx.Node, object]) -> object:
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_module":
            return self.gm.get_submodule(node.target)(*args, **kwargs)
        if node.op == "get_attr":
            return _attribute(self.gm, node.target)
        raise ValueError(f"cannot run node {node.name} ({node.op})")

    def retain(self, settings: Iterable[Gates]) -> None:
        """Keep only the values that serve one of these gate settings."""
        settings = [tuple(s) for s in settings]
        self.known = {
            entry: value for entry, value in self.known.items()
            if any(entry[2] == self._gate_key(entry[1], s) for s in settings)
        }

    def share_run(self) -> float:
        """The nodes run per call, as a share of the graph's (nan before the first call)."""
        runnable = sum(1 for n in self.nodes if n.op not in ("placeholder", "output") and n not in self.selectors)
        return self.computed / (self.calls * runnable) if self.calls else float("nan")


def _writes_in_place(node: fx.Node) -> bool:
    """:func:`lp_fx.fx_utils.mutated_input`, less :mod:`operator`'s functions named after a keyword
    (``and_``, ``or_``, ``not_``, ``is_``), which return a new value."""
    keyword_named = (
        node.op == "call_function" and getattr(node.target, "__module__", None) == "_operator"
        and node.target.__name__.endswith("_")
    )
    return not keyword_named and mutated_input(node) is not None


def _gate_deps(nodes: Sequence[fx.Node], gates: fx.Node) -> dict[fx.Node, frozenset[int]]:
    """For each node, the gates (pair indices) that its value depends on."""
    deps: dict[fx.Node, frozenset[int]] = {}
    for node in nodes:
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] is gates:
            deps[node] = frozenset([node.args[1]])
        else:
            deps[node] = frozenset().union(*(deps[arg] for arg in node.all_input_nodes))
    return deps


def _selectors(nodes: Sequence[fx.Node], gates: fx.Node) -> dict[fx.Node, _Selector]:
    """The ``torch.where(gates[i] == v, a, b)`` nodes whose result is ``a`` or ``b`` itself (same
    shape and dtype as the result, by the traced example values)."""
    found = {}
    for node in nodes:
        if node.op != "call_function" or node.target is not torch.where or len(node.args) != 3 or node.kwargs:
            continue
        cond, when_on, when_off = node.args
        test = _gate_test(cond, gates)
        if test is not None and _same_meta(node, when_on) and _same_meta(node, when_off):
            found[node] = _Selector(*test, when_on, when_off)
    return found


def _gate_test(cond: object, gates: fx.Node) -> tuple[int, int] | None:
    """``(i, v)`` when ``cond`` is ``gates[i] == v``."""
    if not (isinstance(cond, fx.Node) and cond.op == "call_function" and cond.target is operator.eq):
        return None
    gate, value = cond.args
    if isinstance(gate, fx.Node) and gate.target is operator.getitem and gate.args[0] is gates and isinstance(value, int):
        return gate.args[1], value
    return None


def _same_meta(node: fx.Node, operand: object) -> bool:
    mine, theirs = node.meta.get("example_value"), getattr(operand, "meta", {}).get("example_value")
    return (
        isinstance(mine, torch.Tensor) and isinstance(theirs, torch.Tensor)
        and mine.shape == theirs.shape and mine.dtype == theirs.dtype and mine.stride() == theirs.stride()
    )


def _inputs_key(inputs: Sequence[object]) -> str:
    """What identifies a call's inputs: the bytes of every tensor that is not a parameter, and
    each parameter's identity and version (parameters are not copied or hashed)."""
    digest = hashlib.blake2b(digest_size=16)
    for value in inputs:
        if isinstance(value, torch.nn.Parameter):
            digest.update(f"p{id(value)}:{value._version};".encode())
        elif isinstance(value, torch.Tensor):
            digest.update(f"t{tuple(value.shape)}{value.dtype};".encode())
            digest.update(value.detach().contiguous().numpy().tobytes())
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


def _attribute(module: torch.nn.Module, target: str) -> object:
    value: object = module
    for part in target.split("."):
        value = getattr(value, part)
    return value
