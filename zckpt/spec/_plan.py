"""Shard plans: which flat range of which tensor each rank writes and holds."""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from zckpt.errors import SpecError
from zckpt.spec._spec import ZeroSpec
from zckpt.tree import Path, Skeleton, TensorMeta, skeleton_of

__all__ = ["FlatGroup", "Fragment", "Placement", "ShardPlan", "plan_shards"]

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


@dataclass(frozen=True)
class FlatGroup:
    """A stage 1/2 flat buffer: tensors concatenated, tail-padded, cut into equal partitions.

    Example:
        >>> g = FlatGroup("exp_avg", torch.float32, (0, 1), (0, 3), 5, 8, 4)
        >>> g.partition_range(1)
        (4, 8)
    """

    key: str
    dtype: torch.dtype
    leaves: tuple[int, ...]
    offsets: tuple[int, ...]
    numel: int
    padded_numel: int
    partition_numel: int

    def partition_range(self, rank: int) -> tuple[int, int]:
        """``[start, stop)`` of ``rank``'s partition in the padded flat buffer."""
        return rank * self.partition_numel, (rank + 1) * self.partition_numel


@dataclass(frozen=True)
class ShardPlan:
    """Where every element of a state lives, for one spec. An immutable value.

    ``writes[r]`` lists the fragments rank ``r`` stores (each element of the state is written by
    exactly one rank); :meth:`holds` lists what a rank keeps in memory during training (its
    partitions plus every replicated tensor).

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
    writes: tuple[tuple[Fragment, ...], ...]
    num_experts: int = 0

    @property
    def world_size(self) -> int:
        """The spec's world size."""
        return self.spec.world_size

    def holds(self, rank: int) -> tuple[Fragment, ...]:
        """What ``rank`` keeps in memory: its own ranges and every replicated tensor, whole.

        Example:
            >>> import torch
            >>> s = {"module": {"w": torch.zeros(4)}, "master": {"w": torch.zeros(4)}}
            >>> plan_shards(s, ZeroSpec(2, 2)).holds(1)
            (Fragment(leaf=0, start=0, stop=4), Fragment(leaf=1, start=2, stop=4))
        """
        self._check_rank(rank)
        whole = (REPLICATED, EXPERT)
        own = {f.leaf: f for f in self.writes[rank] if self.placements[f.leaf].kind not in whole}
        out: list[Fragment] = []
        for leaf, p in enumerate(self.placements):
            if p.kind == REPLICATED:
                out.append(Fragment(leaf, 0, self.skeleton.tensors[leaf].numel))
            elif p.kind == EXPERT:
                f = self._expert_holding(leaf, p.expert, rank)
                if f is not None:
                    out.append(f)
            elif leaf in own:
                out.append(own[leaf])
        return tuple(out)

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
        slot = expert // (self.num_experts // ep)
        return tuple(r for r in range(self.world_size) if r % ep == slot)

    def _expert_holding(self, leaf: int, expert: int, rank: int) -> Fragment | None:
        group = self.expert_ranks(expert)
        if rank not in group:
            return None
        meta = self.skeleton.tensors[leaf]
        path = self.skeleton.paths[leaf]
        if not meta.shape or (self.spec.stage < 3 and self.spec.is_module_path(path)):
            return Fragment(leaf, 0, meta.numel)
        per = -(-meta.numel // len(group))
        i = group.index(rank)
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
            return (rest, str(meta.dtype), g), order
    return (tuple(map(str, path[:-1])), str(meta.dtype), -1), 0


def plan_shards(state: Any, spec: ZeroSpec) -> ShardPlan:
    """Plan which flat range of which tensor each rank owns, for a state (or its skeleton).

    Only shapes and dtypes are read, so the state may be a :class:`~zckpt.tree.Skeleton` and a
    checkpoint can be planned for a new world size from its header alone.

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
    placements: list[Placement] = []
    replicated: list[int] = []
    group_members: dict[tuple[Any, ...], list[tuple[int, int]]] = {}
    group_ids: dict[tuple[Any, ...], int] = {}
    for leaf, (path, meta) in enumerate(zip(skel.paths, skel.tensors)):
        expert = spec.expert_of(path) if spec.experts else None
        if meta.numel == 0:
            placements.append(Placement(EMPTY))
        elif expert is not None:
            placements.append(Placement(EXPERT, expert=expert))
        elif len(meta.shape) == 0 or spec.is_replicated_path(path):
            placements.append(Placement(REPLICATED))
            replicated.append(leaf)
        elif spec.stage == 3:
            placements.append(Placement(TENSOR))
        elif spec.is_module_path(path):
            placements.append(Placement(REPLICATED))
            replicated.append(leaf)
        else:
            key, order = _group_key(path, meta, params)
            gid = group_ids.setdefault(key, len(group_ids))
            group_members.setdefault(key, []).append((order, leaf))
            placements.append(Placement(FLAT, group=gid))

    writes: list[list[Fragment]] = [[] for _ in range(ws)]
    load = [0] * ws
    groups: list[FlatGroup] = []
    for key, members in group_members.items():
        members.sort()  # stable on leaf order for equal keys
        leaves = tuple(leaf for _, leaf in members)
        offsets, total = [], 0
        for leaf in leaves:
            offsets.append(total)
            total += skel.tensors[leaf].numel
        padded = spec.padded(total)
        part = padded // ws
        dtype = skel.tensors[leaves[0]].dtype
        name = "/".join(key[0]) + f"[{key[1]}, group {key[2]}]"
        groups.append(FlatGroup(name, dtype, leaves, tuple(offsets), total, padded, part))
        itemsize = skel.tensors[leaves[0]].itemsize
        for rank in range(ws):
            lo, hi = rank * part, (rank + 1) * part
            load[rank] += max(0, min(hi, total) - lo) * itemsize
            for leaf, off in zip(leaves, offsets):
                n = skel.tensors[leaf].numel
                a, b = max(lo, off), min(hi, off + n)
                if a < b:
                    writes[rank].append(Fragment(leaf, a - off, b - off))

    for leaf, p in enumerate(placements):
        if p.kind == TENSOR:
            meta = skel.tensors[leaf]
            per = -(-meta.numel // ws)
            for rank in range(ws):
                a, b = rank * per, min(meta.numel, (rank + 1) * per)
                if a < b:
                    writes[rank].append(Fragment(leaf, a, b))
                    load[rank] += (b - a) * meta.itemsize

    # Experts: each expert's tensors are written whole, into its own file, by one rank of the
    # expert's group (experts are spread over the group's ranks).
    num_experts = 1 + max((p.expert for p in placements if p.kind == EXPERT), default=-1)
    ep = spec.expert_parallel_size
    if num_experts % ep:
        raise SpecError(f"{num_experts} experts cannot be split over expert_parallel_size {ep}")
    for leaf, p in enumerate(placements):
        if p.kind == EXPERT:
            slot = p.expert // (num_experts // ep)
            group = [r for r in range(ws) if r % ep == slot]
            writer = group[p.expert % len(group)]
            placements[leaf] = p._replace(owner=writer)
            writes[writer].append(Fragment(leaf, 0, skel.tensors[leaf].numel))
            load[writer] += skel.tensors[leaf].nbytes

    # Replicated leaves: written once, largest first to the least-loaded rank (LPT scheduling).
    heap = [(load[r], r) for r in range(ws)]
    heapq.heapify(heap)
    for leaf in sorted(replicated, key=lambda i: (-skel.tensors[i].nbytes, i)):
        lo, rank = heapq.heappop(heap)
        placements[leaf] = Placement(REPLICATED, owner=rank)
        writes[rank].append(Fragment(leaf, 0, skel.tensors[leaf].numel))
        heapq.heappush(heap, (lo + skel.tensors[leaf].nbytes, rank))

    return ShardPlan(
        spec,
        skel,
        tuple(placements),
        tuple(groups),
        tuple(tuple(sorted(w)) for w in writes),
        num_experts,
    )
