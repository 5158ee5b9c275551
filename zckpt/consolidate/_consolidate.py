"""Consolidate and reshard shards: pure functions over shard records."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from zckpt.consolidate._overlap import TensorSource, assemble, index_sources, same_node
from zckpt.errors import CoverageError
from zckpt.shard import Shard
from zckpt.spec import Fragment, ShardPlan, ZeroSpec, plan_shards
from zckpt.tree import Skeleton, unflatten

__all__ = ["consolidate", "fp32_state_dict", "reshard", "shard_sources"]


def _common_skeleton(shards: Sequence[Shard]) -> Skeleton:
    if not shards:
        raise CoverageError("no shards given")
    first = shards[0]
    for s in shards[1:]:
        if (
            s.skeleton.tensors != first.skeleton.tensors
            or s.skeleton.paths != first.skeleton.paths
            or not same_node(s.skeleton.node, first.skeleton.node)
        ):
            raise CoverageError(
                f"shards of rank {first.rank} and rank {s.rank} describe different states"
            )
    ranks = [s.rank for s in shards]
    dup = sorted({r for r in ranks if ranks.count(r) > 1})
    if dup:
        raise CoverageError(f"shards of rank(s) {dup} given more than once")
    return first.skeleton


def shard_sources(shards: Sequence[Shard]) -> list[TensorSource]:
    """Every fragment of in-memory shards as a readable source.

    Example:
        >>> import torch, zckpt
        >>> s = {"master": {"w": torch.zeros(3)}}
        >>> p = zckpt.plan_shards(s, zckpt.ZeroSpec(2, 1))
        >>> len(shard_sources([zckpt.shard_state(s, p, r) for r in range(2)]))
        2
    """
    return [TensorSource(f, d) for s in shards for f, d in zip(s.fragments, s.data)]


def _missing_ranks_hint(shards: Sequence[Shard]) -> str:
    ws = shards[0].spec.world_size
    lost = sorted(set(range(ws)) - {s.rank for s in shards})
    return f" (shards of rank(s) {lost} of world size {ws} were not given)" if lost else ""


def _full(skel: Skeleton) -> list[Fragment]:
    return [Fragment(i, 0, m.numel) for i, m in enumerate(skel.tensors) if m.numel]


def _gather(shards: Sequence[Shard], wanted: Sequence[Fragment], dtypes: Any = None) -> Any:
    skel = _common_skeleton(shards)
    index = index_sources(skel, shard_sources(shards))
    try:
        return skel, assemble(index, wanted, dtypes)
    except CoverageError as e:
        raise CoverageError(str(e) + _missing_ranks_hint(shards)) from None


def _fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype.is_floating_point else dtype


def consolidate(shards: Sequence[Shard], *, dtype: torch.dtype | None = None) -> Any:
    """The full state back from the shards of all ranks, bit for bit.

    Args:
        shards: one shard per rank (any order); ranks that write nothing may be left out.
        dtype: ``None`` keeps every tensor's dtype (bitwise round trip); ``torch.float32``
            converts floating tensors to fp32 (bf16/fp16 upcast in a fused kernel), leaving
            integer and bool tensors alone.

    Raises:
        CoverageError: shards disagree on the state, overlap, or leave elements uncovered.

    Example:
        >>> import torch, zckpt
        >>> s = {"master": {"w": torch.arange(7.0)}, "module": {"w": torch.ones(7).bfloat16()}}
        >>> p = zckpt.plan_shards(s, zckpt.ZeroSpec(world_size=3, stage=2))
        >>> full = zckpt.consolidate([zckpt.shard_state(s, p, r) for r in range(3)])
        >>> torch.equal(full["master"]["w"], s["master"]["w"])
        True
        >>> zckpt.consolidate([zckpt.shard_state(s, p, r) for r in range(3)],
        ...                   dtype=torch.float32)["module"]["w"].dtype
        torch.float32
    """
    skel = _common_skeleton(shards)
    wanted = _full(skel)
    dtypes = None if dtype is None else [_fp32(skel.tensors[f.leaf].dtype) for f in wanted]
    if dtype not in (None, torch.float32):
        raise ValueError(f"dtype must be None or torch.float32, got {dtype}")
    _, parts = _gather(shards, wanted, dtypes)
    leaves: list[torch.Tensor] = [
        torch.empty(m.shape, dtype=m.dtype if dtype is None else _fp32(m.dtype))
        for m in skel.tensors
    ]
    for f, t in zip(wanted, parts):
        leaves[f.leaf] = t.view(skel.tensors[f.leaf].shape)
    return unflatten(skel, leaves)


def reshard(shards: Sequence[Shard], new_spec: ZeroSpec) -> list[Shard]:
    """The same state as shards for another world size or stage.

    Each new fragment is assembled from the old fragments it overlaps, so no rank's state is
    ever materialised whole unless the new plan asks for it.

    Example:
        >>> import torch, zckpt
        >>> s = {"master": {"w": torch.arange(10.0)}}
        >>> p = zckpt.plan_shards(s, zckpt.ZeroSpec(world_size=4, stage=1))
        >>> new = zckpt.reshard([zckpt.shard_state(s, p, r) for r in range(4)],
        ...                     zckpt.ZeroSpec(world_size=3, stage=3))
        >>> [sh.data[0].tolist() for sh in new]
        [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0], [8.0, 9.0]]
    """
    skel = _common_skeleton(shards)
    plan: ShardPlan = plan_shards(skel, new_spec)
    wanted = [f for w in plan.writes for f in w]
    _, parts = _gather(shards, wanted)
    out, i = [], 0
    for rank, frags in enumerate(plan.writes):
        out.append(Shard(rank, new_spec, skel, frags, tuple(parts[i : i + len(frags)])))
        i += len(frags)
    return out


def fp32_state_dict(shards: Sequence[Shard]) -> dict[str, torch.Tensor]:
    """The module's state dict in fp32: master weights where present, upcast weights otherwise.

    Tensors under the spec's ``module`` subtree become fp32 (integer buffers keep their dtype);
    a parameter with an fp32 master copy under ``master`` (same key) takes the master's exact
    values instead of the upcast 16-bit ones.

    Example:
        >>> import torch, zckpt
        >>> w = torch.randn(5)
        >>> s = {"module": {"w": w.bfloat16(), "n": torch.tensor(3)}, "master": {"w": w}}
        >>> p = zckpt.plan_shards(s, zckpt.ZeroSpec(2, 2))
        >>> sd = zckpt.fp32_state_dict([zckpt.shard_state(s, p, r) for r in range(2)])
        >>> torch.equal(sd["w"], w), sd["n"].dtype
        (True, torch.int64)
    """
    skel = _common_skeleton(shards)
    spec = shards[0].spec
    by_path = {p: i for i, p in enumerate(skel.paths)}
    names: list[str] = []
    wanted: list[Fragment] = []
    dtypes: list[torch.dtype] = []
    empty: dict[str, torch.Tensor] = {}
    for leaf, path in enumerate(skel.paths):
        if not spec.is_module_path(path):
            continue
        name = ".".join(map(str, path[1:]))
        meta = skel.tensors[leaf]
        src = by_path.get((spec.master, *path[1:]), leaf)
        if skel.tensors[src].shape != meta.shape:
            src = leaf
        dt = _fp32(meta.dtype)
        if meta.numel == 0:
            empty[name] = torch.empty(meta.shape, dtype=dt)
            continue
        names.append(name)
        wanted.append(Fragment(src, 0, meta.numel))
        dtypes.append(dt)
    _, parts = _gather(shards, wanted, dtypes)
    out = dict(empty)
    for name, f, t in zip(names, wanted, parts):
        out[name] = t.view(skel.tensors[f.leaf].shape)
    order = [".".join(map(str, p[1:])) for p in skel.paths if spec.is_module_path(p)]
    return {k: out[k] for k in order}
