"""Durable local writes: ``writev`` in IOV_MAX batches, early write-back, and the whole-file
hash computed in the writing pass.

``LocalStorage.write_atomic`` (``_storage.py``) owns the protocol (temporary name, fsync,
rename, directory fsync); this module writes the bytes. A buffer list is written in windows of
:data:`_WINDOW` bytes, each window's write-back started as the next is written
(``sync_file_range``), and the xxh3 of the whole file is taken :data:`_HASH_PIECE` bytes at a
time just before each piece is written, while it is in the CPU cache. A compressed blob
(a :class:`~zckpt.format.BlobStream`) is written frames first and its head last, into the
room reserved for it, and then hashed from the file.
"""

from __future__ import annotations

import errno
import functools
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import xxhash

if TYPE_CHECKING:
    from zckpt.format import BlobStream

__all__ = ["views", "windows", "write_hashing", "write_stream"]

# writev takes at most IOV_MAX buffers per call (1024 on Linux).
_IOV_MAX = 1024
# Bytes written between two write-back starts: large enough for big sequential disk writes,
# small enough that the disk starts early and the dirty pages of one file stay few.
_WINDOW = 32 << 20
# Bytes hashed just before they are written: small enough to still be in the core's cache when
# ``writev`` copies them, so the whole-file hash adds no second pass over memory (see
# :func:`write_hashing`).
_HASH_PIECE = 512 << 10


def views(buffers: Iterable[memoryview | bytes]) -> list[memoryview]:
    views = [memoryview(b).cast("B") for b in buffers]
    return [b for b in views if b.nbytes]


@functools.cache
def _sync_file_range() -> Callable[[int, int, int], None]:
    """``sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE)`` where the C library has it.

    It starts the disk write of a range of dirty pages and returns at once, so the disk works
    while the next window is copied into the page cache; the final ``fsync`` then waits for
    little. It is a hint: its errors are ignored, since the ``fsync`` reports any real one.
    Elsewhere (not Linux) a no-op, and the ``fsync`` does all the work as before.
    """
    import ctypes  # here, on the first write: no work at import

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return lambda fd, offset, n: None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def start(fd: int, offset: int, n: int) -> None:
        fn(fd, offset, n, _SYNC_FILE_RANGE_WRITE)

    return start


_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, n: int) -> None:
    """Start the disk write of ``n`` bytes of ``fd`` from ``offset`` (:func:`_sync_file_range`,
    looked up in the C library on the first call)."""
    _sync_file_range()(fd, offset, n)


def windows(
    buffers: Iterable[memoryview | bytes],
    window: int,
    max_buffers: int = _IOV_MAX,
    grow_every: int = 0,
) -> Iterator[list[memoryview]]:
    """``buffers`` regrouped into lists of at most ``window`` bytes and ``max_buffers`` views
    (consumed lazily: a generator of buffers is read one window ahead of the writes). Only the
    last list may hold fewer bytes, unless the buffer cap closed one first. With
    ``grow_every`` = k > 0 the window doubles after every k lists (object-store parts of a
    stream whose size is unknown until its end).

    Example:
        >>> [[bytes(v) for v in w] for w in windows([b"abc", b"de"], 2)]
        [[b'ab'], [b'c', b'd'], [b'e']]
        >>> [len(b"".join(w)) for w in windows([bytes(10)], 1, grow_every=2)]
        [1, 1, 2, 2, 4]
    """
    batch: list[memoryview] = []
    count = 0
    room = window
    for buf in buffers:
        b = memoryview(buf).cast("B")
        while b.nbytes:
            piece = b[:room]
            batch.append(piece)
            room -= piece.nbytes
            b = b[piece.nbytes :]
            if room == 0 or len(batch) == max_buffers:
                yield batch
                count += 1
                batch, room = [], window << (count // grow_every if grow_every else 0)
    if batch:
        yield batch


def _writev_exact(fd: int, batch: list[memoryview]) -> int:
    """``writev`` all of ``batch`` at the file position, resuming after short writes."""
    pending, total = list(batch), 0
    while pending:
        n = os.writev(fd, pending)
        total += n
        # Drop fully written buffers; keep the unwritten tail of a partly written one.
        while n:
            if n >= pending[0].nbytes:
                n -= pending[0].nbytes
                pending.pop(0)
            else:
                pending[0] = pending[0][n:]
                n = 0
    return total


def _writev_all(
    fd: int,
    buffers: Iterable[memoryview | bytes],
    window: int = _WINDOW,
    base: int = 0,
    hasher: xxhash.xxh3_64 | None = None,
) -> int:
    """Write ``buffers`` in order at the file position (``base``), window by window, starting
    each window's disk write as soon as it is in the page cache (:func:`_sync_file_range`).

    With a ``hasher``, each window is written in pieces of at most ``_HASH_PIECE`` bytes, each
    fed to ``hasher.update`` just before its ``writev``: the copy into the page cache then
    reads bytes the hash has just brought into the cache.
    """
    total = 0
    for batch in windows(buffers, window):
        start = base + total
        if hasher is None:
            total += _writev_exact(fd, batch)
        else:
            for piece in windows(batch, _HASH_PIECE):
                for b in piece:
                    hasher.update(b)
                total += _writev_exact(fd, piece)
        _start_writeback(fd, start, base + total - start)
    return total


def _alongside(background: Callable[[], int], foreground: Callable[[], int]) -> tuple[int, int]:
    """Run ``background`` in a thread while ``foreground`` runs here; both results, in that
    order. Used to overlap hashing with writing or fsync (each releases the GIL). The first
    error raised (foreground's first) propagates once both have finished."""
    result: list[int] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(background())
        except BaseException as e:  # re-raised in the caller's thread below
            failure.append(e)

    worker = threading.Thread(target=run, name="zckpt-io")
    worker.start()
    try:
        mine = foreground()
    finally:
        worker.join()
    if failure:
        raise failure[0]
    return result[0], mine


def write_hashing(fd: int, buffers: list[memoryview]) -> tuple[int, int]:
    """Write ``buffers`` and fsync; return (size, xxh3_64 of the bytes written).

    The whole-file checksum the manifest records is computed in the same pass as the write,
    piece by piece while each piece is in the CPU cache (:func:`_writev_all`), not by a second
    thread over the whole file: on a machine whose cores are busy (or share a memory bus) a
    concurrent pass over the same memory slowed the write itself by up to 2x, where hashing
    from the cache costs a few percent of it (docs/benchmarks.md, issue 14 part 5). On a disk
    the hash still overlaps the disk's write-back, which :func:`_sync_file_range` starts per
    window.
    """
    hasher = xxhash.xxh3_64()
    size = _writev_all(fd, buffers, hasher=hasher)
    os.fsync(fd)
    return size, hasher.intdigest()


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _hash_file(fd: int, size: int) -> int:
    """xxh3_64 of the first ``size`` bytes of an open file (read back from the page cache)."""
    hasher, buf = xxhash.xxh3_64(), memoryview(bytearray(_WINDOW))
    pos = 0
    while pos < size:
        n = os.preadv(fd, [buf[: min(_WINDOW, size - pos)]], pos)
        if n <= 0:
            raise OSError(errno.EIO, f"the file ends at byte {pos} of the {size} just written")
        hasher.update(buf[:n])
        pos += n
    return hasher.intdigest()


def write_stream(fd: int, blob: BlobStream) -> tuple[int, int]:
    """Frames from ``data_offset`` on as they are encoded, then the head at 0; then fsync while
    the whole file is hashed back from the page cache (the head, written last, comes first)."""
    os.lseek(fd, blob.data_offset, os.SEEK_SET)
    size = blob.data_offset + _writev_all(fd, blob.frames(), base=blob.data_offset)
    _pwrite_all(fd, blob.head(), 0)

    def flush() -> int:
        os.fsync(fd)
        return 0

    _, digest = _alongside(flush, lambda: _hash_file(fd, size))
    return size, digest
