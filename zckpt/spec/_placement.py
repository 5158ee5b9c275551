"""Placements: how each tensor leaf of a state is laid out over ranks, and the pieces ranks write.

A :class:`Placement` says whether a leaf is a member of a stage 1/2 flat group, partitioned on
its own (stage 3), written whole (replicated or an MoE expert's) or empty; a :class:`FlatGroup`
is one stage 1/2 flat buffer; a :class:`Fragment` is a flat element range of one leaf, the unit
every plan, blob index and read is made of. :class:`Placements` holds a plan's placements as
arrays, so a plan of hundreds of thousands of leaves builds no object per leaf.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, overload

from zckpt._lazy import lazy_module
from zckpt.format._dtypes import dtype_name, torch_dtype

if TYPE_CHECKING:
    import numpy as np
    import torch
else:
    np = lazy_module("numpy")

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
]

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
        >>> from zckpt import ZeroSpec, plan_shards
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
