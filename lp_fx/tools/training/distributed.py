"""Fine-tuning on a device mesh: each rank computes its part of the pairing, and the updates agree.

One process per rank (torchrun); the gradients of every rank are completed with one all-reduce
before the optimizer step (:func:`sync_gradients`), so each rank applies the single-device update.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
import torch.distributed as dist

from lp_fx import collectives


class Ranks:
    """Training on a device mesh: each rank computes its part; the updates agree everywhere.

    After backward, gradients are completed across ranks (:func:`sync_gradients`), so every rank
    sees the same gradient norm and clips alike; each rank then updates only the parameters its
    graph reads (the branch it computes and the shared weights). Before a checkpoint every
    trained tensor is sent from the first rank that trains it, so rank 0 writes the whole result.
    """

    def __init__(self, mesh: Any, backend: Any) -> None:
        self.group = mesh.get_group()
        self.rank, self.world = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.backend = backend
        self._counts: list[float] | None = None  # ranks reading each parameter whole: fixed once compiled

    @property
    def use(self) -> dict[int, str]:
        return parameter_use(self.backend.reports)

    def complete_gradients(self, params: Sequence[torch.Tensor]) -> None:
        use = self.use
        if self._counts is None:
            self._counts = whole_read_counts(params, use, self.group)
        sync_gradients(params, use, self._counts, self.group)

    def drop_gradients_not_read(self, params: Sequence[torch.Tensor]) -> None:
        use = self.use
        for param in params:
            if id(param) not in use:
                param.grad = None

    def gather_to_all(self, model: nn.Module, names: Sequence[str]) -> None:
        use = self.use
        tensors = dict(model.named_parameters())
        owners = torch.tensor([self.rank if id(tensors[n]) in use else self.world for n in names])
        dist.all_reduce(owners, op=dist.ReduceOp.MIN, group=self.group)
        with torch.no_grad():
            for name, owner in zip(names, owners.tolist()):
                if owner < self.world:
                    dist.broadcast(tensors[name].data, src=dist.get_global_rank(self.group, owner), group=self.group)


def resolve_mesh(mesh: Any, model: nn.Module) -> Any:
    """A ``DeviceMesh``, or ``"auto"``: the backend's mesh over the default process group."""
    return collectives.resolve_mesh(mesh, [next(model.parameters())])


def parameter_use(reports: Sequence[Any]) -> dict[int, str]:
    """How this rank's graphs read each parameter (``id`` -> ``"whole"``/``"slice"``)."""
    use: dict[int, str] = {}
    for report in reports:
        use.update(report.parameter_use or {})
    return use


def whole_read_counts(params: Sequence[torch.Tensor], use: dict[int, str], group: Any) -> list[float]:
    """For each parameter, the number of ranks whose graph reads it whole (one all-reduce)."""
    whole = torch.tensor([float(use.get(id(p)) == "whole") for p in params], dtype=torch.float64)
    dist.all_reduce(whole, group=group)
    return whole.tolist()


def sync_gradients(params: Sequence[torch.Tensor], use: dict[int, str], counts: Sequence[float], group: Any) -> None:
    """Complete every gradient across ranks, so that each rank holds the single-device one.

    Under placement a rank reads a parameter whole (its branch of a pair, or a replicated
    weight: its gradient there is already the full one, the same on every rank that reads it
    whole), through slices (tensor parallel: the gradient is zero outside them), or not at all
    (the other branch: no gradient). The sum over ranks, with whole-read gradients divided by the
    number of ranks that read them whole (``counts``, :func:`whole_read_counts`), is the full
    gradient: one all-reduce of all the gradients, which then are views of its buffer.
    """
    grads = []
    for param, count in zip(params, counts):
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        grads.append(grad / count if use.get(id(param)) == "whole" and count > 1 else grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    for param, piece in zip(params, flat.split([p.numel() for p in params])):
        param.grad = piece.view_as(param)
