"""The one mechanism behind consolidation and resharding: overlaps of saved and wanted ranges.

Saved fragments (from shards in memory, or from blobs on disk read range by range) are indexed
per tensor leaf; a wanted fragment is assembled by copying, for every saved fragment it overlaps,
the common range. Consolidation wants every tensor whole; resharding wants the fragments of a new
plan; a rank resuming at a new world size wants what its new plan says it holds.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch

from zckpt import kernels
from zckpt.assemble import _memory
from zckpt.errors import AllocationError, CoverageError
from zckpt.spec import Fragment, ShardPlan
from zckpt.tree import DICT, LIST, TUPLE, VALUE, Skeleton

__all__ = ["PlannedIndex", "Source", "SourceIndex", "TensorSource", "assemble", "index_sources"]


class Source(Protocol):
    """A saved fragment whose elements can be read on demand.

    ``read(start, stop)`` returns elements ``[start, stop)`` of the fragment (relative to its
    start) as a 1-D CPU tensor of the leaf's dtype.
    """

    @property
    def fragment(self) -> Fragment: ...

    def read(self, start: int, stop: int) -> torch.Tensor: ...


@dataclass(frozen=True, eq=False)
class TensorSource:
    """A saved fragment already in memory (a shard's data tensor).

    Example:
        >>> s = TensorSource(Fragment(0, 2, 5), torch.tensor([2.0, 3.0, 4.0]))
        >>> s.read(1, 3).tolist()
        [3.0, 4.0]
    """

    fragment: Fragment
    data: torch.Tensor

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of the fragment, as a view."""
        d = self.data if self.data.device.type == "cpu" else self.data.cpu()
        return d[start:stop]


@dataclass(frozen=True, eq=False)
class SourceIndex:
    """Saved fragments per tensor leaf, sorted by start, checked for overlaps.

    Example:
        >>> from zckpt.tree import flatten
        >>> skel, _ = flatten({"w": torch.zeros(4)})
        >>> idx = index_sources(skel, [TensorSource(Fragment(0, 0, 4), torch.zeros(4))])
        >>> idx.missing(Fragment(0, 0, 4))
        []
    """

    skeleton: Skeleton
    starts: tuple[tuple[int, ...], ...]
    sources: tuple[tuple[Source, ...], ...]

    def overlapping(self, want: Fragment) -> Iterable[tuple[Source, int, int]]:
        """``(source, lo, hi)`` for each saved fragment overlapping ``want``; lo/hi are absolute."""
        starts, srcs = self.starts[want.leaf], self.sources[want.leaf]
        i = max(0, bisect.bisect_right(starts, want.start) - 1)
        while i < len(srcs):
            f = srcs[i].fragment
            if f.start >= want.stop:
                break
            lo, hi = max(f.start, want.start), min(f.stop, want.stop)
            if lo < hi:
                yield srcs[i], lo, hi
            i += 1

    def missing(self, want: Fragment) -> list[tuple[int, int]]:
        """Sub-ranges of ``want`` that no saved fragment covers."""
        return _gaps(want, self.overlapping(want))


def _gaps(want: Fragment, found: Iterable[tuple[Source, int, int]]) -> list[tuple[int, int]]:
    gaps, pos = [], want.start
    for _, lo, hi in found:
        if lo > pos:
            gaps.append((pos, lo))
        pos = max(pos, hi)
    if pos < want.stop:
        gaps.append((pos, want.stop))
    return gaps


@dataclass(frozen=True, eq=False)
class PlannedIndex:
    """Saved fragments found by arithmetic: those a plan says were written, each made a
    :class:`Source` by ``source(rank, fragment)`` only when a wanted range overlaps it.

    What a checkpoint whose files hold exactly their plan's fragments is indexed by: finding
    the sources of a wanted range costs O(log + the sources found), with no list of every
    saved fragment (O(ranks x tensors) at stage 3).

    Example:
        >>> import zckpt
        >>> from zckpt.tree import flatten
        >>> skel, _ = flatten({"master": {"w": torch.zeros(6)}})
        >>> saved = zckpt.plan_shards(skel, zckpt.ZeroSpec(3, 3))
        >>> data = torch.arange(6.0)
        >>> idx = PlannedIndex(saved, lambda r, f: TensorSource(f, data[f.start : f.stop]))
        >>> assemble(idx, [Fragment(0, 1, 5)])[0].tolist()
        [1.0, 2.0, 3.0, 4.0]
    """

    plan: ShardPlan
    source: Callable[[int, Fragment], Source]

    @property
    def skeleton(self) -> Skeleton:
        """The saved skeleton."""
        return self.plan.skeleton

    def overlapping(self, want: Fragment) -> Iterable[tuple[Source, int, int]]:
        """``(source, lo, hi)`` for each saved fragment overlapping ``want``; lo/hi are absolute."""
        for rank, f in self.plan.writers(want.leaf, want.start, want.stop):
            lo, hi = max(f.start, want.start), min(f.stop, want.stop)
            if lo < hi:
                yield self.source(rank, f), lo, hi

    def missing(self, want: Fragment) -> list[tuple[int, int]]:
        """Sub-ranges of ``want`` that no saved fragment covers."""
        return _gaps(want, self.overlapping(want))


def index_sources(skeleton: Skeleton, sources: Iterable[Source]) -> SourceIndex:
    """Index saved fragments by leaf; overlapping saved ranges are a :class:`CoverageError`.

    Example:
        >>> from zckpt.tree import flatten
        >>> skel, _ = flatten({"w": torch.zeros(4)})
        >>> a = TensorSource(Fragment(0, 0, 3), torch.zeros(3))
        >>> b = TensorSource(Fragment(0, 2, 4), torch.zeros(2))
        >>> index_sources(skel, [a, b])
        Traceback (most recent call last):
        ...
        zckpt.errors.CoverageError: w: saved ranges [0, 3) and [2, 4) overlap
    """
    per_leaf: list[list[Source]] = [[] for _ in skeleton.tensors]
    for s in sources:
        per_leaf[s.fragment.leaf].append(s)
    for leaf, srcs in enumerate(per_leaf):
        srcs.sort(key=lambda s: s.fragment.start)
        for a, b in zip(srcs, srcs[1:]):
            if a.fragment.stop > b.fragment.start:
                fa, fb = a.fragment, b.fragment
                raise CoverageError(
                    f"{skeleton.name(leaf)}: saved ranges [{fa.start}, {fa.stop}) and "
                    f"[{fb.start}, {fb.stop}) overlap"
                )
    return SourceIndex(
        skeleton,
        tuple(tuple(s.fragment.start for s in srcs) for srcs in per_leaf),
        tuple(tuple(srcs) for srcs in per_leaf),
    )


def new_tensor(shape: int | tuple[int, ...], dtype: torch.dtype, name: str) -> torch.Tensor:
    """``torch.empty(shape, dtype)`` (see :mod:`zckpt.assemble._memory`: ``ZCKPT_ALLOC``),
    or an :class:`AllocationError` naming the tensor and its size when memory runs out (a
    checkpoint's metadata declares the sizes).

    Example:
        >>> new_tensor((2, 3), torch.float32, "w").shape
        torch.Size([2, 3])
    """
    dims = (shape,) if isinstance(shape, int) else shape
    try:
        return _memory.empty(dims, dtype)
    except (RuntimeError, MemoryError) as e:
        n = 1
        for d in dims:
            n *= d
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        raise AllocationError(
            f"{name}: cannot allocate {nbytes} bytes ({list(dims)} {dtype}) for it: "
            f"{' '.join(str(e).split())[:200]}"
        ) from None


def _bytes_view(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)


_UPCAST: dict[torch.dtype, Literal["bf16", "f16"]] = {torch.bfloat16: "bf16", torch.float16: "f16"}


def _copier(src_dtype: torch.dtype, dst_dtype: torch.dtype) -> Callable[..., None]:
    """A function copying ``src[a:b]`` (relative) into ``dst[o:o+(b-a)]``, converting dtype."""
    if src_dtype == dst_dtype:
        item = torch.empty((), dtype=src_dtype).element_size()

        def copy(dst: torch.Tensor, o: int, src: torch.Tensor) -> None:
            table = np.array([[0, o * item, src.numel() * item]], dtype=np.int64)
            kernels.copy_ranges(_bytes_view(dst), _bytes_view(src.contiguous()), table)

        return copy
    if dst_dtype == torch.float32 and src_dtype in _UPCAST:
        kind = _UPCAST[src_dtype]

        def upcast(dst: torch.Tensor, o: int, src: torch.Tensor) -> None:
            table = np.array([[0, o, src.numel()]], dtype=np.int64)
            u16 = src.contiguous().view(torch.int16).numpy().view(np.uint16)
            kernels.upcast_ranges(dst.numpy(), u16, table, kind)

        return upcast

    def convert(dst: torch.Tensor, o: int, src: torch.Tensor) -> None:
        dst[o : o + src.numel()].copy_(src)

    return convert


def assemble(
    index: SourceIndex | PlannedIndex,
    wanted: Sequence[Fragment],
    dtypes: Sequence[torch.dtype] | None = None,
    out: Sequence[torch.Tensor | None] | None = None,
) -> list[torch.Tensor]:
    """Build each wanted fragment as a fresh 1-D tensor from the saved fragments it overlaps.

    Args:
        index: the saved fragments.
        wanted: the ranges to build.
        dtypes: the dtype of each result (default: the leaf's own, bit for bit); bf16/fp16 to fp32
            upcasts run in a fused kernel straight into the result.
        out: preallocated 1-D destinations, one per wanted fragment (e.g. views of a ZeRO flat
            partition buffer, or of the final tensor; None for a fresh one); default: fresh
            tensors.

    Raises:
        CoverageError: part of a wanted range was saved by no fragment (names tensor and range).

    Example:
        >>> from zckpt.tree import flatten
        >>> skel, _ = flatten({"w": torch.zeros(4)})
        >>> idx = index_sources(skel, [TensorSource(Fragment(0, 0, 2), torch.tensor([1., 2.])),
        ...                            TensorSource(Fragment(0, 2, 4), torch.tensor([3., 4.]))])
        >>> assemble(idx, [Fragment(0, 1, 4)])[0].tolist()
        [2.0, 3.0, 4.0]
    """
    skel = index.skeleton
    result = []
    for i, want in enumerate(wanted):
        meta = skel.tensors[want.leaf]
        dtype = meta.dtype if dtypes is None else dtypes[i]
        gaps = index.missing(want)
        if gaps:
            shown = ", ".join(f"[{a}, {b})" for a, b in gaps[:4])
            raise CoverageError(
                f"{skel.name(want.leaf)}: elements {shown} of {meta.numel} are in no saved shard"
            )
        name = skel.name(want.leaf)
        given = None if out is None else out[i]
        dst = new_tensor(want.numel, dtype, name) if given is None else given
        if dst.dtype != dtype or dst.numel() != want.numel or not dst.is_contiguous():
            raise ValueError(
                f"{skel.name(want.leaf)}: destination must be a contiguous {dtype} tensor of "
                f"{want.numel} elements"
            )
        copy = _copier(meta.dtype, dtype)
        for src, lo, hi in index.overlapping(want):
            f = src.fragment
            a, b = lo - f.start, hi - f.start
            read_into = getattr(src, "read_into", None)
            if read_into is not None and dtype == meta.dtype:
                # Decode straight into the destination: no temporary, no second copy.
                read_into(a, b, dst[lo - want.start : hi - want.start])
            else:
                copy(dst, lo - want.start, src.read(a, b))
        result.append(dst)
    return result


def same_node(a: Any, b: Any) -> bool:
    """Skeleton trees equal, floats compared by bits (NaN payloads included)."""
    if a[0] != b[0]:
        return False
    tag = a[0]
    if tag == VALUE:
        x, y = a[1], b[1]
        if isinstance(x, float) and isinstance(y, float):
            return struct.pack("<d", x) == struct.pack("<d", y)
        return type(x) is type(y) and x == y
    if tag == DICT:
        return len(a[1]) == len(b[1]) and all(
            ka == kb and type(ka) is type(kb) and same_node(va, vb)
            for (ka, va), (kb, vb) in zip(a[1], b[1])
        )
    if tag in (LIST, TUPLE):
        return len(a[1]) == len(b[1]) and all(same_node(x, y) for x, y in zip(a[1], b[1]))
    return bool(a[1] == b[1])
