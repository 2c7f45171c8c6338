"""With ``free_weights=True``: each rank keeps in memory only the weights it computes with.

After placement a rank's graph reads some parameters whole (its branch of a pair, replicated
layers, embedding and head), some only through ``narrow`` slices (tensor-parallel linears) and
some not at all (the other rank's branch). Here the slices become contiguous copies, held by the
backend object and passed to the compiled graph in place of the parameter (prefill and decode
graphs share them), and the
storage of every parameter the graph no longer reads is released with
``untyped_storage().resize_(0)``, as FSDP does: the parameter keeps its shape, dtype and strides,
so Dynamo's guards still hold and nothing recompiles, but its memory is returned.

This is for inference: the copies are not the model's parameters, so no gradient would reach the
model; a graph compiled with gradients enabled is refused. The model is not usable outside the
compiled forward afterwards (reading a released parameter raises).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from .config import LayerParallelError


class WeightStore:
    """The slices one backend object holds, shared by all of its graphs."""

    def __init__(self) -> None:
        self.slices: dict[tuple[int, int, int, int], torch.Tensor] = {}

    def slice_of(self, param: torch.Tensor, dim: int, start: int, size: int) -> torch.Tensor:
        """A contiguous copy of ``param.narrow(dim, start, size)``, made once."""
        key = (id(param), dim, start, size)
        if key not in self.slices:
            _check_not_released(param, "a slice of it")
            # clone: a row slice is already contiguous, and .contiguous() would keep the full storage
            self.slices[key] = param.detach().narrow(dim, start, size).clone(memory_format=torch.contiguous_format)
        return self.slices[key]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.slices.values())


def keep_own_weights(
    gm: fx.GraphModule, example_inputs: Sequence[Any], store: WeightStore
) -> tuple[dict[int, torch.Tensor], int]:
    """Make ``gm`` read each sliced parameter as its slice and release the parameters it no
    longer reads; returns ``{input position: slice to pass there}`` and the bytes released.

    A parameter read only through one ``narrow`` keeps its placeholder, which then receives the
    contiguous slice instead of the parameter (so the compiled graph keeps its signature and its
    inputs' sources); the caller passes the slices in at call time.
    """
    params = [(i, n, v) for i, (n, v) in enumerate(zip(_placeholders(gm), example_inputs))
              if isinstance(v, torch.nn.Parameter)]
    if torch.is_grad_enabled() and any(v.requires_grad for _, _, v in params):
        raise LayerParallelError(
            "free_weights=True is for inference: compile and run under torch.no_grad() (or call "
            "model.requires_grad_(False)); gradients would not reach the released parameters"
        )
    slices = {}
    for i, node, value in params:
        shards = {u.meta.get("lp_fx_shard") for u in node.users}
        if len(shards) == 1 and None not in shards:
            slices[i] = store.slice_of(value, *shards.pop())
            for narrow in list(node.users):
                narrow.replace_all_uses_with(node)
                gm.graph.erase_node(narrow)
            node.meta["example_value"] = slices[i]
        elif node.users:
            _check_not_released(value, "the whole parameter")
    gm.graph.lint()
    gm.recompile()
    read = {_storage_key(v) for i, n, v in params if n.users and i not in slices}
    released = 0
    for _, _, value in params:
        storage = value.untyped_storage()
        if _storage_key(value) not in read and storage.nbytes():
            released += storage.nbytes()
            storage.resize_(0)
    return slices, released


def resident_bytes(model: torch.nn.Module, store: WeightStore | None = None) -> int:
    """Bytes of parameter memory this process holds for ``model`` (and the backend's slices)."""
    storages = {}
    for p in model.parameters():
        storages[_storage_key(p)] = p.untyped_storage().nbytes()
    return sum(storages.values()) + (store.nbytes() if store is not None else 0)


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _storage_key(t: torch.Tensor) -> int:
    """Identifies a storage, also after it was released (tied weights share one)."""
    return t.untyped_storage()._cdata


def _check_not_released(param: torch.Tensor, what: str) -> None:
    if param.numel() and not param.untyped_storage().nbytes():
        raise LayerParallelError(
            f"this graph reads {what} of a parameter of shape {tuple(param.shape)} that free_weights=True "
            "already released for another graph (the graphs of one model split its weights differently); "
            "use free_weights=False"
        )
