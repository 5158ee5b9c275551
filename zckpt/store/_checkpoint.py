"""A committed checkpoint, opened (:class:`Checkpoint`: its manifest, its blobs' headers read
once each and checked against the manifest) and the ranged reads of one blob's tensor bytes
(:class:`FileSource`). Finding and opening one (``latest``, the manifest) is
:mod:`zckpt.store._read`."""

from __future__ import annotations

import bisect
import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import xxhash

from zckpt.errors import FormatError, TruncatedError
from zckpt.format import PREAMBLE_SIZE, BlobHeader, decode_header, read_header_size
from zckpt.format._header import as_bytes_view, parse_preamble
from zckpt.spec import Fragment
from zckpt.spec._plan import EXPERT
from zckpt.store._layout import MANIFEST
from zckpt.store._manifest import FileRecord, Manifest
from zckpt.store._storage import LocalStorage, OpenFile, Storage
from zckpt.tree import Skeleton, unflatten

if TYPE_CHECKING:
    import torch

    from zckpt.assemble._overlap import PlannedIndex, Source, SourceIndex

__all__ = ["Checkpoint", "FileSource"]


def _check_metas(h: BlobHeader, skel: Skeleton, path: str) -> None:
    """The blob's own skeleton agrees with the manifest's on every tensor it holds (a version
    2 blob's leaf columns were checked against the manifest's by ``decode_header``)."""
    own = h.skeleton
    if own is None or own is skel:
        return
    for e in h.fragments:
        leaf = e.fragment.leaf
        mine = own.tensors[leaf] if leaf < len(own.tensors) else None
        if mine != skel.tensors[leaf]:
            raise FormatError(
                f"{path}: tensor {skel.name(leaf)} is {mine} in the file but "
                f"{skel.tensors[leaf]} in the manifest"
            )


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A committed checkpoint, opened: its manifest and lazy, cached access to blob headers.

    Example:
        >>> import tempfile, torch, zckpt
        >>> d = tempfile.mkdtemp()
        >>> _ = zckpt.save_checkpoint(d, {"w": torch.ones(3)}, zckpt.ZeroSpec(2, 3), tag="t")
        >>> ck = zckpt.open_checkpoint(d)
        >>> ck.tag, ck.manifest.spec.world_size, len(ck.sources())
        ('t', 2, 2)
    """

    path: str
    manifest: Manifest
    storage: Storage
    _headers: dict[str, BlobHeader] = field(default_factory=dict, repr=False)
    _starts: dict[str, list[tuple[int, int]]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Blob files held open for the reads of one load (see :meth:`reading`); None outside one.
    _held: list[dict[str, OpenFile] | None] = field(default_factory=lambda: [None], repr=False)
    # Names of the files whose headers were read: the first was compared with the manifest's
    # skeleton and spec (check_skeleton), and every file is bound to the manifest.
    _bound: list[str] = field(default_factory=list, repr=False)

    @property
    def tag(self) -> str:
        """The committed tag."""
        return self.manifest.tag

    def file_path(self, rec: FileRecord) -> str:
        """Absolute path of one of the checkpoint's files."""
        return os.path.join(self.path, rec.name)

    def header(self, rec: FileRecord) -> BlobHeader:
        """The blob header of ``rec`` (two small ranged reads, then cached)."""
        with self._lock:
            h = self._headers.get(rec.name)
        if h is not None:
            return h
        path = self.file_path(rec)
        # The preamble first: on S3 its GET reports the object's size, which the check then
        # takes instead of a HEAD (a short file reads fewer bytes, and the check says so).
        pre = self.storage.read(path, 0, PREAMBLE_SIZE)
        size = self._checked_size(rec)
        try:
            n = read_header_size(pre, blob_size=size)
            self._check_binding(rec, pre)
            # A version 2 blob's skeleton is the manifest's: its digest and leaf columns are
            # checked against it here; a version 1 blob's own is compared below.
            skel = self.manifest.skeleton
            h = decode_header(self.storage.read(path, 0, n), blob_size=size, skeleton=skel)
        except FormatError as e:
            raise type(e)(f"{path}: {e}") from None
        if tuple(f.fragment for f in h.fragments) != rec.fragments:
            raise FormatError(f"{path}: its fragments differ from the manifest's record")
        _check_metas(h, self.manifest.skeleton, path)
        if not self._bound:
            self._check_bound(h, rec)
        with self._lock:
            self._headers[rec.name] = h
            self._bound.append(rec.name)
        return h

    def fragment_index(self, rec: FileRecord, frag: Fragment) -> int:
        """The position of ``frag`` in ``rec``'s blob (from its header, bisected)."""
        h = self.header(rec)
        with self._lock:
            starts = self._starts.get(rec.name)
            if starts is None:
                starts = self._starts[rec.name] = [
                    (e.fragment.leaf, e.fragment.start) for e in h.fragments
                ]
        i = bisect.bisect_left(starts, (frag.leaf, frag.start))
        if i == len(starts) or h.fragments[i].fragment != frag:
            raise FormatError(f"{self.file_path(rec)}: holds no fragment {list(frag)}")
        return i

    def _checked_size(self, rec: FileRecord) -> int:
        """The file's size (a regular file, see :func:`~zckpt.store._storage.open_regular`),
        which must be the recorded one."""
        path = self.file_path(rec)
        size = self.storage.size(path)
        if size != rec.size:
            raise TruncatedError(f"{path}: {size} bytes on disk, the manifest says {rec.size}")
        return size

    def _check_binding(self, rec: FileRecord, preamble: bytes) -> None:
        """The file is the one the manifest committed: its index checksum is the recorded one.

        Chunk checksums cannot tell a file from another checkpoint with the same layout; its
        index (which holds those checksums) differs, and the preamble records the index's hash.
        """
        if rec.index_xxh3 is None:  # manifests before the binding was recorded
            return
        _, got = parse_preamble(as_bytes_view(preamble), rec.size)
        if got != rec.index_xxh3:
            raise FormatError(
                f"{self.file_path(rec)}: not the file this manifest committed (its index "
                f"checksum is {got:#018x}, the manifest recorded {rec.index_xxh3:#018x}): "
                "copied from another checkpoint or rewritten after the commit"
            )

    def check_skeleton(self) -> None:
        """The manifest's skeleton and spec are the ones its files were written with.

        Every rank file's index carries both (a version 2 index the skeleton's digest, checked
        when its header is read), and the file is bound to the manifest by its index checksum;
        comparing with one file's (one small read) catches a manifest rewritten with a valid
        checksum but other values, keys or metas than the files hold.
        """
        if self._bound:
            return  # done when the first header was read: every file is bound to the manifest
        rec = next(iter(self.manifest.files), None)
        if rec is not None:
            self.header(rec)

    def _check_bound(self, h: BlobHeader, rec: FileRecord) -> None:
        m = self.manifest
        if h.skeleton != m.skeleton:
            raise FormatError(
                f"{self.path}/{MANIFEST}: its skeleton (the state's keys, values and tensor metas) "
                f"differs from the one {rec.name} was written with"
            )
        if h.spec != m.spec:
            raise FormatError(
                f"{self.path}/{MANIFEST}: its spec differs from the one {rec.name} was written with"
            )

    def source_index(self) -> SourceIndex | PlannedIndex:
        """The saved fragments, indexed for :func:`~zckpt.assemble.assemble`.

        When every rank file holds its plan's fragments (a version 2 manifest's derived
        layout) they are found by arithmetic on the saved plan, and a file's fragment list
        is only computed when a wanted range touches it; otherwise every listed fragment is
        indexed (:func:`~zckpt.assemble.index_sources`).

        Example:
            >>> import tempfile, torch, zckpt
            >>> from zckpt.spec import Fragment
            >>> d = tempfile.mkdtemp()
            >>> state = {"w": torch.arange(4.0)}
            >>> _ = zckpt.save_checkpoint(d, state, zckpt.ZeroSpec(2, 3), tag="t")
            >>> idx = zckpt.open_checkpoint(d).source_index()
            >>> [(lo, hi) for s, lo, hi in idx.overlapping(Fragment(0, 1, 3))]
            [(1, 2), (2, 3)]
        """
        from zckpt.assemble._overlap import PlannedIndex, index_sources

        m = self.manifest
        if not m.derived:
            return index_sources(m.skeleton, self.sources())
        plan = m.plan()
        by_rank = {f.rank: f for f in m.files if f.expert < 0}
        by_expert = {f.expert: f for f in m.files if f.expert >= 0}

        def source(rank: int, frag: Fragment) -> Source:
            # The fragment's position in its file is looked up in the file's header when it is
            # read: planning never lists a file's fragments (a rank holding every replicated
            # tensor touches every rank's file).
            p = plan.placements[frag.leaf]
            rec = by_expert[p.expert] if p.kind == EXPERT else by_rank[rank]
            return FileSource(frag, self, rec, -1)

        return PlannedIndex(plan, source)

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Within this, each local blob is opened once for all the fragments read from it, not
        once per fragment, and closed on exit: its reads that wait for the disk then go, in
        file order, through one descriptor for the whole load
        (:meth:`~zckpt.store._storage.OpenFile.read_some`), so the kernel's read-ahead runs on
        from one fragment into the next as it does for one plain read of the file. Re-entering
        is allowed (the outermost exit closes).

        Example:
            >>> import tempfile, torch, zckpt
            >>> d = tempfile.mkdtemp()
            >>> s = {"w": torch.arange(4.0)}
            >>> _ = zckpt.save_checkpoint(d, s, zckpt.ZeroSpec(1, 1), tag="t")
            >>> ck = zckpt.open_checkpoint(d)
            >>> with ck.reading():
            ...     [s.read(0, 2).tolist() for s in ck.sources()]
            [[0.0, 1.0]]
        """
        with self._lock:
            outer = self._held[0] is None
            if outer:
                self._held[0] = {}
        try:
            yield
        finally:
            if outer:
                with self._lock:
                    files, self._held[0] = self._held[0] or {}, None
                for f in files.values():
                    f.close()

    def _open_for_reads(self, path: str) -> tuple[OpenFile | None, bool]:
        """(``path`` open for ranged reads, whether the caller closes it), or (None, False)
        when the storage does not read local files with :class:`LocalStorage`'s methods."""
        with self._lock:
            held = self._held[0]
            f = None if held is None else held.get(path)
        if f is not None:
            return f, False
        f = _held_file(self.storage, path)
        if f is None or held is None:
            return f, f is not None
        with self._lock:
            if self._held[0] is held and path not in held:
                held[path] = f
                return f, False
        return f, True

    def sources(self, files: tuple[FileRecord, ...] | None = None) -> list[FileSource]:
        """Every fragment of the given files (default: all rank files), read lazily.

        Nothing is read here: the manifest already says which file holds which range.
        """
        out = []
        for rec in self.manifest.files if files is None else files:
            for i, frag in enumerate(rec.fragments):
                out.append(FileSource(frag, self, rec, i))
        return out

    def client_state(self) -> dict[str, Any]:
        """The client_state saved with the checkpoint ({} when none)."""
        rec = self.manifest.client
        if rec is None:
            return {}
        path = self.file_path(rec)
        from zckpt.format import decode_shard

        data = self.storage.read(path, 0, rec.size)
        self._checked_size(rec)  # after the read: on S3 its GET reported the size
        try:
            if len(data) != rec.size:
                raise TruncatedError(f"{len(data)} bytes read, the manifest says {rec.size}")
            self._check_binding(rec, data[:PREAMBLE_SIZE])
            if xxhash.xxh3_64_intdigest(data) != rec.xxh3:
                raise FormatError(
                    "whole-file xxh3 differs from the manifest's: not the file it committed"
                )
            shard = decode_shard(data)
        except FormatError as e:
            raise type(e)(f"{path}: {e}") from None
        if not shard.skeleton.tensors:  # plain values only: nothing to assemble (no torch)
            plain: dict[str, Any] = unflatten(shard.skeleton, [])
            return plain
        from zckpt.assemble import consolidate

        result: dict[str, Any] = consolidate([shard])
        return result


@dataclass(frozen=True, eq=False)
class FileSource:
    """One saved fragment in a blob file, read range by range (only overlapping chunks).

    ``index`` is its position among the file's fragments; -1 looks it up in the file's header
    when first read.

    Example:
        >>> import tempfile, torch, zckpt
        >>> d = tempfile.mkdtemp()
        >>> _ = zckpt.save_checkpoint(d, {"w": torch.arange(4.0)}, zckpt.ZeroSpec(1, 1), tag="t")
        >>> src = zckpt.open_checkpoint(d).sources()[0]
        >>> src.fragment, src.read(1, 3).tolist()
        (Fragment(leaf=0, start=0, stop=4), [1.0, 2.0])
    """

    fragment: Fragment
    checkpoint: Checkpoint
    record: FileRecord
    index: int

    def _reader(self) -> Any:
        storage, path = self.checkpoint.storage, self.checkpoint.file_path(self.record)

        def read(offset: int, length: int) -> bytes:
            data = storage.read(path, offset, length)
            if len(data) != length:
                raise TruncatedError(
                    f"{path}: wanted {length} bytes at byte {offset}, the file ends first"
                )
            return data

        return read

    def _reader_into(self) -> Any:
        storage, path = self.checkpoint.storage, self.checkpoint.file_path(self.record)

        def read_into(offset: int, out: memoryview) -> int:
            return storage.read_into(path, offset, out)

        return read_into

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of the fragment, checksums verified."""
        return self.read_into(start, stop, None)

    def read_into(self, start: int, stop: int, out: torch.Tensor | None) -> torch.Tensor:
        """Decode elements ``[start, stop)`` straight into ``out`` (or a new tensor).

        From a local file (a plain :class:`~zckpt.store.LocalStorage`), the file is opened once
        for all the chunks (once for the whole load within :meth:`Checkpoint.reading`) and its
        raw chunks are read in spans of adjacent chunks straight into ``out``. When the page
        cache holds them, one span per reader thread, :data:`READ_PIECE` bytes at a time, each
        piece hashed right after its read while it is in the CPU cache; when it does not, one
        thread reads them from the disk in file order, :data:`~zckpt.store._storage.DISK_STEP`
        bytes at a time through the load's one disk descriptor of the file, each step hashed
        while the kernel reads ahead (a large sequential stream, as a plain read of the file
        makes: ``docs/benchmarks.md``, issue 14 part 1, fourth session). From any other storage
        (an object store, or a subclass with its own ``read_into``), one ``read_into`` per
        chunk, after a ``will_need`` hint of the fragment's span. Every chunk is checked
        against its checksum before this returns.
        """
        h = self.checkpoint.header(self.record)
        path = self.checkpoint.file_path(self.record)
        index = self.index
        if index < 0:
            index = self.checkpoint.fragment_index(self.record, self.fragment)
        chunks = [
            c for c in h.fragments[index].chunks if c.start_elem < stop and c.stop_elem > start
        ]
        storage = self.checkpoint.storage
        held, mine = self.checkpoint._open_for_reads(path) if chunks else (None, False)
        # Imported here: reading headers (zckpt inspect) needs none of the decoder.
        from zckpt.format import decode_fragment
        from zckpt.format._decode import decode_threads

        try:
            span: int | None = None
            threads: int | None = None
            behind = False
            if held is not None:
                piece, span = READ_PIECE, READ_SPAN
                first, last = chunks[0], chunks[-1]
                hot = held.cached(first.offset, last.offset + last.length - first.offset)
                # Known to be in the page cache: no need to ask again for each piece.
                read_into = partial(_read_some, held, ask=hot is not True)
                if hot is False:
                    # From the disk: one reader in file order (a second one would only split
                    # the disk stream); with a core to spare, the hashing runs behind it on
                    # that core, so the reader asks for the next bytes at once.
                    threads = 1
                    behind = decode_threads() > 1
            else:
                read_into, piece = self._reader_into(), None
                will_need = getattr(storage, "will_need", None)
                if chunks and will_need is not None:
                    first, last = chunks[0], chunks[-1]
                    will_need(path, first.offset, last.offset + last.length - first.offset)
            return decode_fragment(
                h,
                index,
                self._reader(),
                start=start,
                stop=stop,
                out=out,
                read_into=read_into,
                piece_bytes=piece,
                span_bytes=span,
                threads=threads,
                hash_behind=behind,
            )
        except FormatError as e:
            raise type(e)(f"{path}: {e}") from None
        finally:
            if held is not None and mine:
                held.close()


# Bytes of a raw chunk read (and then hashed) at a time from a local file: the core's cache
# holds them when the hash reads them back (a whole 8 MiB chunk would be hashed from memory:
# on a busy machine as slow as the read's own copy; docs/benchmarks.md, issue 14 part 1).
READ_PIECE = 512 << 10
# Most bytes of adjacent raw chunks read as one span (by one thread, in pieces or steps).
READ_SPAN = 64 << 20


def _read_some(f: OpenFile, offset: int, out: memoryview, *, ask: bool = True) -> int:
    """One piece from the page cache, or (when the disk must be waited for) one disk step."""
    return f.read_some(offset, out, READ_PIECE, ask=ask)


def _held_file(storage: Storage, path: str) -> OpenFile | None:
    """``path`` open for a fragment's reads, when ``storage`` reads local files with
    :class:`LocalStorage`'s own methods; None otherwise (reads then go through
    ``storage.read_into``, chunk by chunk, whatever it does)."""
    if not isinstance(storage, LocalStorage):
        return None
    kind = type(storage)
    if kind.read_into is not LocalStorage.read_into or kind.will_need is not LocalStorage.will_need:
        return None
    return storage.open_reads(path)
