"""The records a manifest is made of: each durable file of a save, and the manifest as a value.

A :class:`FileRecord` is one blob (its rank or expert, size, checksums and fragments); a rank
file's fragments may be :class:`DerivedFragments`, recomputed from the plan rather than stored.
:class:`Manifest` is the whole commit record of a tag. Their bytes, and the checks an untrusted
manifest passes before any of this is built from it, are in ``_manifest.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, overload

from zckpt._lazy import lazy_module
from zckpt.errors import FormatError
from zckpt.format._skeleton import U64, expect_int, expect_list, expect_map, field, show
from zckpt.spec import Fragment, ShardPlan, ZeroSpec, plan_shards
from zckpt.tree import Skeleton

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")  # version 2 manifests only: reading a v1 one needs none

__all__ = ["DerivedFragments", "FileRecord", "Manifest", "derived_fragments", "file_report"]


@dataclass(frozen=True)
class FileRecord:
    """One durable blob of a save: which rank wrote it, its size and checksums, what it holds.

    ``derived`` says that ``fragments`` are the ones the manifest's spec plans for this file
    (:func:`derived_fragments`); such a record carries no list of its own on the wire, and a
    :class:`Manifest` gives it a lazy :class:`DerivedFragments`.

    ``xxh3`` is the hash of the whole file (what ``zckpt verify`` recomputes); ``index_xxh3``
    the checksum of its index as its preamble records it, which binds the file to this
    manifest at the cost of reading the header: a file from another checkpoint, even with the
    same layout, has other chunk checksums and so another index checksum. None in manifests
    written before zckpt recorded it.

    Example:
        >>> FileRecord("g.rank00000-of-00001.zck", 0, 100, 7, (Fragment(0, 0, 4),)).rank
        0
    """

    name: str
    rank: int
    size: int
    xxh3: int
    fragments: Sequence[Fragment]
    expert: int = -1
    index_xxh3: int | None = None
    derived: bool = False

    def to_obj(self, compact: bool = False) -> dict[str, Any]:
        """msgpack form (version 1's record); ``compact`` leaves out a derived record's
        fragments (what ranks report to rank 0)."""
        obj: dict[str, Any] = {
            "name": self.name,
            "rank": self.rank,
            "size": self.size,
            "xxh3": self.xxh3,
            "expert": self.expert,
        }
        if compact and self.derived:
            obj["derived"] = True
        else:
            obj["fragments"] = [list(f) for f in self.fragments]
        if self.index_xxh3 is not None:
            obj["index_xxh3"] = self.index_xxh3
        return obj

    @staticmethod
    def from_obj(d: Any, where: str = "file record", allow_derived: bool = False) -> FileRecord:
        """Parse :meth:`to_obj` output, checking each field's type and range (not the
        cross-references, which :func:`decode_manifest` checks). A compact derived record
        (no fragments) is accepted only with ``allow_derived`` (rank reports, not manifests)."""
        m = expect_map(d, where)
        name = field(m, "name", where)
        if type(name) is not str:
            raise FormatError(f"{where}: 'name' must be a string, got {show(name)}")
        where = f"{where} {name!r}"
        frags = []
        derived = allow_derived and m.get("derived", False) is True and "fragments" not in m
        listed = [] if derived else field(m, "fragments", where)
        for i, f in enumerate(expect_list(listed, f"{where} fragments")):
            a, b, c = expect_list(f, f"{where} fragment {i}", 3)
            fw = f"{where} fragment {i}"
            frags.append(Fragment(expect_int(a, fw), expect_int(b, fw), expect_int(c, fw)))
        ix = m.get("index_xxh3")
        return FileRecord(
            name,
            expect_int(field(m, "rank", where), f"{where} rank", -1, 1 << 24),
            expect_int(field(m, "size", where), f"{where} size", 0, 1 << 62),
            expect_int(field(m, "xxh3", where), f"{where} xxh3", 0, U64),
            tuple(frags),
            expect_int(m.get("expert", -1), f"{where} expert", -1, 1 << 24),
            None if ix is None else expect_int(ix, f"{where} index_xxh3", 0, U64),
            derived,
        )


def derived_fragments(plan: ShardPlan, rank: int, expert: int = -1) -> tuple[Fragment, ...]:
    """The fragments a save following ``plan`` writes into a file: rank ``rank``'s blob
    (``expert`` -1: the rank's fragments but its experts') or expert ``expert``'s blob.

    Example:
        >>> import torch
        >>> plan = plan_shards({"master": {"w": torch.zeros(6)}}, ZeroSpec(2, 3))
        >>> derived_fragments(plan, 1)
        (Fragment(leaf=0, start=3, stop=6),)
    """
    if expert >= 0:
        return plan.expert_writes(expert)
    return plan.writes_of(rank, experts=False)


class DerivedFragments(Sequence[Fragment]):
    """A file's fragments as the manifest's plan derives them, computed when first read.

    Compares equal to the tuple it stands for.

    Example:
        >>> import torch
        >>> plan = plan_shards({"master": {"w": torch.zeros(6)}}, ZeroSpec(2, 3))
        >>> f = DerivedFragments(plan, 0)
        >>> f == (Fragment(0, 0, 3),), len(f), list(f)
        (True, 1, [Fragment(leaf=0, start=0, stop=3)])
    """

    def __init__(
        self, plan: ShardPlan | Callable[[], ShardPlan], rank: int, expert: int = -1
    ) -> None:
        # A callable defers planning until a file's list is first read (rank 0's commit
        # never needs one).
        self._plan, self._rank, self._expert = plan, rank, expert
        self._items: tuple[Fragment, ...] | None = None

    def _all(self) -> tuple[Fragment, ...]:
        if self._items is None:
            plan = self._plan if isinstance(self._plan, ShardPlan) else self._plan()
            self._items = derived_fragments(plan, self._rank, self._expert)
        return self._items

    def __len__(self) -> int:
        return len(self._all())

    @overload
    def __getitem__(self, i: int) -> Fragment: ...

    @overload
    def __getitem__(self, i: slice) -> tuple[Fragment, ...]: ...

    def __getitem__(self, i: int | slice) -> Any:
        return self._all()[i]

    def __iter__(self) -> Iterator[Fragment]:
        return iter(self._all())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DerivedFragments):
            return self._all() == other._all()
        if isinstance(other, tuple | list):
            return self._all() == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._all())

    def __repr__(self) -> str:
        return repr(self._all())


def file_report(rec: FileRecord, plan: ShardPlan | None) -> dict[str, Any]:
    """What a rank tells rank 0 about a file it wrote: its record, without fragments when
    they are the ones ``plan`` (the manifest's) derives for it, so that rank 0's commit costs
    O(files), not O(fragments). Checked here in O(the file's fragments).

    Example:
        >>> import torch
        >>> plan = plan_shards({"master": {"w": torch.zeros(6)}}, ZeroSpec(2, 3))
        >>> rec = FileRecord("g.rank00001-of-00002.zck", 1, 99, 7, (Fragment(0, 3, 6),))
        >>> "fragments" in file_report(rec, plan), "fragments" in file_report(rec, None)
        (False, True)
    """
    if plan is not None and rec.rank >= 0:
        if rec.expert >= 0:
            leaves = plan.expert_leaves(rec.expert)
            ok = bool(leaves) and plan.placements[leaves[0]].owner == rec.rank
        else:
            ok = rec.rank < plan.world_size
        if ok and tuple(rec.fragments) == derived_fragments(plan, rec.rank, rec.expert):
            return dataclasses.replace(rec, derived=True).to_obj(compact=True)
    return rec.to_obj()


@dataclass(frozen=True)
class Manifest:
    """What a committed tag holds.

    Example:
        >>> import torch, zckpt
        >>> from zckpt.store._manifest import decode_manifest, encode_manifest
        >>> skel, _ = zckpt.tree.flatten({"w": torch.zeros(2)})
        >>> m = Manifest("t", "0" * 16, 1.0, ZeroSpec(1, 1), skel, (), None, (), False, "0.1.0")
        >>> decode_manifest(encode_manifest(m), check=False).tag
        't'
    """

    tag: str
    generation: str
    committed_at: float
    spec: ZeroSpec
    skeleton: Skeleton
    files: tuple[FileRecord, ...]
    client: FileRecord | None
    frozen: tuple[str, ...]
    excluded_frozen: bool
    zckpt_version: str

    def __post_init__(self) -> None:
        if any(f.derived and not isinstance(f.fragments, DerivedFragments) for f in self.files):
            files = tuple(
                dataclasses.replace(f, fragments=DerivedFragments(self.plan, f.rank, f.expert))
                if f.derived and not isinstance(f.fragments, DerivedFragments)
                else f
                for f in self.files
            )
            object.__setattr__(self, "files", files)

    def plan(self) -> ShardPlan:
        """The spec's plan of the skeleton (computed once): what derived records hold."""
        plan: ShardPlan | None = self.__dict__.get("_plan")
        if plan is None:
            plan = plan_shards(self.skeleton, self.spec)
            object.__setattr__(self, "_plan", plan)
        return plan

    @property
    def derived(self) -> bool:
        """Whether every rank file's fragments are the plan's (no explicit list anywhere)."""
        return bool(self.files) and all(f.derived for f in self.files)
