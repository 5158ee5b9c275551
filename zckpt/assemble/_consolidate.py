"""Consolidate and reshard shards: pure functions over shard records."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple, overload

import torch

from zckpt.assemble._keys import fp32_keys
from zckpt.assemble._overlap import (
    SourceIndex,
    TensorSource,
    assemble,
    index_sources,
    new_tensor,
    same_node,
)
from zckpt.errors import CoverageError
from zckpt.format._dtypes import torch_dtype
from zckpt.shard import Shard
from zckpt.spec import Fragment, ShardPlan, ZeroSpec, plan_shards
from zckpt.tree import Skeleton, unflatten

__all__ = [
    "Fp32Entry",
    "ReshardedShards",
    "assemble_fp32",
    "consolidate",
    "fp32_entries",
    "fp32_state_dict",
    "fp32_tensors",
    "reshard",
    "shard_sources",
]


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
    # Empty tensors have no fragment: their shape says it all. The others come from parts.
    leaves: list[torch.Tensor | None] = [
        torch.empty(m.shape, dtype=m.dtype if dtype is None else _fp32(m.dtype))
        if m.numel == 0
        else None
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


class ReshardedShards(Sequence[Shard]):
    """The shards of ``plan``, each assembled when it is asked for from the saved fragments in
    ``index`` and kept by nobody: writing them one after another (``save_checkpoint``'s writer
    does) holds one rank's shard at a time, whatever the checkpoint's size. With file sources,
    a shard reads only the chunks its ranges overlap.

    Example:
        >>> import torch, zckpt
        >>> from zckpt.assemble import TensorSource, index_sources
        >>> s = {"w": torch.arange(6.0)}
        >>> old = zckpt.plan_shards(s, zckpt.ZeroSpec(2, 1))
        >>> saved = [zckpt.shard_state(s, old, r) for r in range(2)]
        >>> index = index_sources(old.skeleton, [TensorSource(f, t) for sh in saved
        ...                                      for f, t in zip(sh.fragments, sh.data)])
        >>> new = ReshardedShards(index, zckpt.plan_shards(old.skeleton, zckpt.ZeroSpec(3, 3)))
        >>> len(new), [sh.data[0].tolist() for sh in new]
        (3, [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    """

    def __init__(self, index: SourceIndex, plan: ShardPlan) -> None:
        self.saved, self.plan = index, plan

    @property
    def skeleton(self) -> Skeleton:
        """The state's skeleton (the same for every shard)."""
        return self.plan.skeleton

    def __len__(self) -> int:
        return len(self.plan.writes)

    @overload
    def __getitem__(self, rank: int) -> Shard: ...
    @overload
    def __getitem__(self, rank: slice) -> Sequence[Shard]: ...
    def __getitem__(self, rank: int | slice) -> Shard | Sequence[Shard]:
        if isinstance(rank, slice):
            return [self[r] for r in range(len(self))[rank]]
        frags = self.plan.writes[rank]
        data = tuple(assemble(self.saved, frags))
        return Shard(range(len(self))[rank], self.plan.spec, self.plan.skeleton, frags, data)


class Fp32Entry(NamedTuple):
    """One key of an fp32 state dict: its name, the leaf it is read from, and its tie.

    ``source`` is the fp32 master leaf when one exists, else the module leaf (upcast); ``tied_to``
    names an earlier key holding the same module tensor, which the output shares.
    """

    name: str
    source: int
    dtype: torch.dtype
    tied_to: str | None


def fp32_entries(
    skel: Skeleton, spec: ZeroSpec, exclude: frozenset[str] = frozenset()
) -> list[Fp32Entry]:
    """The keys of the module's fp32 state dict, in module order, tied keys included.

    Example:
        >>> import torch, zckpt
        >>> w = torch.ones(2)
        >>> skel, _ = zckpt.tree.flatten({"module": {"a": w.half(), "n": torch.tensor(1)},
        ...                               "master": {"a": w}})
        >>> [(e.name, e.source, e.dtype) for e in fp32_entries(skel, zckpt.ZeroSpec(1, 1))]
        [('a', 2, torch.float32), ('n', 1, torch.int64)]
    """
    return [
        Fp32Entry(k.name, k.source, torch_dtype(k.dtype_name), k.tied_to)
        for k in fp32_keys(skel, spec, exclude)
    ]


def _entry_tensor(index: SourceIndex, e: Fp32Entry) -> torch.Tensor:
    meta = index.skeleton.tensors[e.source]
    if meta.numel == 0:
        return new_tensor(meta.shape, e.dtype, e.name)
    (flat,) = assemble(index, [Fragment(e.source, 0, meta.numel)], [e.dtype])
    return flat.view(meta.shape)


def assemble_fp32(
    index: SourceIndex, entries: Sequence[Fp32Entry]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, fp32 tensor)`` one at a time (tied names yield the same tensor object).

    Working memory beyond the outputs is one tensor's read buffer at most (only for upcasts).

    Example:
        >>> import zckpt
        >>> s = {"module": {"w": torch.arange(3.0)}}
        >>> shards = [zckpt.shard_state(s, zckpt.plan_shards(s, zckpt.ZeroSpec(2, 2)), r)
        ...           for r in range(2)]
        >>> skel = shards[0].skeleton
        >>> idx = index_sources(skel, shard_sources(shards))
        >>> [(k, v.tolist()) for k, v in assemble_fp32(idx, fp32_entries(skel, ZeroSpec(1, 1)))]
        [('w', [0.0, 1.0, 2.0])]
    """
    done: dict[str, torch.Tensor] = {}
    for e in entries:
        t = done[e.tied_to] if e.tied_to is not None else _entry_tensor(index, e)
        done[e.name] = t
        yield e.name, t


def fp32_tensors(
    index: SourceIndex, entries: Sequence[Fp32Entry], threads: int = 1
) -> dict[str, torch.Tensor]:
    """Every entry's fp32 tensor at once (tied names share one tensor), ``threads`` at a time.

    What :func:`assemble_fp32` yields, built by up to ``threads`` threads side by side when the
    sources may be read concurrently (memory or file mappings: an output's time there is the
    page faults of its fresh memory, which one core takes in turn and several cores take
    together). The result is the same whatever ``threads``; on the first failure the tensors
    not yet started are not built and the failure is raised.

    Example:
        >>> import zckpt
        >>> s = {"module": {"w": torch.arange(3.0), "b": torch.ones(2)}}
        >>> shards = [zckpt.shard_state(s, zckpt.plan_shards(s, zckpt.ZeroSpec(2, 2)), r)
        ...           for r in range(2)]
        >>> skel = shards[0].skeleton
        >>> idx = index_sources(skel, shard_sources(shards))
        >>> out = fp32_tensors(idx, fp32_entries(skel, ZeroSpec(1, 1)), threads=2)
        >>> out["w"].tolist(), out["b"].tolist()
        ([0.0, 1.0, 2.0], [1.0, 1.0])
    """
    if threads <= 1:
        return dict(assemble_fp32(index, entries))
    from concurrent.futures import ThreadPoolExecutor

    own = [e for e in entries if e.tied_to is None]
    with ThreadPoolExecutor(threads, thread_name_prefix="zckpt-assemble") as pool:
        futures = [pool.submit(_entry_tensor, index, e) for e in own]
        try:
            built = {e.name: f.result() for e, f in zip(own, futures)}
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    out: dict[str, torch.Tensor] = {}
    for e in entries:
        out[e.name] = out[e.tied_to] if e.tied_to is not None else built[e.name]
    return out


def fp32_state_dict(
    shards: Sequence[Shard], *, exclude: Iterable[str] = ()
) -> dict[str, torch.Tensor]:
    """The module's state dict in fp32: master weights where present, upcast weights otherwise.

    Tensors under the spec's ``module`` subtree become fp32 (integer buffers keep their dtype);
    a parameter with an fp32 master copy under ``master`` (same key) takes the master's exact
    values instead of the upcast 16-bit ones. Tied weights come back as one shared tensor.

    Args:
        shards: every rank's shard.
        exclude: module keys to leave out (e.g. frozen parameters).

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
    index = index_sources(skel, shard_sources(shards))
    entries = fp32_entries(skel, shards[0].spec, frozenset(exclude))
    try:
        return dict(assemble_fp32(index, entries))
    except CoverageError as e:
        raise CoverageError(str(e) + _missing_ranks_hint(shards)) from None
