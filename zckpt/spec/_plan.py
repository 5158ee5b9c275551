"""Shard plans: which flat range of which tensor each rank writes and holds.

ZeRO layouts are deterministic functions of the skeleton and the spec, so a plan stores only
what is O(tensors + ranks) (each leaf's placement, the flat groups, the owner of every tensor
written whole) and computes any one rank's fragments from it by interval arithmetic, in time
proportional to that rank's own fragments. ``ShardPlan.writes`` still reads as every rank's
fragments (a lazy sequence, built per rank when asked for).
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, overload

import numpy as np

from zckpt.errors import SpecError
from zckpt.format._dtypes import dtype_name, torch_dtype
from zckpt.spec._spec import ZeroSpec
from zckpt.tree import Path, Skeleton, TensorMeta, skeleton_of

if TYPE_CHECKING:
    import torch

__all__ = ["FlatGroup", "Fragment", "Placement", "RankWrites", "ShardPlan", "plan_shards"]

# Placement kinds.
FLAT, TENSOR, REPLICATED, EMPTY, EXPERT = "flat", "tensor", "replicated", "empty", "expert"


class Fragment(NamedTuple):
    """Elements ``[start, stop)`` of tensor leaf ``leaf``, in row-major flat order.

    Example:
        >>> Fragment(leaf=0, start=4, stop=10).numel
        6
    """

    leaf: int
    start: int
    stop: int

    @property
    def numel(self) -> int:
        """Number of elements in the range."""
        return self.stop - self.start


class Placement(NamedTuple):
    """How one tensor leaf is laid out over ranks.

    ``kind`` is ``"flat"`` (in stage 1/2 flat group ``group``), ``"tensor"`` (partitioned on its
    own, stage 3), ``"replicated"`` (whole on every rank, written by ``owner``), ``"expert"``
    (a tensor of MoE expert ``expert``, written whole by ``owner`` into that expert's file) or
    ``"empty"`` (no elements; rebuilt from its meta).

    Example:
        >>> Placement("replicated", owner=1).owner
        1
    """

    kind: str
    group: int = -1
    owner: int = -1
    expert: int = -1


@dataclass(frozen=True, init=False)
class FlatGroup:
    """A stage 1/2 flat buffer: tensors concatenated, tail-padded, cut into equal partitions.

    Its dtype is kept by name (planning needs no torch); :attr:`dtype` is the torch dtype.

    Example:
        >>> import torch
        >>> g = FlatGroup("exp_avg", torch.float32, (0, 1), (0, 3), 5, 8, 4)
        >>> g.partition_range(1), g.dtype
        ((4, 8), torch.float32)
    """

    key: str
    dtype_name: str
    leaves: tuple[int, ...]
    offsets: tuple[int, ...]
    numel: int
    padded_numel: int
    partition_numel: int

    def __init__(
        self,
        key: str,
        dtype: torch.dtype | str,
        leaves: tuple[int, ...],
        offsets: tuple[int, ...],
        numel: int,
        padded_numel: int,
        partition_numel: int,
    ) -> None:
        values = (key, dtype_name(dtype), leaves, offsets, numel, padded_numel, partition_numel)
        for name, v in zip(self.__dataclass_fields__, values):
            object.__setattr__(self, name, v)

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype of the group's tensors (imports torch on first use)."""
        return torch_dtype(self.dtype_name)

    def partition_range(self, rank: int) -> tuple[int, int]:
        """``[start, stop)`` of ``rank``'s partition in the padded flat buffer."""
        return rank * self.partition_numel, (rank + 1) * self.partition_numel

    def fragments(self, lo: int, hi: int) -> list[Fragment]:
        """The pieces of the group's leaves in flat range ``[lo, hi)``, in flat order.

        Example:
            >>> FlatGroup("g", "float32", (3, 5), (0, 3), 5, 8, 4).fragments(2, 6)
            [Fragment(leaf=3, start=2, stop=3), Fragment(leaf=5, start=0, stop=2)]
        """
        hi = min(hi, self.numel)
        out: list[Fragment] = []
        if lo >= hi:
            return out
        offs = self.offsets
        i = bisect.bisect_right(offs, lo) - 1
        n = len(offs)
        while i < n and offs[i] < hi:
            end = offs[i + 1] if i + 1 < n else self.numel
            a, b = max(lo, offs[i]), min(hi, end)
            if a < b:
                out.append(Fragment(self.leaves[i], a - offs[i], b - offs[i]))
            i += 1
        return out


class RankWrites(Sequence[tuple[Fragment, ...]]):
    """``plan.writes``: every rank's written fragments, each rank's computed when indexed.

    Reads like the tuple of tuples it stands for (indexing, iteration, ``len``, equality with
    tuples); ``writes[r]`` costs O(rank r's fragments), not O(ranks x tensors).

    Example:
        >>> import torch
        >>> w = plan_shards({"master": {"w": torch.zeros(10)}}, ZeroSpec(2, 1)).writes
        >>> w[1], len(w), w == ((Fragment(0, 0, 6),), (Fragment(0, 6, 10),))
        ((Fragment(leaf=0, start=6, stop=10),), 2, True)
    """

    def __init__(self, plan: ShardPlan) -> None:
        self._plan = plan

    def __len__(self) -> int:
        return self._plan.world_size

    @overload
    def __getitem__(self, i: int) -> tuple[Fragment, ...]: ...

    @overload
    def __getitem__(self, i: slice) -> tuple[tuple[Fragment, ...], ...]: ...

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return tuple(self[r] for r in range(*i.indices(len(self))))
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"plan.writes indices must be ints, got {type(i).__name__}")
        r = i + len(self) if i < 0 else i
        if not 0 <= r < len(self):
            raise IndexError(f"rank {i} is out of range for world size {len(self)}")
        return self._plan.writes_of(r)

    def __iter__(self) -> Iterator[tuple[Fragment, ...]]:
        return (self._plan.writes_of(r) for r in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RankWrites) and other._plan is self._plan:
            return True
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(other) == len(self) and all(tuple(a) == b for a, b in zip(other, self))

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return repr(tuple(self))


@dataclass(frozen=True)
class _Layout:
    """What a plan derives once, in O(tensors + ranks), to answer per-rank questions."""

    offsets: tuple[int, ...]  # a flat leaf's offset in its group (-1 for other leaves)
    owned: dict[int, tuple[int, ...]]  # rank -> leaves it writes whole (replicated, expert)
    tensor_leaves: np.ndarray  # stage 3 partitioned leaves (int64)
    tensor_numel: np.ndarray  # their element counts (int64)
    group_parts: np.ndarray  # every flat group's partition size (int64)
    group_numel: np.ndarray  # every flat group's unpadded size (int64)
    replicated: tuple[int, ...]  # every replicated leaf, in leaf order
    expert_leaves: dict[int, tuple[int, ...]]  # expert id -> its leaves, in leaf order


@dataclass(frozen=True)
class ShardPlan:
    """Where every element of a state lives, for one spec. An immutable value.

    ``writes[r]`` lists the fragments rank ``r`` stores (each element of the state is written by
    exactly one rank); :meth:`holds` lists what a rank keeps in memory during training (its
    partitions plus every replicated tensor). Both are computed for one rank at a time, in time
    proportional to that rank's fragments; :meth:`writers` finds the saved fragments that
    overlap a range without listing any rank's.

    Example:
        >>> import torch
        >>> plan = plan_shards({"master": {"w": torch.zeros(10)}}, ZeroSpec(2, 1))
        >>> plan.writes
        ((Fragment(leaf=0, start=0, stop=6),), (Fragment(leaf=0, start=6, stop=10),))
    """

    spec: ZeroSpec
    skeleton: Skeleton
    placements: tuple[Placement, ...]
    groups: tuple[FlatGroup, ...]
    writes: Sequence[tuple[Fragment, ...]]
    num_experts: int = 0
    _layout: _Layout | None = field(default=None, repr=False, compare=False, hash=False)

    @property
    def world_size(self) -> int:
        """The spec's world size."""
        return self.spec.world_size

    def _lay(self) -> _Layout:
        lay = self._layout
        if lay is None:  # a plan built by hand from explicit writes
            lay = _derive(self.skeleton, self.placements, self.groups)
            object.__setattr__(self, "_layout", lay)
        return lay

    def writes_of(self, rank: int) -> tuple[Fragment, ...]:
        """The fragments ``rank`` writes, sorted, in O(its own fragments + groups).

        Example:
            >>> import torch
            >>> s = {"master": {"a": torch.zeros(3), "b": torch.zeros(5)}}
            >>> plan_shards(s, ZeroSpec(2, 2)).writes_of(0)
            (Fragment(leaf=0, start=0, stop=3), Fragment(leaf=1, start=0, stop=1))
        """
        self._check_rank(rank)
        if not isinstance(self.writes, RankWrites):
            return tuple(self.writes[rank])
        lay = self._lay()
        out: list[Fragment] = []
        if len(self.groups):
            lo = rank * lay.group_parts
            for g in np.flatnonzero(lo < lay.group_numel).tolist():
                grp = self.groups[g]
                p = grp.partition_numel
                out.extend(grp.fragments(rank * p, (rank + 1) * p))
        if len(lay.tensor_leaves):
            numel = lay.tensor_numel
            per = -(-numel // self.world_size)
            a = rank * per
            sel = np.flatnonzero(a < numel)
            b = np.minimum(numel[sel], a[sel] + per[sel])
            out.extend(map(Fragment, lay.tensor_leaves[sel].tolist(), a[sel].tolist(), b.tolist()))
        tensors = self.skeleton.tensors
        out.extend(Fragment(leaf, 0, tensors[leaf].numel) for leaf in lay.owned.get(rank, ()))
        out.sort()
        return tuple(out)

    def holds(self, rank: int) -> tuple[Fragment, ...]:
        """What ``rank`` keeps in memory: its own ranges and every replicated tensor, whole.

        Example:
            >>> import torch
            >>> s = {"module": {"w": torch.zeros(4)}, "master": {"w": torch.zeros(4)}}
            >>> plan_shards(s, ZeroSpec(2, 2)).holds(1)
            (Fragment(leaf=0, start=0, stop=4), Fragment(leaf=1, start=2, stop=4))
        """
        self._check_rank(rank)
        lay = self._lay()
        tensors = self.skeleton.tensors
        out = [f for f in self.writes_of(rank) if self.placements[f.leaf].kind in (FLAT, TENSOR)]
        out.extend(Fragment(leaf, 0, tensors[leaf].numel) for leaf in lay.replicated)
        ep = self.spec.expert_parallel_size
        for expert, leaves in lay.expert_leaves.items():
            if rank % ep != self._expert_slot(expert):
                continue
            for leaf in leaves:
                f = self._expert_holding(leaf, rank)
                if f is not None:
                    out.append(f)
        out.sort()
        return tuple(out)

    def writers(self, leaf: int, start: int, stop: int) -> list[tuple[int, Fragment]]:
        """``(rank, fragment)`` for every written fragment overlapping ``[start, stop)`` of
        ``leaf``, in element order, computed from the layout (no rank's list is built).

        Example:
            >>> import torch
            >>> plan = plan_shards({"master": {"w": torch.zeros(10)}}, ZeroSpec(4, 3))
            >>> [(r, f.start, f.stop) for r, f in plan.writers(0, 2, 7)]
            [(0, 0, 3), (1, 3, 6), (2, 6, 9)]
        """
        meta = self.skeleton.tensors[leaf]
        start, stop = max(0, start), min(stop, meta.numel)
        if start >= stop:
            return []
        p = self.placements[leaf]
        if p.kind in (REPLICATED, EXPERT):
            return [(p.owner, Fragment(leaf, 0, meta.numel))]
        if p.kind == TENSOR:
            per = -(-meta.numel // self.world_size)
            return [
                (r, Fragment(leaf, r * per, min(meta.numel, (r + 1) * per)))
                for r in range(start // per, (stop - 1) // per + 1)
            ]
        if p.kind != FLAT:
            return []
        off = self._lay().offsets[leaf]
        part = self.groups[p.group].partition_numel
        out = []
        for r in range((off + start) // part, (off + stop - 1) // part + 1):
            a, b = max(r * part, off), min((r + 1) * part, off + meta.numel)
            out.append((r, Fragment(leaf, a - off, b - off)))
        return out

    def expert_leaves(self, expert: int) -> tuple[int, ...]:
        r"""The leaves of MoE expert ``expert`` (what its own file holds), in leaf order.

        Example:
            >>> import torch
            >>> s = {"module": {f"experts.{e}.w": torch.zeros(2) for e in range(2)}}
            >>> plan_shards(s, ZeroSpec(2, 1, experts=(r"experts\.(\d+)\.",))).expert_leaves(1)
            (1,)
        """
        return self._lay().expert_leaves.get(expert, ())

    def expert_ranks(self, expert: int) -> tuple[int, ...]:
        r"""The ranks holding ``expert``: its expert-data-parallel group.

        Example:
            >>> import torch
            >>> s = {"module": {f"experts.{e}.w": torch.zeros(2) for e in range(4)}}
            >>> spec = ZeroSpec(4, 1, experts=(r"experts\.(\d+)\.",), expert_parallel_size=2)
            >>> plan_shards(s, spec).expert_ranks(3)
            (1, 3)
        """
        ep = self.spec.expert_parallel_size
        return tuple(range(self._expert_slot(expert), self.world_size, ep))

    def _expert_slot(self, expert: int) -> int:
        return expert // (self.num_experts // self.spec.expert_parallel_size)

    def _expert_holding(self, leaf: int, rank: int) -> Fragment | None:
        """``rank``'s part of expert leaf ``leaf`` (rank in the expert's group)."""
        meta = self.skeleton.tensors[leaf]
        path = self.skeleton.paths[leaf]
        if not meta.shape or (self.spec.stage < 3 and self.spec.is_module_path(path)):
            return Fragment(leaf, 0, meta.numel)
        ep = self.spec.expert_parallel_size
        size = self.world_size // ep
        per = -(-meta.numel // size)
        i = rank // ep
        a, b = i * per, min(meta.numel, (i + 1) * per)
        return Fragment(leaf, a, b) if a < b else None

    def _check_rank(self, rank: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise SpecError(f"rank {rank!r} is out of range for world size {self.world_size}")


def _param_index(spec: ZeroSpec) -> dict[str, tuple[int, int]]:
    return {n: (g, i) for g, names in enumerate(spec.param_groups) for i, n in enumerate(names)}


def _group_key(
    path: Path, meta: TensorMeta, params: dict[str, tuple[int, int]]
) -> tuple[tuple[Any, ...], int]:
    """(group identity, order within the group) of a stage 1/2 partitioned leaf."""
    for j in range(len(path) - 1, -1, -1):
        k = path[j]
        if isinstance(k, str) and k in params:
            g, order = params[k]
            rest = tuple(map(str, path[:j] + path[j + 1 :]))
            return (rest, f"torch.{meta.dtype_name}", g), order
    return (tuple(map(str, path[:-1])), f"torch.{meta.dtype_name}", -1), 0


def _derive(
    skel: Skeleton, placements: Sequence[Placement], groups: Sequence[FlatGroup]
) -> _Layout:
    offsets = [-1] * len(placements)
    for g in groups:
        for leaf, off in zip(g.leaves, g.offsets):
            offsets[leaf] = off
    owned: dict[int, list[int]] = {}
    tensor_leaves: list[int] = []
    replicated: list[int] = []
    experts: dict[int, list[int]] = {}
    for leaf, p in enumerate(placements):
        if p.kind in (REPLICATED, EXPERT):
            owned.setdefault(p.owner, []).append(leaf)
            if p.kind == REPLICATED:
                replicated.append(leaf)
            else:
                experts.setdefault(p.expert, []).append(leaf)
        elif p.kind == TENSOR:
            tensor_leaves.append(leaf)
    tl = np.array(tensor_leaves, dtype=np.int64)
    return _Layout(
        tuple(offsets),
        {r: tuple(v) for r, v in owned.items()},
        tl,
        np.array([skel.tensors[i].numel for i in tensor_leaves], dtype=np.int64),
        np.array([g.partition_numel for g in groups], dtype=np.int64),
        np.array([g.numel for g in groups], dtype=np.int64),
        tuple(replicated),
        {e: tuple(v) for e, v in sorted(experts.items())},
    )


def _add_even(load: np.ndarray, total: int, part: int, nbytes_per: int) -> None:
    """Add the bytes of ``total`` elements cut into ``part``-sized pieces over ranks 0, 1, ..."""
    if total <= 0 or part <= 0:
        return
    full, rest = divmod(total, part)
    load[0] += part * nbytes_per
    load[full] -= part * nbytes_per  # a difference array: ranks [0, full) get a whole part
    if rest:
        load[full] += rest * nbytes_per
        load[full + 1] -= rest * nbytes_per


def plan_shards(state: Any, spec: ZeroSpec) -> ShardPlan:
    """Plan which flat range of which tensor each rank owns, for a state (or its skeleton).

    Only shapes and dtypes are read, so the state may be a :class:`~zckpt.tree.Skeleton` and a
    checkpoint can be planned for a new world size from its header alone. Planning costs
    O(tensors + ranks) (plus O(log ranks) per tensor written whole); no rank's fragment list is
    built until asked for.

    Args:
        state: a pytree of tensors and values, or its skeleton.
        spec: the partition spec.

    Returns:
        An immutable :class:`ShardPlan`.

    Example:
        >>> import torch
        >>> state = {"module": {"w": torch.zeros(3)}, "master": {"w": torch.zeros(3)}}
        >>> plan = plan_shards(state, ZeroSpec(world_size=2, stage=3))
        >>> plan.writes[1]
        (Fragment(leaf=0, start=2, stop=3), Fragment(leaf=1, start=2, stop=3))
    """
    if not isinstance(spec, ZeroSpec):
        raise SpecError(f"spec must be a ZeroSpec, got {type(spec).__name__}")
    skel = skeleton_of(state)
    ws = spec.world_size
    params = _param_index(spec)
    tensors = skel.tensors
    numels = [m.numel for m in tensors]
    items = [m.itemsize for m in tensors]
    experts = spec.experts_of(skel.paths) if spec.experts else None
    kinds: list[str] = []
    replicated: list[int] = []
    group_of: dict[int, int] = {}
    group_members: dict[tuple[Any, ...], list[tuple[int, int]]] = {}
    group_ids: dict[tuple[Any, ...], int] = {}
    stage3 = spec.stage == 3
    module = spec.module
    has_replicate = bool(spec.replicate)
    # Bytes each rank writes, as a difference array (partitions cover a prefix of the ranks).
    load = np.zeros(ws + 2, dtype=np.int64)
    for leaf, path in enumerate(skel.paths):
        numel = numels[leaf]
        meta = tensors[leaf]
        if numel == 0:
            kinds.append(EMPTY)
        elif experts is not None and experts[leaf] is not None:
            kinds.append(EXPERT)
        elif not meta.shape or (has_replicate and spec.is_replicated_path(path)):
            kinds.append(REPLICATED)
            replicated.append(leaf)
        elif stage3:
            kinds.append(TENSOR)
            _add_even(load, numel, -(-numel // ws), items[leaf])
        elif path and str(path[0]) == module:
            kinds.append(REPLICATED)
            replicated.append(leaf)
        else:
            key, order = _group_key(path, meta, params)
            gid = group_ids.setdefault(key, len(group_ids))
            group_members.setdefault(key, []).append((order, leaf))
            group_of[leaf] = gid
            kinds.append(FLAT)

    groups: list[FlatGroup] = []
    for key, members in group_members.items():
        members.sort()  # stable on leaf order for equal keys
        leaves = tuple(leaf for _, leaf in members)
        offsets, total = [], 0
        for leaf in leaves:
            offsets.append(total)
            total += numels[leaf]
        padded = spec.padded(total)
        part = padded // ws
        meta = tensors[leaves[0]]
        name = "/".join(key[0]) + f"[{key[1]}, group {key[2]}]"
        groups.append(FlatGroup(name, meta.dtype_name, leaves, tuple(offsets), total, padded, part))
        _add_even(load, total, part, meta.itemsize)

    # Experts: each expert's tensors are written whole, into its own file, by one rank of the
    # expert's group (experts are spread over the group's ranks).
    ids = [e for e in experts if e is not None] if experts is not None else []
    num_experts = 1 + max(ids, default=-1)
    ep = spec.expert_parallel_size
    if num_experts % ep:
        raise SpecError(f"{num_experts} experts cannot be split over expert_parallel_size {ep}")
    loads: list[int] = np.cumsum(load[:ws]).tolist()
    owner: dict[int, int] = {}
    if ids:
        size = ws // ep  # ranks in an expert's group: slot, slot + ep, slot + 2 ep, ...
        per_slot = num_experts // ep
        for leaf, kind in enumerate(kinds):
            if kind == EXPERT:
                e = experts[leaf]  # type: ignore[index]
                writer = owner[leaf] = e // per_slot + (e % size) * ep  # type: ignore[operator]
                loads[writer] += numels[leaf] * items[leaf]

    # Replicated leaves: written once, largest first to the least-loaded rank (LPT scheduling).
    heap = [(loads[r], r) for r in range(ws)]
    heapq.heapify(heap)
    for leaf in sorted(replicated, key=lambda i: (-numels[i] * items[i], i)):
        lo, rank = heapq.heappop(heap)
        owner[leaf] = rank
        heapq.heappush(heap, (lo + numels[leaf] * items[leaf], rank))

    placements: list[Placement] = []
    for leaf, kind in enumerate(kinds):
        if kind == FLAT:
            placements.append(Placement(FLAT, group_of[leaf]))
        elif kind == REPLICATED:
            placements.append(Placement(REPLICATED, -1, owner[leaf]))
        elif kind == EXPERT:
            placements.append(Placement(EXPERT, -1, owner[leaf], experts[leaf]))  # type: ignore[index,arg-type]
        else:
            placements.append(Placement(kind))

    frozen_placements = tuple(placements)
    frozen_groups = tuple(groups)
    plan = ShardPlan(
        spec,
        skel,
        frozen_placements,
        frozen_groups,
        (),
        num_experts,
        _derive(skel, frozen_placements, frozen_groups),
    )
    object.__setattr__(plan, "writes", RankWrites(plan))
    return plan
