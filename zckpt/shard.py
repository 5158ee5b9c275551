"""Shard records: the fragments of a state one rank writes, with their data.

A :class:`Shard` is the unit that :func:`zckpt.encode_shard` turns into a blob. Two paths build
one and meet in the same record: :func:`shard_state` slices a full (replicated) state by a plan,
and :func:`shard_from_local` wraps the already-partitioned flat buffers a ZeRO optimizer holds
(its fp32 master and optimizer-state partitions), without materialising the full state on any
rank. Either way the fragment data are views of the caller's tensors: nothing is copied.
A distributed tensor (a DTensor of FSDP2 or tensor parallelism) is a :class:`LocalBox`: the
rank's block of the global tensor, saved as the block's runs contiguous in the flat tensor
(``shard_state(..., boxes=...)``), whatever the plan says of that leaf.

Example:
    >>> import torch, zckpt
    >>> state = {"master": {"w": torch.arange(6.0)}, "step": 3}
    >>> plan = zckpt.plan_shards(state, zckpt.ZeroSpec(world_size=2, stage=1))
    >>> shard = zckpt.shard_state(state, plan, rank=1)
    >>> shard.fragments, shard.data[0].tolist()
    ((Fragment(leaf=0, start=4, stop=6),), [4.0, 5.0])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from zckpt.errors import SpecError, StateError
from zckpt.spec import Box, Fragment, ShardPlan, ZeroSpec, box_runs, box_writer, mesh_box
from zckpt.spec._plan import FLAT, REPLICATED
from zckpt.tree import Skeleton, flatten

if TYPE_CHECKING:
    import torch

__all__ = ["LocalBox", "Shard", "shard_from_local", "shard_state"]


@dataclass(frozen=True, eq=False)
class Shard:
    """One rank's stored part of a state: fragments and their 1-D data, plus the skeleton.

    ``data[i]`` is a 1-D tensor of ``skeleton.tensors[fragments[i].leaf].dtype`` with
    ``fragments[i].numel`` elements. Every shard carries the whole skeleton, so any single blob
    describes the full state (names, shapes, dtypes, plain values).

    Example:
        >>> import torch, zckpt
        >>> s = {"master": {"w": torch.ones(4)}}
        >>> sh = zckpt.shard_state(s, zckpt.plan_shards(s, zckpt.ZeroSpec(1, 2)), 0)
        >>> sh.rank, sh.nbytes
        (0, 16)
    """

    rank: int
    spec: ZeroSpec
    skeleton: Skeleton
    fragments: tuple[Fragment, ...]
    data: tuple[torch.Tensor, ...]

    def __post_init__(self) -> None:
        if len(self.fragments) != len(self.data):
            raise StateError(
                f"shard of rank {self.rank}: {len(self.fragments)} fragments but "
                f"{len(self.data)} data tensors"
            )
        n = len(self.skeleton.tensors)
        for f, d in zip(self.fragments, self.data):
            if not 0 <= f.leaf < n:
                raise StateError(f"shard of rank {self.rank}: fragment leaf {f.leaf} out of range")
            meta = self.skeleton.tensors[f.leaf]
            name = self.skeleton.name(f.leaf)
            if not 0 <= f.start < f.stop <= meta.numel:
                raise StateError(
                    f"{name}: range [{f.start}, {f.stop}) is outside its {meta.numel} elements"
                )
            if d.dtype != meta.dtype or d.dim() != 1 or d.numel() != f.numel:
                raise StateError(
                    f"{name}: fragment [{f.start}, {f.stop}) needs a 1-D {meta.dtype} tensor of "
                    f"{f.numel} elements, got {d.dtype} of shape {tuple(d.shape)}"
                )

    @property
    def nbytes(self) -> int:
        """Bytes of fragment data."""
        return sum(d.numel() * d.element_size() for d in self.data)


@dataclass(frozen=True, eq=False)
class LocalBox:
    """A rank's block (:class:`~zckpt.spec.Box`) of a global tensor of ``shape``, held in
    ``data`` (a tensor of shape ``box.sizes``, on any device): what a DTensor's local tensor is.

    ``writes`` says whether this rank saves the box; False for a replica that another rank of
    a replicated mesh dimension saves. As an ``into=`` destination of
    :func:`zckpt.load_checkpoint`, the box's elements are read straight into ``data``.

    Raises:
        StateError: the box is not inside ``shape`` or ``data`` is not of the box's shape.

    Example:
        >>> import torch
        >>> full = torch.arange(12.0).reshape(3, 4)
        >>> b = LocalBox.of(full, mesh_shape=(2,), coordinate=(1,), shard_dims=(1,))
        >>> b.box, b.data.tolist()
        (Box(offsets=(0, 2), sizes=(3, 2)), [[2.0, 3.0], [6.0, 7.0], [10.0, 11.0]])
        >>> [(f.start, f.stop, at) for f, at in b.runs(leaf=0)]
        [(2, 4, 0), (6, 8, 2), (10, 12, 4)]
    """

    shape: tuple[int, ...]
    box: Box
    data: torch.Tensor
    writes: bool = True

    def __post_init__(self) -> None:
        shape, (offsets, sizes) = self.shape, self.box
        if len(offsets) != len(shape) or len(sizes) != len(shape):
            raise StateError(f"box {self.box} does not have the {len(shape)} dims of {shape}")
        for d, (o, n, m) in enumerate(zip(offsets, sizes, shape)):
            if n < 0 or o < 0 or o + n > m:
                raise StateError(f"box {self.box}: dim {d} is outside the tensor's {shape}")
        if tuple(self.data.shape) != sizes:
            raise StateError(
                f"box {self.box} of {shape}: the local tensor has shape "
                f"{tuple(self.data.shape)}, not the box's {sizes}"
            )

    def runs(self, leaf: int) -> list[tuple[Fragment, int]]:
        """Each run of the box contiguous in the flat tensor, as a fragment of ``leaf``, with
        where it starts in the box's own (row-major, flat) elements."""
        return [(Fragment(leaf, g, g + n), at) for g, at, n in box_runs(self.shape, self.box)]

    @staticmethod
    def of(
        full: torch.Tensor,
        mesh_shape: tuple[int, ...],
        coordinate: tuple[int, ...],
        shard_dims: tuple[int | None, ...],
    ) -> LocalBox:
        """The box a mesh coordinate holds of ``full`` (:func:`~zckpt.spec.mesh_box`), its data
        copied out: what DTensor's ``distribute_tensor`` gives that rank, without a process
        group (tests and harnesses)."""
        shape = tuple(int(s) for s in full.shape)
        box = mesh_box(shape, mesh_shape, coordinate, shard_dims)
        data = full
        for d, (o, n) in enumerate(zip(*box)):
            data = data.narrow(d, o, n)
        import torch

        copy = data.clone(memory_format=torch.contiguous_format)
        return LocalBox(shape, box, copy, box_writer(coordinate, shard_dims))


def _flat_view(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)


def shard_state(
    state: Any, plan: ShardPlan, rank: int, boxes: Mapping[int, LocalBox] | None = None
) -> Shard:
    """The shard ``rank`` writes, cut from a full state (views, no copies for contiguous leaves).

    Args:
        state: the full state, with the skeleton the plan was made for.
        plan: from :func:`zckpt.plan_shards`.
        rank: ``0 <= rank < plan.world_size``.
        boxes: tensor leaves this rank holds as a block of a distributed tensor (leaf index ->
            :class:`LocalBox`): such a leaf is written as the runs of its box (none when the
            box is a replica another rank writes), not as the plan cuts it; its entry in
            ``state`` is not read.

    Raises:
        SpecError: the rank is out of range, or the state (or a box) does not match the plan.

    Example:
        >>> import torch, zckpt
        >>> s = {"master": {"w": torch.arange(5.0)}}
        >>> p = zckpt.plan_shards(s, zckpt.ZeroSpec(world_size=2, stage=3))
        >>> zckpt.shard_state(s, p, 0).data[0].tolist()
        [0.0, 1.0, 2.0]
    """
    plan._check_rank(rank)
    skel, leaves = flatten(state)
    if skel.tensors != plan.skeleton.tensors or skel.paths != plan.skeleton.paths:
        raise SpecError(_mismatch(skel, plan.skeleton))
    if not boxes:
        flat: dict[int, torch.Tensor] = {}
        data = []
        for f in plan.writes[rank]:
            if f.leaf not in flat:
                flat[f.leaf] = _flat_view(_plain(leaves[f.leaf], skel, f.leaf))
            data.append(flat[f.leaf][f.start : f.stop])
        return Shard(rank, plan.spec, skel, plan.writes[rank], tuple(data))
    pieces: list[tuple[Fragment, torch.Tensor]] = []
    views: dict[int, torch.Tensor] = {}
    for f in plan.writes[rank]:
        if f.leaf not in boxes:
            if f.leaf not in views:
                views[f.leaf] = _flat_view(_plain(leaves[f.leaf], skel, f.leaf))
            pieces.append((f, views[f.leaf][f.start : f.stop]))
    for leaf, b in boxes.items():
        meta = skel.tensors[leaf] if 0 <= leaf < len(skel.tensors) else None
        if meta is None or meta.shape != b.shape or meta.dtype != b.data.dtype:
            got = "no such leaf" if meta is None else f"{meta.dtype} {list(meta.shape)}"
            raise SpecError(
                f"box of leaf {leaf}: a {b.data.dtype} block of {list(b.shape)}, the state "
                f"has {got}"
            )
        if b.writes:
            local = _flat_view(b.data)
            pieces += [(f, local[at : at + f.numel]) for f, at in b.runs(leaf)]
    pieces.sort(key=lambda p: (p[0].leaf, p[0].start))
    frags = tuple(f for f, _ in pieces)
    return Shard(rank, plan.spec, skel, frags, tuple(d for _, d in pieces))


def _plain(t: torch.Tensor, skel: Skeleton, leaf: int) -> torch.Tensor:
    """``t``, refused if it is a distributed tensor (whose flat view is not its memory)."""
    if hasattr(t, "device_mesh") and hasattr(t, "placements"):
        raise SpecError(
            f"{skel.name(leaf)}: a distributed tensor (DTensor) must be given as a LocalBox "
            "(save_checkpoint does this for each rank's DTensors)"
        )
    return t


def _mismatch(got: Skeleton, want: Skeleton) -> str:
    if got.paths != want.paths:
        extra = sorted(map(str, set(got.paths) - set(want.paths)))[:3]
        missing = sorted(map(str, set(want.paths) - set(got.paths)))[:3]
        return (
            f"the state's tensors differ from the plan's: missing {missing}, unexpected {extra}"
            if extra or missing
            else "the state's tensors are in a different order than the plan's"
        )
    for i, (a, b) in enumerate(zip(got.tensors, want.tensors)):
        if a != b:
            return (
                f"{want.name(i)}: the state has {a.dtype} {list(a.shape)}, "
                f"the plan expects {b.dtype} {list(b.shape)}"
            )
    return "the state does not match the plan"


def shard_from_local(
    plan: ShardPlan,
    rank: int,
    groups: Mapping[int, torch.Tensor],
    tensors: Mapping[int, torch.Tensor],
) -> Shard:
    """The shard ``rank`` writes, built from the partitioned buffers a ZeRO optimizer holds.

    Args:
        plan: the plan of the whole (never materialised) state; a
            :class:`~zckpt.tree.Skeleton` of it is enough to make one.
        rank: this rank.
        groups: for each stage 1/2 flat group index ``g`` that has fragments on this rank, this
            rank's 1-D partition of the flat buffer (``plan.groups[g].partition_numel`` elements,
            or fewer when the tail padding is left out).
        tensors: for each other leaf this rank writes, its data: the rank's 1-D partition of a
            stage 3 tensor, or the whole tensor for a replicated leaf this rank owns.

    Raises:
        SpecError: a buffer is missing or has the wrong dtype or size.

    Example:
        >>> import torch, zckpt
        >>> skel, _ = zckpt.tree.flatten({"master": {"a": torch.zeros(5), "b": torch.zeros(3)}})
        >>> plan = zckpt.plan_shards(skel, zckpt.ZeroSpec(world_size=2, stage=1))
        >>> local = torch.tensor([4.0, 10.0, 11.0, 12.0])   # rank 1's partition: a[4:], b[:3]
        >>> sh = zckpt.shard_from_local(plan, 1, {0: local}, {})
        >>> [(f.leaf, f.start, f.stop) for f in sh.fragments], sh.data[1].tolist()
        ([(0, 4, 5), (1, 0, 3)], [10.0, 11.0, 12.0])
    """
    plan._check_rank(rank)
    skel = plan.skeleton
    data = []
    for f in plan.writes[rank]:
        p = plan.placements[f.leaf]
        meta = skel.tensors[f.leaf]
        name = skel.name(f.leaf)
        if p.kind == FLAT:
            g = plan.groups[p.group]
            buf = groups.get(p.group)
            if buf is None:
                raise SpecError(
                    f"rank {rank}: no partition given for flat group {p.group} ({g.key})"
                )
            off = g.offsets[g.leaves.index(f.leaf)] + f.start - rank * g.partition_numel
            src, what = buf, f"flat group {p.group} ({g.key})"
        else:
            given = tensors.get(f.leaf)
            if given is None:
                raise SpecError(f"rank {rank}: no data given for {name}")
            src = given
            off = 0 if p.kind == REPLICATED else f.start - rank * -(-meta.numel // plan.world_size)
            what = name
        src = _flat_view(src)
        if src.dtype != meta.dtype or src.numel() < off + f.numel:
            raise SpecError(
                f"rank {rank}: {what} must be a {meta.dtype} buffer of at least "
                f"{off + f.numel} elements, got {src.dtype} with {src.numel()}"
            )
        data.append(src[off : off + f.numel])
    return Shard(rank, plan.spec, skel, plan.writes[rank], tuple(data))
