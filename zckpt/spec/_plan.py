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
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import chain
from typing import TYPE_CHECKING, Any, NamedTuple, overload

from zckpt._lazy import lazy_module
from zckpt.errors import SpecError
from zckpt.format._dtypes import ITEMSIZE_OF_NAME, dtype_name, torch_dtype
from zckpt.format._tree_index import ColumnSkeleton
from zckpt.spec._spec import ZeroSpec
from zckpt.tree import Path, Skeleton, TensorMeta, _gc_paused, skeleton_of

if TYPE_CHECKING:
    import numpy as np
    import torch
else:
    np = lazy_module("numpy")  # planning a v1 manifest's checkpoint needs none

__all__ = [
    "FlatGroup",
    "Fragment",
    "Placement",
    "Placements",
    "RankWrites",
    "ShardPlan",
    "plan_shards",
]

# Placement kinds.
FLAT, TENSOR, REPLICATED, EMPTY, EXPERT = "flat", "tensor", "replicated", "empty", "expert"


def _itemsize(name: str) -> int:
    """Bytes per element of the named dtype (from the format's table: no torch needed)."""
    n = ITEMSIZE_OF_NAME.get(name)
    return n if n is not None else torch_dtype(name).itemsize


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


# Placement kinds as the small codes a plan's arrays hold, and back.
_KINDS = (FLAT, TENSOR, REPLICATED, EMPTY, EXPERT)
_CODE = {k: i for i, k in enumerate(_KINDS)}
_FLAT, _TENSOR, _REPLICATED, _EMPTY, _EXPERT = range(5)


class Placements(Sequence[Placement]):
    """``plan.placements``: every leaf's :class:`Placement`, held as arrays and made when read.

    Reads like the tuple it stands for (indexing, iteration, ``len``, equality with tuples);
    a plan of a few hundred thousand leaves builds no object per leaf until one is asked for.

    Example:
        >>> import torch
        >>> p = plan_shards({"master": {"w": torch.zeros(4)}, "n": torch.ones(())}, ZeroSpec(2, 3))
        >>> p.placements[1], p.placements == (Placement("tensor"), Placement("replicated", owner=0))
        (Placement(kind='replicated', group=-1, owner=0, expert=-1), True)
    """

    def __init__(
        self, kinds: np.ndarray, groups: np.ndarray, owners: np.ndarray, experts: np.ndarray
    ) -> None:
        self._arrays = (kinds, groups, owners, experts)
        self._lists: tuple[list[int], list[int], list[int], list[int]] | None = None
        self._reads = 0  # leaves read one at a time from the arrays, before the lists are made

    def _cols(self) -> tuple[list[int], list[int], list[int], list[int]]:
        if self._lists is None:
            k, g, o, e = (a.tolist() for a in self._arrays)
            self._lists = (k, g, o, e)
        return self._lists

    def __len__(self) -> int:
        return len(self._arrays[0])

    @overload
    def __getitem__(self, i: int) -> Placement: ...

    @overload
    def __getitem__(self, i: slice) -> tuple[Placement, ...]: ...

    def __getitem__(self, i: int | slice) -> Any:
        if self._lists is None and type(i) is int and self._reads < len(self) >> 4:
            # A few leaves (a loading rank's sources): no list of every leaf's fields.
            self._reads += 1
            ka, ga, oa, ea = self._arrays
            return Placement(_KINDS[ka[i]], int(ga[i]), int(oa[i]), int(ea[i]))
        k, g, o, e = self._cols()
        if isinstance(i, slice):
            return tuple(map(Placement, map(_KINDS.__getitem__, k[i]), g[i], o[i], e[i]))
        return Placement(_KINDS[k[i]], g[i], o[i], e[i])

    def __iter__(self) -> Iterator[Placement]:
        k, g, o, e = self._cols()
        return map(Placement, map(_KINDS.__getitem__, k), g, o, e)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Placements):
            return all(np.array_equal(a, b) for a, b in zip(self._arrays, other._arrays))
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(other) == len(self) and all(a == b for a, b in zip(self, other))

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return repr(tuple(self))


@dataclass(frozen=True)
class _Layout:
    """What a plan derives once, in O(tensors + ranks) array operations, to answer per-rank
    questions in time proportional to the rank's own fragments."""

    kind_codes: np.ndarray  # every leaf's placement kind code (int8)
    owner_ids: np.ndarray  # every leaf's owner (-1: not written whole)
    flat_offsets: np.ndarray  # a flat leaf's offset in its group (-1 for other leaves)
    owned_ranks: np.ndarray  # the owners of the leaves written whole, sorted (int64)
    owned_leaves: np.ndarray  # those leaves, in the same order (by owner, then leaf)
    tensor_leaves: np.ndarray  # stage 3 partitioned leaves (int64)
    tensor_numel: np.ndarray  # their element counts (int64)
    group_parts: np.ndarray  # every flat group's partition size (int64)
    group_numel: np.ndarray  # every flat group's unpadded size (int64)
    replicated: tuple[int, ...]  # every replicated leaf, in leaf order
    expert_leaves: dict[int, tuple[int, ...]]  # expert id -> its leaves, in leaf order
    numels: list[int]  # every leaf's element count

    # The per-leaf columns as lists, for lookups one leaf at a time (made when first used: a
    # loading rank's new plan never asks for most of them).
    @cached_property
    def kinds(self) -> list[int]:
        out: list[int] = self.kind_codes.tolist()
        return out

    @cached_property
    def owners(self) -> list[int]:
        out: list[int] = self.owner_ids.tolist()
        return out

    @cached_property
    def offsets(self) -> list[int]:
        out: list[int] = self.flat_offsets.tolist()
        return out

    def owned(self, rank: int) -> list[int]:
        """The leaves ``rank`` writes whole, in leaf order (O(log leaves + its own))."""
        a, b = np.searchsorted(self.owned_ranks, (rank, rank + 1))
        out: list[int] = self.owned_leaves[a:b].tolist()
        return out


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
    placements: Sequence[Placement]
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

    def writes_of(self, rank: int, experts: bool = True) -> tuple[Fragment, ...]:
        r"""The fragments ``rank`` writes, sorted, in O(its own fragments + groups).

        ``experts=False`` leaves out the MoE expert tensors the rank writes (they go to each
        expert's own file, :meth:`expert_writes`): what the rank's own blob holds.

        Example:
            >>> import torch
            >>> s = {"master": {"a": torch.zeros(3), "b": torch.zeros(5)}}
            >>> plan_shards(s, ZeroSpec(2, 2)).writes_of(0)
            (Fragment(leaf=0, start=0, stop=3), Fragment(leaf=1, start=0, stop=1))
            >>> moe = {"master": {"experts.0.w": torch.zeros(2), "b": torch.zeros(2)}}
            >>> plan = plan_shards(moe, ZeroSpec(1, 3, experts=(r"experts\.(\d+)\.",)))
            >>> len(plan.writes_of(0)), plan.writes_of(0, experts=False)
            (2, (Fragment(leaf=1, start=0, stop=2),))
        """
        self._check_rank(rank)
        if not isinstance(self.writes, RankWrites):
            listed = tuple(self.writes[rank])
            if experts:
                return listed
            kinds = self._lay().kinds
            return tuple(f for f in listed if kinds[f.leaf] != _EXPERT)
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
        numels, owned = lay.numels, lay.owned(rank)
        if not experts:
            kinds = lay.kinds
            owned = [leaf for leaf in owned if kinds[leaf] != _EXPERT]
        out.extend(Fragment(leaf, 0, numels[leaf]) for leaf in owned)
        out.sort()
        return tuple(out)

    def expert_writes(self, expert: int) -> tuple[Fragment, ...]:
        r"""The fragments of MoE expert ``expert``'s own file: its tensors, whole, in leaf order.

        Example:
            >>> import torch
            >>> s = {"master": {f"experts.{e}.w": torch.zeros(2 + e) for e in range(2)}}
            >>> plan_shards(s, ZeroSpec(2, 3, experts=(r"experts\.(\d+)\.",))).expert_writes(1)
            (Fragment(leaf=1, start=0, stop=3),)
        """
        numels = self._lay().numels
        return tuple(Fragment(leaf, 0, numels[leaf]) for leaf in self.expert_leaves(expert))

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
        kinds, numels = lay.kinds, lay.numels
        out = [f for f in self.writes_of(rank) if kinds[f.leaf] <= _TENSOR]
        out.extend(Fragment(leaf, 0, numels[leaf]) for leaf in lay.replicated)
        ep = self.spec.expert_parallel_size
        mine = [v for e, v in lay.expert_leaves.items() if rank % ep == self._expert_slot(e)]
        if mine:
            # The rank's part of each tensor of its experts: whole for 0-d tensors (and module
            # weights under stages 1-2), else its slice over the expert's group of ranks.
            leaves = np.fromiter(chain.from_iterable(mine), dtype=np.int64)
            info = _leaves(self.skeleton)
            numel = info.numel[leaves]
            whole = info.scalar[leaves]
            if self.spec.stage < 3:
                whole |= _is_module(self.skeleton, leaves, self.spec.module)
            per = -(-numel // (self.world_size // ep))
            a = np.where(whole, 0, (rank // ep) * per)
            b = np.where(whole, numel, np.minimum(numel, a + per))
            keep = a < b
            out.extend(map(Fragment, leaves[keep].tolist(), a[keep].tolist(), b[keep].tolist()))
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
        lay = self._lay()
        numel = lay.numels[leaf]
        start, stop = max(0, start), min(stop, numel)
        if start >= stop:
            return []
        kind = lay.kinds[leaf]
        if kind in (_REPLICATED, _EXPERT):
            return [(lay.owners[leaf], Fragment(leaf, 0, numel))]
        if kind == _TENSOR:
            per = -(-numel // self.world_size)
            return [
                (r, Fragment(leaf, r * per, min(numel, (r + 1) * per)))
                for r in range(start // per, (stop - 1) // per + 1)
            ]
        if kind != _FLAT:
            return []
        off = lay.offsets[leaf]
        part = self.groups[self.placements[leaf].group].partition_numel
        out = []
        for r in range((off + start) // part, (off + stop - 1) // part + 1):
            a, b = max(r * part, off), min((r + 1) * part, off + numel)
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


def _cache(skel: Skeleton) -> dict[Any, Any]:
    """Per-skeleton values that every plan of it needs (a skeleton is immutable; a load plans
    one skeleton twice, at the saved spec and the new one)."""
    cache: dict[Any, Any] | None = skel.__dict__.get("_plan_cache")
    if cache is None:
        cache = {}
        object.__setattr__(skel, "_plan_cache", cache)
    return cache


class _Leaves(NamedTuple):
    numels: list[int]
    numel: np.ndarray  # int64
    items: np.ndarray  # bytes per element, int64
    scalar: np.ndarray  # 0-d tensors (bool)


def _leaves(skel: Skeleton) -> _Leaves:
    cache = _cache(skel)
    info: _Leaves | None = cache.get("leaves")
    if info is None and isinstance(skel, ColumnSkeleton):  # sizes straight from the columns
        s = skel.sizes
        info = cache["leaves"] = _Leaves(s.numel.tolist(), s.numel, s.itemsize, s.scalar)
    if info is None:
        tensors = skel.tensors
        n = len(tensors)
        shapes = [m.shape for m in tensors]
        dtypes = [m.dtype_name for m in tensors]
        numels = list(map(math.prod, shapes))
        try:
            numel = np.array(numels, dtype=np.int64).reshape(n)
        except OverflowError:
            big = next(i for i, x in enumerate(numels) if x > 2**63 - 1)
            raise SpecError(
                f"{skel.name(big)}: {numels[big]} elements do not fit in 64 bits"
            ) from None
        size = {d: _itemsize(d) for d in set(dtypes)}
        items = np.fromiter(map(size.__getitem__, dtypes), dtype=np.int64, count=n)
        scalar = np.fromiter(map(len, shapes), dtype=np.int64, count=n) == 0
        info = cache["leaves"] = _Leaves(numels, numel, items, scalar)
    return info


def _expert_ids(skel: Skeleton, spec: ZeroSpec) -> np.ndarray:
    cache = _cache(skel)
    key = ("experts", spec.experts)
    ids: np.ndarray | None = cache.get(key)
    if ids is None:
        if isinstance(skel, ColumnSkeleton) and not skel.built:
            ids = cache[key] = spec._expert_ids_tree(skel.index)
        else:
            ids = cache[key] = spec._expert_ids(skel.paths)
    return ids


def _paths_of(skel: Skeleton, leaves: list[int]) -> list[Path]:
    """The paths of some leaves: a columnar skeleton walks a few up its tree rather than build
    every path (the leaves a plan needs paths for are the few outside the experts, as a rule)."""
    if isinstance(skel, ColumnSkeleton) and not skel.built and 4 * len(leaves) < len(skel):
        return [skel.index.path(i) for i in leaves]
    paths = skel.paths
    return [paths[i] for i in leaves]


def _is_module(skel: Skeleton, leaves: np.ndarray, module: str) -> np.ndarray:
    """Whether each leaf's path starts with the key ``module`` (``spec.is_module_path``)."""
    if isinstance(skel, ColumnSkeleton) and not skel.built:
        tree = skel.index
        tops = tree.top_nodes()[leaves]
        firsts, which = np.unique(tops, return_inverse=True)
        ok = [t >= 0 and str(tree.component(t)) == module for t in firsts.tolist()]
        out: np.ndarray = np.array(ok, dtype=bool)[which.reshape(-1)]
        return out
    paths = skel.paths
    return np.array([bool(paths[i]) and str(paths[i][0]) == module for i in leaves.tolist()], bool)


def _derive(
    skel: Skeleton, placements: Sequence[Placement], groups: Sequence[FlatGroup]
) -> _Layout:
    """The layout of a plan built by hand from its placements."""
    if isinstance(placements, Placements):
        kinds, _, owners, experts = placements._arrays
    else:
        kinds = np.array([_CODE[p.kind] for p in placements], dtype=np.int8).reshape(-1)
        owners = np.array([p.owner for p in placements], dtype=np.int64).reshape(-1)
        experts = np.array([p.expert for p in placements], dtype=np.int64).reshape(-1)
    return _layout(skel, kinds, owners, experts, groups)


def _layout(
    skel: Skeleton,
    kinds: np.ndarray,
    owners: np.ndarray,
    experts: np.ndarray,
    groups: Sequence[FlatGroup],
) -> _Layout:
    info = _leaves(skel)
    offsets = np.full(len(kinds), -1, dtype=np.int64)
    for g in groups:
        offsets[list(g.leaves)] = g.offsets
    whole = np.flatnonzero((kinds == _REPLICATED) | (kinds == _EXPERT))
    by_owner = whole[np.argsort(owners[whole], kind="stable")]
    tensor_leaves = np.flatnonzero(kinds == _TENSOR)
    exp = np.flatnonzero(kinds == _EXPERT)
    exp = exp[np.argsort(experts[exp], kind="stable")]
    ids, firsts = np.unique(experts[exp], return_index=True)
    bounds = [*firsts.tolist(), len(exp)]
    expert_leaves = {
        e: tuple(exp[bounds[i] : bounds[i + 1]].tolist()) for i, e in enumerate(ids.tolist())
    }
    return _Layout(
        kinds,
        owners,
        offsets,
        owners[by_owner],
        by_owner,
        tensor_leaves,
        info.numel[tensor_leaves],
        np.array([g.partition_numel for g in groups], dtype=np.int64),
        np.array([g.numel for g in groups], dtype=np.int64),
        tuple(np.flatnonzero(kinds == _REPLICATED).tolist()),
        expert_leaves,
        info.numels,
    )


def _add_even(load: np.ndarray, totals: np.ndarray, parts: np.ndarray, items: np.ndarray) -> None:
    """Add the bytes of each ``totals[i]`` elements cut into ``parts[i]``-sized pieces over
    ranks 0, 1, ..., to the difference array ``load`` (ranks [0, full) get a whole part)."""
    keep = (totals > 0) & (parts > 0)
    totals, parts, items = totals[keep], parts[keep], items[keep]
    full, rest = np.divmod(totals, parts)
    load[0] += int((parts * items).sum())
    np.subtract.at(load, full, parts * items)
    r = rest > 0
    np.add.at(load, full[r], rest[r] * items[r])
    np.subtract.at(load, full[r] + 1, rest[r] * items[r])


def plan_shards(state: Any, spec: ZeroSpec) -> ShardPlan:
    """Plan which flat range of which tensor each rank owns, for a state (or its skeleton).

    Only shapes and dtypes are read, so the state may be a :class:`~zckpt.tree.Skeleton` and a
    checkpoint can be planned for a new world size from its header alone. Planning costs
    O(tensors + ranks) array operations (plus O(log ranks) per tensor written whole by the
    least-loaded rank); no rank's fragment list is built until asked for.

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
    with _gc_paused():
        return _plan(skel, spec)


def _plan(skel: Skeleton, spec: ZeroSpec) -> ShardPlan:
    ws = spec.world_size
    tensors = skel.tensors
    n = len(tensors)
    info = _leaves(skel)
    numel, items = info.numel, info.items
    eids = _expert_ids(skel, spec) if spec.experts else np.full(n, -1, dtype=np.int64)

    # Each leaf's kind, decided in this order: empty, expert, replicated (0-d or under a
    # replicate prefix), stage 3 tensor, module (replicated), flat group member.
    empty = numel == 0
    expert = (eids >= 0) & ~empty
    rep = ~empty & ~expert & info.scalar
    if spec.replicate:
        maybe = np.flatnonzero(~empty & ~expert & ~rep).tolist()
        for i, path in zip(maybe, _paths_of(skel, maybe)):
            if spec.is_replicated_path(path):
                rep[i] = True
    rest = np.flatnonzero(~empty & ~expert & ~rep)
    kinds = np.full(n, _EMPTY, dtype=np.int8)
    kinds[expert] = _EXPERT
    kinds[rep] = _REPLICATED
    groups_of = np.full(n, -1, dtype=np.int64)
    groups: list[FlatGroup] = []
    if spec.stage == 3:
        kinds[rest] = _TENSOR
    else:
        in_module = _is_module(skel, rest, spec.module)
        kinds[rest[in_module]] = _REPLICATED
        flat: list[int] = rest[~in_module].tolist()
        kinds[flat] = _FLAT
        params = _param_index(spec)
        members: dict[tuple[Any, ...], list[tuple[int, int]]] = {}
        for leaf, path in zip(flat, _paths_of(skel, flat)):
            key, order = _group_key(path, tensors[leaf], params)
            members.setdefault(key, []).append((order, leaf))
        numels = info.numels
        for gid, (key, group) in enumerate(members.items()):
            group.sort()  # stable on leaf order for equal keys
            leaves = tuple(leaf for _, leaf in group)
            offsets, total = [], 0
            for leaf in leaves:
                offsets.append(total)
                total += numels[leaf]
            padded = spec.padded(total)
            name = "/".join(key[0]) + f"[{key[1]}, group {key[2]}]"
            dtype = tensors[leaves[0]].dtype_name
            groups.append(
                FlatGroup(name, dtype, leaves, tuple(offsets), total, padded, padded // ws)
            )
            groups_of[list(leaves)] = gid

    # Bytes each rank writes, as a difference array (partitions cover a prefix of the ranks).
    load = np.zeros(ws + 2, dtype=np.int64)
    tl = np.flatnonzero(kinds == _TENSOR)
    _add_even(load, numel[tl], -(-numel[tl] // ws), items[tl])
    if groups:
        g_items = np.array([_itemsize(g.dtype_name) for g in groups], dtype=np.int64)
        g_numel = np.array([g.numel for g in groups], dtype=np.int64)
        g_parts = np.array([g.partition_numel for g in groups], dtype=np.int64)
        _add_even(load, g_numel, g_parts, g_items)
    loads = np.cumsum(load[:ws])

    # Experts: each expert's tensors are written whole, into its own file, by one rank of the
    # expert's group (experts are spread over the group's ranks).
    num_experts = 1 + int(eids.max(initial=-1))
    ep = spec.expert_parallel_size
    if num_experts % ep:
        raise SpecError(f"{num_experts} experts cannot be split over expert_parallel_size {ep}")
    owners = np.full(n, -1, dtype=np.int64)
    exp = np.flatnonzero(expert)
    if len(exp):
        size = ws // ep  # ranks in an expert's group: slot, slot + ep, slot + 2 ep, ...
        e = eids[exp]
        writer = e // (num_experts // ep) + (e % size) * ep
        owners[exp] = writer
        np.add.at(loads, writer, numel[exp] * items[exp])

    # Replicated leaves: written once, largest first to the least-loaded rank (LPT scheduling).
    rl = np.flatnonzero(kinds == _REPLICATED)
    if len(rl):
        nbytes = numel[rl] * items[rl]
        by_size = rl[np.lexsort((rl, -nbytes))]
        owners[by_size] = _lpt(loads.tolist(), (numel[by_size] * items[by_size]).tolist())

    experts_col = np.where(kinds == _EXPERT, eids, -1)
    placements = Placements(kinds, groups_of, owners, experts_col)
    frozen_groups = tuple(groups)
    plan = ShardPlan(
        spec,
        skel,
        placements,
        frozen_groups,
        (),
        num_experts,
        _layout(skel, kinds, owners, experts_col, frozen_groups),
    )
    object.__setattr__(plan, "writes", RankWrites(plan))
    return plan


def _lpt(loads: list[int], sizes: list[int]) -> list[int]:
    """The rank each item (largest first) goes to: the least-loaded one, ties to the lowest
    rank, as a heap of (load, rank) gives them."""
    heap = [(lo, r) for r, lo in enumerate(loads)]
    heapq.heapify(heap)
    out = []
    for n in sizes:
        lo, rank = heap[0]
        out.append(rank)
        heapq.heapreplace(heap, (lo + n, rank))
    return out
