"""Tensors the backend passes in place of parameters, and what parameters cost in memory.

:class:`WeightStore` holds, per backend object and weakly per parameter, the tensors its graphs
read instead of the model's own: slices (``free_weights``), averages (``mode="merge"``) and fused
buffers (``fuse=True``). :func:`refuse_gradients` is the inference-only rule of the three:
those tensors are not the model's parameters, so no gradient would reach the model.
:func:`keep_own_weights` is ``free_weights=True``, described below; the byte counters
(:func:`resident_bytes`, :func:`unique_bytes`, ...) serve the reports and benches.

With ``free_weights=True`` each rank keeps in memory only the weights it computes with.

After placement a rank's graph reads some parameters whole (its branch of a pair, replicated
layers, embedding and head), some only through ``narrow`` slices (tensor-parallel linears) and
some not at all (the other rank's branch). Here the slices become contiguous copies, held by the
backend object and passed to the compiled graph in place of the parameter (prefill and decode
graphs share them), and the storage of every parameter the graph no longer reads is released
with ``untyped_storage().resize_(0)``, as FSDP does: the parameter keeps its shape, dtype and
strides, so Dynamo's guards still hold and nothing recompiles, but its memory is returned.

This is for inference: the copies are not the model's parameters, so no gradient would reach the
model; a graph compiled with gradients enabled is refused (:func:`refuse_gradients`). The model is
not usable outside the compiled forward afterwards: reading a released parameter raises, and
copying the model (``copy.deepcopy``) crashes in torch, as it does for FSDP-sharded modules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils.weak import WeakIdKeyDictionary

from .config import LayerParallelError


class WeightStore:
    """The tensors one backend object passes in place of parameters, shared by all of its graphs:
    slices (``free_weights``), averages (``mode="merge"``, :mod:`lp_fx.merge`) and fused buffers
    (:mod:`lp_fx.fuse`).

    Each is held under the parameter it was made from, weakly: when the model's parameters are
    freed, so is everything made from them, even though a backend chosen by name
    (``backend="layer_parallel"``) lives as long as the process.
    """

    def __init__(self) -> None:
        self._slices: WeakIdKeyDictionary = WeakIdKeyDictionary()  # param -> {(dim, start, size): slice}
        self._averages: WeakIdKeyDictionary = WeakIdKeyDictionary()  # a -> {b -> _Average}
        self._fused: WeakIdKeyDictionary = WeakIdKeyDictionary()  # first param -> {ids: (buffer, views)}

    def slice_of(self, param: torch.Tensor, dim: int, start: int, size: int) -> torch.Tensor:
        """A contiguous copy of ``param.narrow(dim, start, size)``, made once."""
        held = self._slices.setdefault(param, {})
        key = (dim, start, size)
        if key not in held:
            _check_not_released(param, "a slice of it")
            # clone: a row slice is already contiguous, and .contiguous() would keep the full storage
            held[key] = param.detach().narrow(dim, start, size).clone(memory_format=torch.contiguous_format)
        return held[key]

    def average_of(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``(a + b) / 2`` elementwise (accumulated in at least fp32), made once and made again, in
        place, whenever ``a`` or ``b`` changed since: written in place (their version counter, as
        autograd keeps it) or given a new tensor (``param.data = t``)."""
        held = self._averages.setdefault(a, WeakIdKeyDictionary()).get(b)
        stamp = _stamp(a, b)
        if held is None:
            held = self._averages[a][b] = _Average(_mean(a, b), stamp)
        elif held.stamp != stamp:
            held.tensor.copy_(_mean(a, b))
            held.stamp = stamp
        return held.tensor

    def stacked(
        self, branches: tuple[list[torch.Tensor], list[torch.Tensor]], transposed: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A buffer ``[2, rows, in]`` holding branch A's parameters (concatenated along rows) in
        slice 0 and B's in slice 1 (``[2, in, out]`` for one transposed weight per branch), made
        once for these parameters; the parameters become views of it, so their values are kept and
        not held twice (see :mod:`lp_fx.fuse`). A parameter given a new tensor since
        (``param.data = t``) is copied into its view and pointed back at it. Returns the buffer
        and those views (A's, then B's)."""
        params = [*branches[0], *branches[1]]
        held_by_first = self._fused.setdefault(params[0], {})
        key = tuple(id(p) for p in params)
        if key in held_by_first:
            _point_back(params, held_by_first[key][1])
            return held_by_first[key]
        with torch.no_grad():
            buffer = torch.stack([
                branch[0].detach() if transposed else torch.cat([p.detach() for p in branch], dim=0)
                for branch in branches
            ])
        views = [
            view
            for b, branch in enumerate(branches)
            for view in ([buffer[b]] if transposed else torch.split(buffer[b], [p.shape[0] for p in branch], dim=0))
        ]
        for param, view in zip(params, views):
            param.data = view
        held_by_first[key] = (buffer, views)
        return buffer, views

    def averages(self) -> list[torch.Tensor]:
        """The averaged weights held now."""
        return [held.tensor for per_a in self._averages.values() for held in per_a.values()]

    def buffers(self) -> list[torch.Tensor]:
        """The fused weight buffers held now."""
        return [buffer for per_first in self._fused.values() for buffer, _ in per_first.values()]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor held now."""
        slices = [t for per_param in self._slices.values() for t in per_param.values()]
        return [*slices, *self.averages(), *self.buffers()]


@dataclass
class _Average:
    tensor: torch.Tensor
    stamp: tuple  # what the two parameters were when ``tensor`` was computed from them


def _point_back(params: Sequence[torch.Tensor], views: Sequence[torch.Tensor]) -> None:
    """Each parameter that was given a new tensor (``param.data = t``) copied into its view of a
    fused buffer and pointed back at it."""
    for param, view in zip(params, views):
        if param.data_ptr() != view.data_ptr():
            with torch.no_grad():
                view.copy_(param.detach())
            param.data = view


def _stamp(*tensors: torch.Tensor) -> tuple:
    """Where each tensor's data lives and how often it was written in place (None for inference
    tensors, which keep no version counter)."""
    return tuple((t.data_ptr(), t._version if not t.is_inference() else None) for t in tensors)


def _mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        total = a.detach().to(torch.promote_types(a.dtype, torch.float32)) + b.detach()
        return total.mul_(0.5).to(a.dtype)


def keep_own_weights(
    gm: fx.GraphModule, example_inputs: Sequence[Any], store: WeightStore
) -> tuple[Callable[[Sequence[Any]], int], dict[int, tuple[int, int, int]], int]:
    """Make ``gm`` read each sliced parameter as its slice and release the parameters it no
    longer reads. Returns the check to run before each call (the same for the parameters of each
    model the graph is called with: Dynamo reuses it for every model of the class), ``{input
    position: (dim, start, size)}`` of the slices to pass in place of parameters, and the bytes
    released for the model compiled.

    A parameter read only through one ``narrow`` keeps its placeholder, which then receives the
    contiguous slice instead of the parameter (so the compiled graph keeps its signature and its
    inputs' sources); the caller passes the slices in at call time (:meth:`WeightStore.slice_of`).
    """
    placeholders = gm.graph.find_nodes(op="placeholder")
    params = [(i, n, v) for i, (n, v) in enumerate(zip(placeholders, example_inputs)) if isinstance(v, torch.nn.Parameter)]
    shards, whole = {}, []
    for i, node, value in params:
        read_as = {u.meta.get("lp_fx_shard") for u in node.users}
        if len(read_as) == 1 and None not in read_as:
            shards[i] = read_as.pop()
            for narrow in list(node.users):
                narrow.replace_all_uses_with(node)
                gm.graph.erase_node(narrow)
            node.meta["example_value"] = store.slice_of(value, *shards[i])
        elif node.users:
            whole.append(i)
    gm.graph.lint()
    gm.recompile()
    release = _releasing_once_per_model([i for i, _, _ in params], shards, whole, store)
    return release, shards, release(example_inputs)


def _releasing_once_per_model(
    params: list[int], shards: dict[int, tuple[int, int, int]], whole: list[int], store: WeightStore
) -> Callable[[Sequence[Any]], int]:
    """The check that, the first time a model's parameters are passed, makes their slices and
    releases the storage of every parameter the graph does not read whole; returns the bytes released."""
    seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def release(args: Sequence[Any]) -> int:
        if not params or args[params[0]] in seen:
            return 0
        seen[args[params[0]]] = True
        for i, shard in shards.items():
            store.slice_of(args[i], *shard)
        for i in whole:
            _check_not_released(args[i], "the whole parameter")
        read = {s._cdata for i in whole for s in _storages(args[i])}
        released = 0
        for i in params:
            for storage in _storages(args[i]):
                if storage._cdata not in read and storage.nbytes():
                    released += storage.nbytes()
                    storage.resize_(0)
        return released

    return release


def refuse_gradients(option: str, example_inputs: Sequence[Any]) -> None:
    """Refuse ``option``, which gives the compiled graph tensors in place of the model's
    parameters, when a parameter of the graph would get a gradient: none would reach the model."""
    params = [v for v in example_inputs if isinstance(v, torch.nn.Parameter)]
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        raise LayerParallelError(
            f"{option} is for inference and does not train: the tensors it gives the compiled graph in place "
            "of the model's parameters are not them, so no gradient would reach the model. Compile and run "
            "under torch.no_grad() (or call model.requires_grad_(False))"
        )


def resident_bytes(model: torch.nn.Module, store: WeightStore | None = None) -> int:
    """Bytes of parameter memory this process holds for ``model`` and the backend's own tensors
    (a storage both share, as the fused buffers and the parameters that are views of them, counts once)."""
    return unique_bytes([*model.parameters(), *(store.tensors() if store is not None else [])])


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t``'s data (of its inner tensors for a subclass: int8 data plus scales)."""
    return sum(leaf.numel() * leaf.element_size() for leaf in _plain_tensors(t))


def slice_bytes(t: torch.Tensor, dim: int, start: int, size: int) -> int:
    """Bytes of ``t.narrow(dim, start, size)``, worked out on a fake copy: ``t`` may be released
    already, and a quantized weight's scales may or may not be sliced with it."""
    with FakeTensorMode() as mode:
        return tensor_bytes(mode.from_tensor(t).narrow(dim, start, size))


def _plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """``t``, or the plain tensors inside a tensor subclass such as torchao's quantized weights."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return [leaf for name in names for leaf in _plain_tensors(getattr(t, name))]
    return [t]


def _storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages holding ``t``'s data; ``_cdata`` identifies one, also after it was released."""
    return [leaf.untyped_storage() for leaf in _plain_tensors(t)]


def unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (tied weights share one)."""
    return sum({s._cdata: s.nbytes() for t in tensors for s in _storages(t)}.values())


def _check_not_released(param: torch.Tensor, what: str) -> None:
    if param.numel() and any(not s.nbytes() for s in _storages(param)):
        raise LayerParallelError(
            f"this graph reads {what} of a parameter of shape {tuple(param.shape)} that free_weights=True "
            "already released for another graph (the graphs of one model split its weights differently); "
            "use free_weights=False"
        )
