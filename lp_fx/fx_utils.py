"""Small FX graph tools shared by the rewrite and the placement: ordering and dead-node removal."""

from __future__ import annotations

import heapq
import operator
from collections.abc import Iterable

import torch
from torch import fx

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


def erase_unused(nodes: Iterable[fx.Node]) -> int:
    """Erase the nodes among ``nodes`` that nothing uses and that have no side effect.

    Returns how many were erased. Unlike ``Graph.eliminate_dead_code`` this never touches nodes
    outside the given set, and it keeps in-place writes (a KV-cache update has no users).
    """
    alive = set(nodes)
    erased = 0
    changed = True
    while changed:
        changed = False
        for n in list(alive):
            if not n.users and not _has_side_effect(n):
                n.graph.erase_node(n)
                alive.discard(n)
                erased += 1
                changed = True
    return erased


def in_graph_order(nodes: set[fx.Node]) -> list[fx.Node]:
    """``nodes`` in the order they stand in their graph."""
    if not nodes:
        return []
    graph = next(iter(nodes)).graph
    return [n for n in graph.nodes if n in nodes]


def _has_side_effect(node: fx.Node) -> bool:
    return node.op in ("placeholder", "output") or mutated_input(node) is not None or node.is_impure()
