"""Shard plans: which flat range of which tensor each rank writes and holds.

ZeRO layouts are deterministic functions of the skeleton and the spec, so a plan stores only
what is O(tensors + ranks) (each leaf's placement, the flat groups, the owner of every tensor
written whole) and computes any one rank's fragments from it by interval arithmetic, in time
proportional to that rank's own fragments. ``ShardPlan.writes`` still reads as every rank's
fragments (a lazy sequence, built per rank when asked for).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import chain
from typing import TYPE_CHECKING, Any, overload

from zckpt._lazy import lazy_module
from zckpt.errors import SpecError
from zckpt.spec._leaves import expert_ids, is_module, itemsize, leaf_info, paths_of
from zckpt.spec._placement import (
    _CODE,
    _EMPTY,
    _EXPERT,
    _FLAT,
    _REPLICATED,
    _TENSOR,
    EMPTY,
    EXPERT,
    FLAT,
    REPLICATED,
    TENSOR,
    FlatGroup,
    Fragment,
    Placement,
    Placements,
)
from zckpt.spec._spec import ZeroSpec
from zckpt.tree import Path, Skeleton, TensorMeta, _gc_paused, skeleton_of

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")  # planning a v1 manifest's checkpoint needs none

__all__ = [
    "EMPTY",
    "EXPERT",
    "FLAT",
    "REPLICATED",
    "TENSOR",
    "FlatGroup",
    "Fragment",
    "Placement",
    "Placements",
    "RankWrites",
    "ShardPlan",
    "plan_shards",
]


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
            info = leaf_info(self.skeleton)
            numel = info.numel[leaves]
            whole = info.scalar[leaves]
            if self.spec.stage < 3:
                whole |= is_module(self.skeleton, leaves, self.spec.module)
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
    info = leaf_info(skel)
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
    info = leaf_info(skel)
    numel, items = info.numel, info.items
    eids = expert_ids(skel, spec) if spec.experts else np.full(n, -1, dtype=np.int64)

    # Each leaf's kind, decided in this order: empty, expert, replicated (0-d or under a
    # replicate prefix), stage 3 tensor, module (replicated), flat group member.
    empty = numel == 0
    expert = (eids >= 0) & ~empty
    rep = ~empty & ~expert & info.scalar
    if spec.replicate:
        maybe = np.flatnonzero(~empty & ~expert & ~rep).tolist()
        for i, path in zip(maybe, paths_of(skel, maybe)):
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
        in_module = is_module(skel, rest, spec.module)
        kinds[rest[in_module]] = _REPLICATED
        flat: list[int] = rest[~in_module].tolist()
        kinds[flat] = _FLAT
        params = _param_index(spec)
        members: dict[tuple[Any, ...], list[tuple[int, int]]] = {}
        for leaf, path in zip(flat, paths_of(skel, flat)):
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
        g_items = np.array([itemsize(g.dtype_name) for g in groups], dtype=np.int64)
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
