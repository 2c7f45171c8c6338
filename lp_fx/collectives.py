"""The two DTensor operations placement inserts into a graph, and the mesh they run on.

- :func:`sum_over` (Megatron's "g"): every rank holds a partial result; forward all-reduces it
  (``Partial("sum")`` -> ``Replicate()``), backward is the identity.
- :func:`copy_to` (Megatron's "f"): a replicated input read by a partial computation; forward
  is the identity, backward all-reduces the gradient (``to_local(grad_placements=[Partial])``).

Both become ``call_function`` nodes whose target closes over the mesh; AOTAutograd traces them
to ``_c10d_functional.all_reduce`` + ``wait_tensor`` (forward of ``sum_over`` only).

:func:`branch_mesh` views a mesh of 2k ranks as 2 x k for pairs whose branches are
tensor-parallel over k ranks each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate

from .config import LayerParallelError

_AUTO_MESHES: dict[tuple[str, int], DeviceMesh] = {}
_BRANCH_MESHES: dict[tuple[str, tuple[int, ...]], DeviceMesh] = {}


def resolve_mesh(mesh: Any, example_inputs: Sequence[Any]) -> DeviceMesh:
    """``config.mesh`` as a 1-D :class:`DeviceMesh` (``"auto"``: one over the default group)."""
    if isinstance(mesh, str) and mesh == "auto":
        return _auto_mesh(example_inputs)
    if not isinstance(mesh, DeviceMesh):
        raise LayerParallelError(f"mesh must be a 1-D torch.distributed DeviceMesh or 'auto', got {mesh!r}")
    if mesh.ndim != 1:
        raise LayerParallelError(f"mesh must be 1-D, got a {mesh.ndim}-D mesh {tuple(mesh.shape)}")
    return mesh


def _auto_mesh(example_inputs: Sequence[Any]) -> DeviceMesh:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise LayerParallelError(
            "mesh='auto' needs an initialised default process group: launch with torchrun and call "
            "torch.distributed.init_process_group() before compiling (or pass a DeviceMesh)"
        )
    device = next((t.device.type for t in example_inputs if isinstance(t, torch.Tensor)), "cpu")
    key = (device, dist.get_world_size())
    if key not in _AUTO_MESHES:
        _AUTO_MESHES[key] = init_device_mesh(device, (key[1],))
    return _AUTO_MESHES[key]


def branch_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D ``mesh`` of 2k ranks as a 2-D mesh ``("branch", "shard")`` of shape (2, k).

    ``["shard"]`` holds the k ranks of one branch (mesh positions ``[0, k)`` or ``[k, 2k)``),
    ``["branch"]`` the two ranks with the same position inside their branch. Creating it creates
    process groups, a collective call: every rank compiles the same graphs in the same order, so
    every rank reaches it together. Cached per mesh, so later graphs reuse the groups.
    """
    ranks = mesh.mesh.flatten()
    key = (mesh.device_type, tuple(ranks.tolist()))
    if key not in _BRANCH_MESHES:
        _BRANCH_MESHES[key] = DeviceMesh(mesh.device_type, ranks.reshape(2, -1), mesh_dim_names=("branch", "shard"))
    return _BRANCH_MESHES[key]


def sum_over(mesh: DeviceMesh) -> Callable[[torch.Tensor], torch.Tensor]:
    """A graph target that sums a per-rank partial tensor over ``mesh`` (one all-reduce)."""

    def sum_over_mesh(x: torch.Tensor) -> torch.Tensor:
        partial = DTensor.from_local(x, mesh, [Partial("sum")], run_check=False)
        return partial.redistribute(mesh, [Replicate()]).to_local()

    sum_over_mesh.lp_fx_collective = True
    return sum_over_mesh


def copy_to(mesh: DeviceMesh) -> Callable[[torch.Tensor], torch.Tensor]:
    """A graph target that is the identity forward and sums the gradient over ``mesh``."""

    def copy_to_mesh(x: torch.Tensor) -> torch.Tensor:
        replicated = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
        return replicated.to_local(grad_placements=[Partial("sum")])

    return copy_to_mesh


def insert_after(node: fx.Node, target: Callable, users: Callable[[fx.Node], bool] | None = None) -> fx.Node:
    """``target(node)`` right after ``node``; uses of ``node`` (those ``users`` accepts) read it instead."""
    with node.graph.inserting_after(node):
        new = node.graph.call_function(target, (node,))
    new.meta.update({k: v for k, v in node.meta.items() if k in ("example_value", "nn_module_stack", "stack_trace")})
    keep = users or (lambda user: True)
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new and keep(user))
    return new


def count_collectives(gm: fx.GraphModule) -> int:
    """How many :func:`sum_over` nodes (forward all-reduces) the graph holds."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and getattr(n.target, "lp_fx_collective", False))
