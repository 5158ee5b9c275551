"""Boxes: a rank's rectangular block of a tensor, as a distributed tensor (DTensor) lays it out.

A :class:`Box` is offsets and sizes per dimension of a global tensor. Its elements are, in
row-major order, a few runs contiguous in the flat tensor (:func:`box_runs`): one for a block of
whole rows (``Shard(0)``), one per row for a block of columns (``Shard(1)``). Each run is a
:class:`~zckpt.spec.Fragment` of the tensor's leaf, so a box is saved, indexed and read by the
same fragment machinery as a ZeRO partition.

:func:`mesh_box` computes which box a mesh coordinate holds with DTensor's own chunking rules
(``torch.chunk``: ``ceil(size / n)`` per chunk, the last ones short or empty), for a placement
per mesh dimension given as the tensor dimension it shards, or None for a replica. It is pure:
world size, mesh shape and coordinate are arguments, so the boxes of every rank of an 8-rank
2-D mesh are planned in one process. ``zckpt/dist/_dtensor.py`` reads these values off a real
DTensor.

Example:
    >>> mesh_box((5, 4), (2,), (1,), (0,))          # Shard(0) over 2 ranks: rows 3..4
    Box(offsets=(3, 0), sizes=(2, 4))
    >>> box_runs((5, 4), mesh_box((5, 4), (2,), (1,), (1,)))   # Shard(1): one run per row
    [(2, 0, 2), (6, 2, 2), (10, 4, 2), (14, 6, 2), (18, 8, 2)]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from zckpt.errors import SpecError

__all__ = ["Box", "box_runs", "box_writer", "mesh_box", "mesh_coordinate"]


class Box(NamedTuple):
    """The block ``[offsets[d], offsets[d] + sizes[d])`` of each dimension ``d`` of a tensor.

    Example:
        >>> Box((2, 0), (2, 6)).numel
        12
    """

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Elements in the box."""
        return math.prod(self.sizes)


def box_runs(shape: Sequence[int], box: Box) -> list[tuple[int, int, int]]:
    """``(flat start in the tensor, flat start in the box, elements)`` of each run of the box
    that is contiguous in the row-major tensor, in order (the box's own row-major order: run
    ``k`` starts where run ``k - 1`` ends in the box). An empty box has no run.

    Example:
        >>> box_runs((4, 6), Box((2, 0), (2, 6)))  # whole rows: one run
        [(12, 0, 12)]
        >>> box_runs((4, 6), Box((0, 3), (2, 3)))  # columns: one run per row
        [(3, 0, 3), (9, 3, 3)]
        >>> box_runs((), Box((), ())), box_runs((0, 3), Box((0, 0), (0, 3)))
        ([(0, 0, 1)], [])
    """
    sizes, offsets = box.sizes, box.offsets
    if math.prod(sizes) == 0:
        return []
    j = len(shape)
    while j > 0 and sizes[j - 1] == shape[j - 1]:
        j -= 1  # dims j.. are whole: the box is contiguous from dim j-1 on
    if j == 0:
        return [(0, 0, math.prod(shape))]
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    run = sizes[j - 1] * strides[j - 1]
    base = sum(o * s for o, s in zip(offsets, strides))
    out = []
    outer = sizes[: j - 1]
    count = math.prod(outer)
    for k in range(count):
        at, rest = base, k
        for d in range(j - 2, -1, -1):  # the k-th outer index, row-major
            rest, i = divmod(rest, outer[d])
            at += i * strides[d]
        out.append((at, k * run, run))
    return out


def _check_mesh(
    shape: Sequence[int],
    mesh_shape: Sequence[int],
    coordinate: Sequence[int],
    shard_dims: Sequence[int | None],
) -> None:
    if not len(mesh_shape) == len(coordinate) == len(shard_dims):
        raise SpecError(
            f"a mesh of shape {list(mesh_shape)} needs one coordinate and one placement per "
            f"dimension, got {list(coordinate)} and {list(shard_dims)}"
        )
    for m, (n, c, d) in enumerate(zip(mesh_shape, coordinate, shard_dims)):
        if n < 1 or not 0 <= c < n:
            raise SpecError(f"mesh dimension {m}: coordinate {c} is outside its size {n}")
        if d is not None and not 0 <= d < len(shape):
            raise SpecError(
                f"mesh dimension {m} shards tensor dimension {d} of a {len(shape)}-d tensor"
            )


def mesh_coordinate(mesh_shape: Sequence[int], rank: int) -> tuple[int, ...]:
    """The coordinate of ``rank`` in a device mesh of ``mesh_shape`` laid out row-major over
    the ranks, as ``init_device_mesh`` lays out ``torch.arange(world_size)``.

    Raises:
        SpecError: ``rank`` is outside the mesh.

    Example:
        >>> mesh_coordinate((2, 3), 4)
        (1, 1)
        >>> mesh_coordinate((4,), 3)
        (3,)
    """
    if not 0 <= rank < math.prod(mesh_shape):
        raise SpecError(f"rank {rank} is outside a mesh of shape {tuple(mesh_shape)}")
    out = []
    for n in reversed(mesh_shape):
        rank, c = divmod(rank, n)
        out.append(c)
    return tuple(reversed(out))


def mesh_box(
    shape: Sequence[int],
    mesh_shape: Sequence[int],
    coordinate: Sequence[int],
    shard_dims: Sequence[int | None],
) -> Box:
    """The box of a tensor of ``shape`` that mesh ``coordinate`` holds, as DTensor chunks it.

    ``shard_dims[m]`` is the tensor dimension that mesh dimension ``m`` shards (``Shard(d)``), or
    None when the tensor is replicated over it (``Replicate()``). Mesh dimensions apply left to
    right: one that shards a dimension already sharded splits the chunk it is given again. A
    chunk is ``ceil(size / n)`` elements, the last chunks shorter or empty, as ``torch.chunk``
    (and DTensor's ``Shard``) cut them; an empty box lies at the end of its dimension.

    Raises:
        SpecError: the coordinate, mesh and placements do not agree.

    Example:
        >>> mesh_box((5,), (4,), (3,), (0,))               # ceil(5/4) = 2: [6, 5) is empty
        Box(offsets=(5,), sizes=(0,))
        >>> mesh_box((4, 6), (2, 3), (1, 2), (0, 1))        # 2-D mesh: (Shard(0), Shard(1))
        Box(offsets=(2, 4), sizes=(2, 2))
        >>> mesh_box((4, 6), (2, 3), (1, 2), (None, 1))     # (Replicate(), Shard(1))
        Box(offsets=(0, 4), sizes=(4, 2))
    """
    _check_mesh(shape, mesh_shape, coordinate, shard_dims)
    offsets = [0] * len(shape)
    sizes = list(shape)
    for n, c, d in zip(mesh_shape, coordinate, shard_dims):
        if d is None:
            continue
        size = sizes[d]
        chunk = -(-size // n)
        start = min(size, chunk * c)
        sizes[d] = max(0, min(size, start + chunk) - start)
        offsets[d] += start
    return Box(tuple(offsets), tuple(sizes))


def box_writer(coordinate: Sequence[int], shard_dims: Sequence[int | None]) -> bool:
    """Whether mesh ``coordinate`` writes its box: the ranks of a replicated mesh dimension hold
    the same box, and the one at coordinate 0 on every such dimension writes it (once).

    Example:
        >>> box_writer((0, 1), (None, 1)), box_writer((1, 1), (None, 1))
        (True, False)
    """
    return all(c == 0 for c, d in zip(coordinate, shard_dims) if d is None)
