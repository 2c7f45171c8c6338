"""Find the decoder layers in a Dynamo FX graph, and the residual stream through each.

Nothing here knows a model class by name. Layers are the children of a module container
(``ModuleList``/``ModuleDict``) as recorded in ``node.meta["nn_module_stack"]``; the residual
stream through a layer is found by walking back from its output through ``add`` nodes to the
tensor that entered the layer.
"""

from __future__ import annotations

import operator
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx

from .fx_utils import depends_on

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_CHILD = re.compile(r"^(?P<prefix>.+?)(?:\.(?P<attr>[A-Za-z0-9_]+)|\[['\"]?(?P<item>[^\]'\"]+)['\"]?\])$")
# Where a parameter's source leaves the model object: ``<root>._modules['model']...``.
_MODULE_ACCESS = re.compile(r"\._(?:modules|parameters|buffers)\[")
# A local or global and its subscripts (``L['self']``, ``L['args'][0]``, ``G['model']``): the
# root when the graph has no parameter placeholders to read it from.
_SOURCE_ROOT = re.compile(r"^[LG]\[['\"][^'\"]+['\"]\](?:\[[^\]]+\])*")


@dataclass
class SubBlock:
    """One residual update ``out = stream + sum(deltas)`` inside a layer."""

    stream: fx.Node
    add: fx.Node
    deltas: list[fx.Node]


@dataclass
class Layer:
    """One decoder layer as it appears in the graph."""

    index: int
    path: str
    cls: str
    nodes: set[fx.Node]
    input: fx.Node | None = None
    output: fx.Node | None = None
    blocks: list[SubBlock] = field(default_factory=list)
    problem: str | None = None

    @property
    def residual(self) -> bool:
        """True when the stream passes through the layer as ``x + f1(x) + ...`` (pre-norm)."""
        return bool(self.blocks)


@dataclass
class LayerStack:
    """The decoder layers of one container, in the order the user indexes them."""

    path: str
    layers: dict[int, Layer]

    def __len__(self) -> int:
        return len(self.layers)


def model_roots(gm: fx.GraphModule) -> tuple[str, ...]:
    """How Dynamo named the model object(s) in this graph, longest first.

    Read from the sources of the parameter placeholders (``L['args'][0]._modules['model']...``),
    so it holds however the model was compiled: the object (``L['self']`` or, when its forward
    is wrapped by a decorator, ``L['args'][0]``), a closure (``G['m']``), an argument
    (``L['model']``), or an attribute of another object.
    """
    roots = set()
    for node in gm.graph.find_nodes(op="placeholder"):
        name = _source_name(node)
        m = _MODULE_ACCESS.search(name) if name else None
        if m:
            roots.add(name[: m.start()])
    return tuple(sorted(roots, key=len, reverse=True))


def parameter_paths(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """Each placeholder that is a module parameter, with its path from the model object
    (``model.layers.1.mlp.up_proj.weight``), as :func:`normalize_path` writes module paths."""
    paths = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        name = _source_name(node)
        m = _MODULE_ACCESS.search(name) if name else None
        if m and name.rsplit(".", 1)[-1].startswith("_parameters["):
            paths[node] = normalize_path(_MODULE_ACCESS.sub("[", name[m.start() :]))
    return paths


def _source_name(node: fx.Node) -> str | None:
    """Where Dynamo read a placeholder's value from (``L['self']._modules['model']...``), if known."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = source.name() if callable(getattr(source, "name", None)) else getattr(source, "name", None)
    return name if isinstance(name, str) else None


def normalize_path(path: str, roots: Sequence[str] = ()) -> str:
    """``L['args'][0].model.layers['3']`` -> ``model.layers.3``: the path as the user writes it
    from the model object, whatever Dynamo called that object (``roots``, see :func:`model_roots`)."""
    for root in roots:
        if path == root or path.startswith(root + ".") or path.startswith(root + "["):
            path = path[len(root) :]
            break
    else:
        path = _SOURCE_ROOT.sub("", path, count=1)
    return re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path).lstrip(".")


def find_layers(gm: fx.GraphModule, stack: str | None = None) -> LayerStack | None:
    """The layer stack of ``gm`` (the longest, or the one under module path ``stack``), or None."""
    roots = model_roots(gm)
    stacks = _candidate_stacks(gm.graph)
    if stack is not None:
        wanted = normalize_path(stack)
        stacks = {p: c for p, c in stacks.items() if normalize_path(p, roots) == wanted}
    if not stacks:
        return None
    prefix = next(iter(stacks))
    return _build_stack(gm.graph, prefix, stacks[prefix], roots)


def available_stacks(gm: fx.GraphModule) -> list[str]:
    """Module paths of every layer container seen in ``gm``, as the user writes them."""
    roots = model_roots(gm)
    return sorted({normalize_path(p, roots) for p in _candidate_stacks(gm.graph)})


def _candidate_stacks(graph: fx.Graph) -> dict[str, dict[str, tuple[str, str]]]:
    """:func:`layer_lists` of the modules the graph's ``nn_module_stack`` records."""
    children: dict[str, dict[str, tuple[str, str]]] = defaultdict(dict)
    for node in graph.nodes:
        for path, cls in (node.meta.get("nn_module_stack") or {}).values():
            m = _CHILD.match(path)
            if m:
                key = m.group("attr") or m.group("item")
                children[m.group("prefix")][key] = (path, _class_name(cls))
    return layer_lists(children)


def layer_lists(children: Mapping[str, Mapping[str, tuple[str, str]]]) -> dict[str, dict[str, tuple[str, str]]]:
    """The containers that can be the layer stack, the stack first; the one rule for what the
    layer stack is, used on a graph (:func:`find_layers`) and on a model's modules
    (``lp_fx.checkpoint.layer_stack_of``).

    ``children``: container path -> {child key: (child path, class name)}. A candidate has
    numbered children all of one class (``layers.0``, ``h.3``, torchtitan's ``layers['0']``;
    named same-class children, two norms or three Linears of an MLP, are not a layer list) and
    is not inside a child of another candidate (MoE experts inside a layer are not the layer
    list). The stack is the candidate with the most children, the outermost on a tie.
    """
    lists = {
        p: dict(c)
        for p, c in children.items()
        if c and all(k.isdigit() for k in c) and len({cls for _, cls in c.values()}) == 1
    }
    inner = {p for p in lists for q in lists if p != q and any(_is_inside(p, path) for path, _ in lists[q].values())}
    outer = [p for p in lists if p not in inner]
    return {p: lists[p] for p in sorted(outer, key=lambda p: (-len(lists[p]), len(p)))}


def _is_inside(path: str, module: str) -> bool:
    """``path`` is ``module`` or a module under it (``layers.1.mlp`` is under ``layers.1``, not
    ``layers.10``; Dynamo writes ``layers[1].mlp``)."""
    return path == module or path.startswith((module + ".", module + "["))


def _class_name(cls: object) -> str:
    return getattr(cls, "__qualname__", None) or str(cls)


def _build_stack(
    graph: fx.Graph, prefix: str, children: dict[str, tuple[str, str]], roots: Sequence[str]
) -> LayerStack:
    nodes_by_path: dict[str, set[fx.Node]] = defaultdict(set)
    layer_paths = {path for path, _ in children.values()}
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            if path in layer_paths:
                nodes_by_path[path].add(node)
    layers = {}
    for key in sorted(children, key=int):
        path, cls = children[key]
        index = int(key)
        layer = Layer(index=index, path=normalize_path(path, roots), cls=cls, nodes=nodes_by_path.get(path, set()))
        _find_stream(layer)
        layers[index] = layer
    return LayerStack(path=normalize_path(prefix, roots), layers=layers)


def _find_stream(layer: Layer) -> None:
    """Fill ``layer.input/output/blocks``; set ``layer.problem`` when the stream is not found."""
    if not layer.nodes:
        layer.problem = "no computation of this layer in the graph"
        return
    order = {n: i for i, n in enumerate(_graph_of(layer).nodes)}
    outputs = sorted(
        (n for n in layer.nodes if any(u not in layer.nodes for u in n.users) and _is_float_tensor(n)),
        key=order.__getitem__,
        reverse=True,
    )
    for out in outputs:
        walked = _walk_residual(out, layer.nodes)
        if walked is not None:
            layer.input, layer.blocks = walked
            layer.output = out
            return
    for out in outputs:
        inp = _same_shape_input(out, layer.nodes, order)
        if inp is not None:
            layer.input, layer.output = inp, out
            layer.problem = (
                "the residual stream does not pass through the layer as x + f(x) "
                "(post-norm or non-residual layer): only mode='block' can pair it"
            )
            return
    layer.problem = "no output of the layer has the shape of one of its inputs"


def _walk_residual(out: fx.Node, nodes: set[fx.Node]) -> tuple[fx.Node, list[SubBlock]] | None:
    """From the layer output back through residual adds to the layer input, or None."""
    blocks: list[SubBlock] = []
    cur = out
    while cur in nodes:
        split = _split_residual_add(cur, nodes)
        if split is None:
            return None
        stream, delta = split
        blocks.append(SubBlock(stream=stream, add=cur, deltas=[delta]))
        cur = stream
    if not blocks or shape_key(cur) != shape_key(out):
        return None
    blocks.reverse()
    return cur, _merge_blocks_not_reading_their_stream(blocks, nodes)


def _split_residual_add(node: fx.Node, nodes: set[fx.Node]) -> tuple[fx.Node, fx.Node] | None:
    """``(stream, delta)`` when ``node`` is ``stream + delta`` with delta computed from the stream."""
    if not is_add(node):
        return None
    a, b = node.args[0], node.args[1]
    if not isinstance(a, fx.Node) or not isinstance(b, fx.Node) or shape_key(a) != shape_key(b):
        return None
    if depends_on(b, a, nodes):
        return a, b
    if depends_on(a, b, nodes):
        return b, a
    # ``x + f(x) + g(x)`` written left to right: the running sum is the stream operand.
    streamish = [n for n in (a, b) if n not in nodes or is_add(n)]
    if len(streamish) == 1:
        stream = streamish[0]
        return stream, (b if stream is a else a)
    return None


def _merge_blocks_not_reading_their_stream(blocks: list[SubBlock], nodes: set[fx.Node]) -> list[SubBlock]:
    """``x + f(x) + g(x)`` (parallel attention) is one sub-block with two deltas, not two."""
    merged = [blocks[0]]
    for block in blocks[1:]:
        if any(depends_on(d, block.stream, nodes) for d in block.deltas):
            merged.append(block)
        else:
            prev = merged[-1]
            merged[-1] = SubBlock(stream=prev.stream, add=block.add, deltas=prev.deltas + block.deltas)
    return merged


def _same_shape_input(out: fx.Node, nodes: set[fx.Node], order: dict[fx.Node, int]) -> fx.Node | None:
    """The latest external input of the layer with the output's shape that the output depends on."""
    external = {a for n in nodes for a in n.all_input_nodes if a not in nodes}
    fits = [a for a in external if shape_key(a) == shape_key(out) and _is_float_tensor(a) and depends_on(out, a, nodes)]
    return max(fits, key=order.__getitem__) if fits else None


def is_add(node: fx.Node) -> bool:
    """A tensor ``a + b`` in any of the spellings Dynamo records, without ``alpha``."""
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return len(node.args) == 2 and not node.kwargs
    return node.op == "call_method" and node.target == "add" and len(node.args) == 2 and not node.kwargs


def example_value(node: fx.Node):
    return node.meta.get("example_value", node.meta.get("val"))


def shape_key(node: object) -> tuple | None:
    """The node's shape as text, for comparing shapes (None for a non-tensor)."""
    value = example_value(node) if isinstance(node, fx.Node) else None
    # Compared as text: equality of symbolic sizes would add guards to a graph already traced.
    return tuple(str(d) for d in value.shape) if isinstance(value, torch.Tensor) else None


def _is_float_tensor(node: fx.Node) -> bool:
    value = example_value(node)
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _graph_of(layer: Layer) -> fx.Graph:
    return next(iter(layer.nodes)).graph
