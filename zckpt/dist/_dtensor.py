"""DTensors as :class:`~zckpt.shard.LocalBox` values: the one place zckpt reads a DTensor.

A DTensor (``torch.distributed.tensor``; what FSDP2's ``fully_shard`` and tensor parallelism
make a model's parameters and optimizer state) is a global tensor of which this rank holds one
block, its local tensor. :func:`local_box` reads its placements and mesh coordinate and computes
that block with the pure :func:`~zckpt.spec.mesh_box` (DTensor's own chunking rules), checked
against the local tensor's shape; everything after (fragments, blobs, manifest, reads straight
into the local tensor) is zckpt's one mechanism.

Supported placements: ``Shard(d)`` for any ``d`` and ``Replicate()``, on meshes of any number of
dimensions (a mesh dimension sharding a dimension already sharded splits it again). Refused,
with a :class:`~zckpt.errors.StateError` naming the tensor: ``Partial()`` (a pending reduction:
its local values are not the tensor's), ``_StridedShard`` (FSDP2 over a tensor-parallel
dimension, an interleaved layout), and any local tensor whose shape is not the block DTensor's
chunking gives (padded or custom layouts).

The ``torch.distributed`` modules are not imported here to find out whether a value is a
DTensor: if ``torch.distributed.tensor`` was never imported, no DTensor exists.

Example:
    >>> import torch
    >>> local_box(torch.zeros(3), "w") is None      # a plain tensor is not a box
    True
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from zckpt.errors import StateError
from zckpt.shard import LocalBox
from zckpt.spec import box_writer, mesh_box
from zckpt.tree import Skeleton

__all__ = ["is_dtensor", "local_box", "local_boxes"]


def is_dtensor(x: Any) -> bool:
    """Whether ``x`` is a DTensor (without importing ``torch.distributed``).

    Example:
        >>> import torch
        >>> is_dtensor(torch.ones(1)), is_dtensor(3)
        (False, False)
    """
    mod = sys.modules.get("torch.distributed.tensor")
    cls = getattr(mod, "DTensor", None) if mod is not None else None
    return cls is not None and isinstance(x, cls)


def _shard_dims(t: Any, where: str) -> list[int | None]:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    out: list[int | None] = []
    for m, p in enumerate(t.placements):
        if isinstance(p, _StridedShard):
            raise StateError(
                f"{where}: placement {p} on mesh dimension {m} (strided sharding, as FSDP2 over "
                "a tensor-parallel dimension makes) is not supported; save it with DCP, or "
                "redistribute it to Shard/Replicate placements"
            )
        if isinstance(p, Shard):
            out.append(p.dim % max(1, t.dim()))
        elif isinstance(p, Replicate):
            out.append(None)
        else:
            raise StateError(
                f"{where}: placement {p} on mesh dimension {m} is not supported (a Partial "
                "placement's local values are not the tensor's: redistribute it to Replicate() "
                "first); zckpt saves Shard(d) and Replicate() placements"
            )
    return out


def local_box(t: Any, where: str) -> LocalBox | None:
    """``t``'s local block as a :class:`~zckpt.shard.LocalBox` if ``t`` is a DTensor, else None.

    Raises:
        StateError: a placement zckpt does not save, a rank outside the DTensor's mesh, or a
            local tensor that is not the block DTensor's chunking gives; named by ``where``.
    """
    if not is_dtensor(t):
        return None
    dims = _shard_dims(t, where)
    mesh = t.device_mesh
    coord = mesh.get_coordinate()
    if coord is None:
        raise StateError(f"{where}: this rank is not in the DTensor's device mesh")
    shape = tuple(int(s) for s in t.shape)
    box = mesh_box(shape, tuple(mesh.shape), tuple(coord), dims)
    local = t._local_tensor.detach()
    if tuple(local.shape) != box.sizes:
        raise StateError(
            f"{where}: the local tensor has shape {tuple(local.shape)}, DTensor's chunking of "
            f"{list(shape)} over mesh {tuple(mesh.shape)} with {t.placements} at coordinate "
            f"{tuple(coord)} gives {box.sizes}: an uneven layout zckpt cannot place"
        )
    return LocalBox(shape, box, local, box_writer(coord, dims))


def local_boxes(skel: Skeleton, leaves: Sequence[Any], world_size: int) -> dict[int, LocalBox]:
    """The :class:`~zckpt.shard.LocalBox` of each DTensor leaf of a flattened state (leaf
    index -> box); empty, at the cost of one dict lookup, when no DTensor can exist.

    Raises:
        StateError: as :func:`local_box`, or a DTensor whose mesh does not span the
            ``world_size`` ranks that save (each box must be written by exactly one rank).

    Example:
        >>> import torch, zckpt
        >>> skel, leaves = zckpt.tree.flatten({"w": torch.ones(2)})
        >>> local_boxes(skel, leaves, 1)
        {}
    """
    if "torch.distributed.tensor" not in sys.modules:
        return {}
    out: dict[int, LocalBox] = {}
    for leaf, t in enumerate(leaves):
        b = local_box(t, skel.name(leaf))
        if b is None:
            continue
        n = t.device_mesh.size()
        if n != world_size:
            raise StateError(
                f"{skel.name(leaf)}: its DTensor's mesh has {n} ranks, the save {world_size}: "
                "zckpt saves DTensors whose mesh spans every saving rank (every rank calls "
                "save_checkpoint with comm=zckpt.dist.TorchComm())"
            )
        out[leaf] = b
    return out
