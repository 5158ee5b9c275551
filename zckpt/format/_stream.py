"""A blob encoded while it is written: frames leave a bounded thread pool in file order, and the
header, which must come first in the file but lists every frame, is written last into room
reserved for it.

:func:`encode_shard_parts` compresses every frame before the first byte can be written, so a
compressed save holds the whole compressed shard in memory and writes only after compressing.
:class:`BlobStream` reserves the most room the index can take (every integer it will hold at its
longest msgpack form), so frame offsets are known as soon as the frames before them are, and
compression overlaps the writing with at most ``2 * threads`` frames in memory; chunks of GPU
tensors are copied to the host one at a time as they are encoded, so saving a GPU shard never
holds the whole shard in host memory (raw frames too stream for them). The result is a
valid blob (docs/format.md allows zero padding between the index and the first frame), decoding
to the same shard as :func:`encode_shard`'s; only that padding may be longer.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from zckpt.errors import ZckptError
from zckpt.format._checksum import xxh3
from zckpt.format._codecs import BYTEPLANE, Frame
from zckpt.format._encode import (
    _ZEROS,
    _check_args,
    _check_extra,
    _encode,
    _Job,
    _jobs,
    check_version,
    default_threads,
    pool_map,
)
from zckpt.format._header import PREAMBLE_SIZE, BlobHeader, ChunkEntry, align, pack_preamble
from zckpt.format._index import decode_header, pack_index, shard_index
from zckpt.shard import Shard
from zckpt.spec import Fragment

__all__ = ["BlobStream", "encode_shard_stream"]

_MAX_U64 = (1 << 64) - 1


def _room(shard: Shard, jobs: list[_Job], code: int, extra: dict[str, Any], version: int) -> int:
    """Bytes that the preamble and index can need at most, rounded up to the frame alignment."""
    entries: list[tuple[Fragment, list[ChunkEntry]]] = [(f, []) for f in shard.fragments]
    for j in jobs:
        planar = code == BYTEPLANE and j.planar
        planes = ((0, _MAX_U64),) * j.itemsize if planar else ()
        c = ChunkEntry(j.start, j.stop, code, _MAX_U64, _MAX_U64, len(j.src), _MAX_U64, planes)
        entries[j.fragment][1].append(c)
    obj = shard_index(shard, entries, extra, _MAX_U64, version)
    return align(PREAMBLE_SIZE + len(pack_index(obj)))


class BlobStream:
    """One shard's blob, produced frame by frame (see the module docstring).

    Iterate :meth:`frames` once, writing each buffer at consecutive offsets from
    ``data_offset``; then :meth:`head` is the first ``data_offset`` bytes of the file. Iterating
    the stream itself yields the whole blob in file order (head first), for writers that cannot
    write out of order; that holds every frame in memory, as :func:`encode_shard_parts` does.

    Example:
        >>> import torch, zckpt
        >>> from zckpt.format import decode_shard
        >>> s = {"w": torch.randn(5000)}
        >>> shard = zckpt.shard_state(s, zckpt.plan_shards(s, zckpt.ZeroSpec(1, 1)), 0)
        >>> stream = encode_shard_stream(shard, codec="byteplane", chunk_bytes=4096)
        >>> body = b"".join(stream.frames())
        >>> blob = stream.head() + body
        >>> len(blob) == stream.size and torch.equal(decode_shard(blob).data[0], s["w"])
        True
    """

    def __init__(
        self,
        shard: Shard,
        code: int,
        level: int,
        chunk_bytes: int,
        threads: int,
        extra: Any,
        version: int = 1,
    ) -> None:
        self._shard, self._code, self._level, self._threads = shard, code, level, threads
        self._extra, self._version = extra, version
        self._jobs = _jobs(shard, chunk_bytes, lazy_devices=True)
        self.data_offset = _room(shard, self._jobs, code, extra, version)
        self._entries: list[tuple[Fragment, list[ChunkEntry]]] | None = None
        self._end = self.data_offset
        self._started = False

    @property
    def size(self) -> int:
        """The blob's size in bytes (known once :meth:`frames` is exhausted)."""
        self._require_done()
        return self._end

    def frames(self) -> Iterator[memoryview | bytes]:
        """The bytes after ``data_offset``, in file order: each frame's pieces, zero-padded."""
        if self._started:
            raise ZckptError("a BlobStream's frames can be iterated once")
        self._started = True
        entries: list[tuple[Fragment, list[ChunkEntry]]] = [(f, []) for f in self._shard.fragments]
        pos = self.data_offset
        for job, fr in zip(self._jobs, self._encoded(), strict=True):
            at = align(pos)
            if at > pos:
                yield _ZEROS[: at - pos]
            c = ChunkEntry(
                job.start, job.stop, fr.codec, at, fr.length, len(job.src), fr.checksum, fr.planes
            )
            entries[job.fragment][1].append(c)
            yield from fr.pieces
            pos = at + fr.length
        self._end = pos
        self._entries = entries

    def head(self) -> bytes:
        """Preamble, index and zero padding: the file's first ``data_offset`` bytes."""
        entries = self._require_done()
        obj = shard_index(self._shard, entries, self._extra, self._end, self._version)
        index = pack_index(obj)
        head = pack_preamble(index, xxh3(index), self._version) + index
        if len(head) > self.data_offset:  # _room is an upper bound: this is a bug, not bad input
            raise AssertionError(f"index of {len(head)} bytes exceeds its {self.data_offset}")
        return head + bytes(self.data_offset - len(head))

    @property
    def header(self) -> BlobHeader:
        """The decoded header (after :meth:`frames` is exhausted)."""
        return decode_header(self.head(), skeleton=self._shard.skeleton)

    def __iter__(self) -> Iterator[memoryview | bytes]:
        body = list(self.frames())
        yield self.head()
        yield from body

    def _require_done(self) -> list[tuple[Fragment, list[ChunkEntry]]]:
        if self._entries is None:
            raise ZckptError("the blob's frames have not all been produced yet")
        return self._entries

    def _encoded(self) -> Iterator[Frame]:
        """Frames in order, at most ``2 * threads`` encoded ahead of the consumer."""
        code, level = self._code, self._level
        work = sum(len(j.src) for j in self._jobs)
        return pool_map(lambda j: _encode(j, code, level), self._jobs, self._threads, work)


def encode_shard_stream(
    shard: Shard,
    *,
    codec: str = "raw",
    level: int = 1,
    chunk_bytes: int = 8 << 20,
    threads: int | None = None,
    extra: Mapping[str, Any] | None = None,
    version: int = 1,
) -> BlobStream:
    """Encode a shard as a :class:`BlobStream` (arguments as :func:`encode_shard`).

    Example:
        >>> import torch, zckpt
        >>> s = {"w": torch.ones(10)}
        >>> shard = zckpt.shard_state(s, zckpt.plan_shards(s, zckpt.ZeroSpec(1, 1)), 0)
        >>> stream = encode_shard_stream(shard, codec="zstd")
        >>> blob = b"".join(stream)          # head first: the whole blob, held in memory
        >>> zckpt.format.decode_shard(blob).data[0].tolist() == [1.0] * 10
        True
    """
    code = _check_args(codec, level, chunk_bytes, threads)
    check_version(version)
    n_threads = default_threads() if threads is None else threads
    return BlobStream(shard, code, level, chunk_bytes, n_threads, _check_extra(extra), version)
