"""Small FX graph tools shared by the rewrite and the placement: ordering and dead-node removal."""

from __future__ import annotations

import heapq
import operator
from collections.abc import Callable, Iterable

import torch
from torch import fx

# What ``nn.Linear`` and ``F.linear`` are in a Dynamo graph (a ``call_function`` node).
LINEAR = torch._C._nn.linear

# Ops whose result may share memory with their first argument (so a write through one is seen
# through the other). Used to keep reads of a mutated cache after the write.
_ALIASING_METHODS = {
    "view", "reshape", "transpose", "permute", "expand", "unsqueeze", "squeeze", "narrow",
    "select", "contiguous", "view_as", "flatten", "unflatten", "t", "as_strided", "__getitem__",
}
_ALIASING_FUNCTIONS = {operator.getitem, torch.narrow, torch.select, torch.transpose, torch.reshape}


def mutated_input(node: fx.Node) -> fx.Node | None:
    """The node whose tensor ``node`` writes in place, if it is an in-place op."""
    if node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__"):
        first = node.args[0] if node.args else None
    elif node.op == "call_function" and node.target in (operator.setitem, operator.iadd, operator.imul):
        first = node.args[0] if node.args else None
    elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        schema = node.target._schema
        first = next(
            (a for arg, a in zip(schema.arguments, node.args) if arg.alias_info is not None and arg.alias_info.is_write),
            None,
        )
    elif node.op == "call_function" and getattr(node.target, "__name__", "").endswith("_"):
        first = node.args[0] if node.args else None
    else:
        first = None
    return first if isinstance(first, fx.Node) else None


def _aliases(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _ALIASING_METHODS
    return node.op == "call_function" and node.target in _ALIASING_FUNCTIONS


def _alias_root(node: fx.Node) -> fx.Node:
    while _aliases(node) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _alias_group(root: fx.Node) -> set[fx.Node]:
    group, todo = set(), [root]
    while todo:
        n = todo.pop()
        if n not in group:
            group.add(n)
            todo.extend(u for u in n.users if _aliases(u))
    return group


def _mutation_edges(nodes: list[fx.Node], index: dict[fx.Node, int]) -> dict[fx.Node, set[fx.Node]]:
    """Extra ``node -> must-come-after`` edges that keep every in-place write where it was
    relative to the other users of the same memory."""
    extra: dict[fx.Node, set[fx.Node]] = {}
    for m in nodes:
        target = mutated_input(m)
        if target is None:
            continue
        group = _alias_group(_alias_root(target))
        for user in {u for g in group for u in g.users} - {m}:
            if index[user] > index[m]:
                extra.setdefault(user, set()).add(m)
            else:
                extra.setdefault(m, set()).add(user)
    return extra


def stable_topological_sort(graph: fx.Graph) -> None:
    """Reorder ``graph`` so every node follows its inputs, moving as few nodes as possible.

    Kahn's algorithm that always emits the ready node that came first in the old order: nodes
    that no rewired edge forces to move keep their relative order, and in-place writes keep
    their place among the readers of the same tensor.
    """
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    deps = {n: set(n.all_input_nodes) for n in nodes}
    for n, after in _mutation_edges(nodes, index).items():
        deps[n] |= after
    dependents: dict[fx.Node, list[fx.Node]] = {n: [] for n in nodes}
    for n, ds in deps.items():
        for d in ds:
            dependents[d].append(n)
    waiting = {n: len(ds) for n, ds in deps.items()}
    ready = [index[n] for n in nodes if waiting[n] == 0]
    heapq.heapify(ready)
    order: list[fx.Node] = []
    while ready:
        n = nodes[heapq.heappop(ready)]
        order.append(n)
        for d in dependents[n]:
            waiting[d] -= 1
            if waiting[d] == 0:
                heapq.heappush(ready, index[d])
    if len(order) != len(nodes):
        raise RuntimeError("lp_fx produced a graph with a cycle; this is a bug, please report it")
    for prev, n in zip(order, order[1:]):
        if prev.next is not n:
            prev.append(n)


def erase_unused(nodes: Iterable[fx.Node], writes_too: bool = False) -> int:
    """Erase the nodes among ``nodes`` that nothing uses and that have no side effect, or, with
    ``writes_too``, whose only side effect is an in-place write (the other rank's branch of a pair,
    its KV-cache writes included).

    Returns how many were erased. Unlike ``Graph.eliminate_dead_code`` this never touches nodes
    outside the given set, and by default it keeps in-place writes (a KV-cache update has no
    users). A node whose result leaves the graph (a static cache allocated lazily inside the first
    graph is returned by it) is used, so it stays with what it needs.
    """
    return _erase_dead(set(nodes), lambda node, alive: writes_too)


def erase_skipped_layer(nodes: set[fx.Node], stream: fx.Node) -> int:
    """Erase what is left of a layer once nothing reads its output: its unused nodes, and its
    in-place writes of values computed from ``stream`` (its input) into memory that no other
    node of the graph reads (its KV-cache entries). Returns how many nodes were erased.

    Writes of values that do not depend on the stream (a cache's position counter, which code
    outside the graph may read) stay, and so does a write into memory another layer reads.
    """

    def private_stream_write(node: fx.Node, alive: set[fx.Node]) -> bool:
        if mutated_input(node) is None or not depends_on(node, stream, nodes):
            return False
        return all(r in alive and mutated_input(r) is not None for r in memory_readers(node))

    return _erase_dead(set(nodes), private_stream_write)


def memory_readers(write: fx.Node) -> set[fx.Node]:
    """The nodes that use the memory the in-place op ``write`` writes (through any view of it),
    other than the write itself and the graph's output."""
    group = _alias_group(_alias_root(mutated_input(write)))
    return {u for g in group for u in g.users if u not in group and u.op != "output"} - {write}


def _erase_dead(alive: set[fx.Node], droppable: Callable[[fx.Node, set[fx.Node]], bool]) -> int:
    """Erase unused nodes of ``alive`` without side effect, or whose side effect is ``droppable``."""
    erased = 0
    changed = True
    while changed:
        changed = False
        for n in list(alive):
            if not n.users and (not _has_side_effect(n) or droppable(n, alive)):
                n.graph.erase_node(n)
                alive.discard(n)
                erased += 1
                changed = True
    return erased


def depends_on(node: fx.Node, ancestor: fx.Node, nodes: set[fx.Node]) -> bool:
    """Whether ``node`` depends on ``ancestor``, following inputs inside ``nodes`` only."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n is ancestor:
            return True
        if n in seen or n not in nodes:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return False


def placeholder_positions(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """Each placeholder's position among the graph's inputs."""
    return {node: i for i, node in enumerate(gm.graph.find_nodes(op="placeholder"))}


def in_graph_order(nodes: set[fx.Node]) -> list[fx.Node]:
    """``nodes`` in the order they stand in their graph."""
    if not nodes:
        return []
    graph = next(iter(nodes)).graph
    return [n for n in graph.nodes if n in nodes]


def _has_side_effect(node: fx.Node) -> bool:
    return node.op in ("placeholder", "output") or mutated_input(node) is not None or node.is_impure()


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new graph module with a copy of ``gm``'s graph (nodes and their meta), sharing its
    attributes. Dynamo reads the placeholders of the graph it handed to a backend after the
    backend returns, so a rewrite that adds an input must work on a copy.

    What AOTAutograd reads to know a graph came from Dynamo is kept (the module's meta and
    parameter sources, each placeholder's source): it decides which inputs CUDA graphs may
    treat as static (the parameters) instead of copying them on every call."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    _, output = graph.graph_copy(gm.graph, env, return_output_node=True)
    graph.node_copy(output, env.__getitem__)
    copy = fx.GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        copy._param_name_to_source = gm._param_name_to_source
    for old in gm.graph.find_nodes(op="placeholder"):
        if hasattr(old, "_dynamo_source"):
            env[old]._dynamo_source = old._dynamo_source
    return copy


def append_input(gm: fx.GraphModule, name: str, static: bool = False) -> fx.Node:
    """A new placeholder after the graph's inputs (the caller passes the value, after Dynamo's).

    It has no source in the user's code; ``static``: CUDA graphs read it in place (a weight buffer
    that keeps its address) instead of copying it on every call."""
    graph = gm.graph
    with graph.inserting_after(graph.find_nodes(op="placeholder")[-1]):
        node = graph.placeholder(name)
    node._dynamo_source = None
    if static:
        node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
    return node
