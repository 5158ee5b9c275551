"""Storage: the only place zckpt touches files. Atomic, durable writes and ranged reads.

Every file is written under a temporary name in its final directory, fsynced, renamed into
place, and the directory fsynced, so a crash at any instant leaves either no file or the whole
file. A failed write removes its temporary file. Tests swap in a :class:`Storage` that injects
faults (ENOSPC, EIO) to check that nothing already on disk is lost.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import xxhash

from zckpt.errors import ZckptError
from zckpt.format import BlobStream

__all__ = ["LocalStorage", "Storage", "StorageError"]

# writev takes at most IOV_MAX buffers per call (1024 on Linux).
_IOV_MAX = 1024
# Bytes written between two write-back starts: large enough for big sequential disk writes,
# small enough that the disk starts early and the dirty pages of one file stay few.
_WINDOW = 32 << 20


class StorageError(ZckptError, OSError):
    """A file operation failed; the message names the file and keeps the OS error.

    Example:
        >>> issubclass(StorageError, OSError)
        True
    """


class Storage(Protocol):
    """What checkpoint directories need from a filesystem."""

    def write_atomic(self, path: str, buffers: Iterable[memoryview | bytes]) -> tuple[int, int]:
        """Write ``buffers`` durably as ``path``; return (size, xxh3_64 of the bytes).

        ``buffers`` may be a :class:`~zckpt.format.BlobStream` (compressed saves): iterating it
        yields the whole blob in order; a storage that can write at offsets may instead stream
        its frames and write its head last, as :class:`LocalStorage` does.
        """
        ...

    def read(self, path: str, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset`` (fewer only at end of file)."""
        ...

    def read_into(self, path: str, offset: int, out: memoryview) -> int:
        """Read into ``out`` at ``offset``; return the bytes read."""
        ...

    def size(self, path: str) -> int:
        """File size in bytes."""
        ...

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists."""
        ...

    def listdir(self, path: str) -> list[str]:
        """Entry names in a directory ([] if it does not exist)."""
        ...

    def makedirs(self, path: str) -> None:
        """Create a directory and its parents (durably)."""
        ...

    def remove(self, path: str) -> None:
        """Remove a file if it exists."""
        ...

    def rmtree(self, path: str) -> None:
        """Remove a directory tree if it exists."""
        ...

    def is_dir(self, path: str) -> bool:
        """Whether ``path`` is a directory."""
        ...


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _views(buffers: Iterable[memoryview | bytes]) -> list[memoryview]:
    views = [memoryview(b).cast("B") for b in buffers]
    return [b for b in views if b.nbytes]


def _sync_file_range() -> Callable[[int, int, int], None]:
    """``sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE)`` where the C library has it.

    It starts the disk write of a range of dirty pages and returns at once, so the disk works
    while the next window is copied into the page cache; the final ``fsync`` then waits for
    little. It is a hint: its errors are ignored, since the ``fsync`` reports any real one.
    Elsewhere (not Linux) a no-op, and the ``fsync`` does all the work as before.
    """
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
_start_writeback = _sync_file_range()


def _windows(buffers: Iterable[memoryview | bytes], window: int) -> Iterator[list[memoryview]]:
    """``buffers`` regrouped into lists of at most ``window`` bytes and ``_IOV_MAX`` buffers
    (consumed lazily: a generator of buffers is read one window ahead of the writes)."""
    batch: list[memoryview] = []
    room = window
    for buf in buffers:
        b = memoryview(buf).cast("B")
        while b.nbytes:
            piece = b[:room]
            batch.append(piece)
            room -= piece.nbytes
            b = b[piece.nbytes :]
            if room == 0 or len(batch) == _IOV_MAX:
                yield batch
                batch, room = [], window
    if batch:
        yield batch


def _writev_all(
    fd: int, buffers: Iterable[memoryview | bytes], window: int = _WINDOW, base: int = 0
) -> int:
    """Write ``buffers`` in order at the file position (``base``), window by window, starting
    each window's disk write as soon as it is in the page cache (:func:`_sync_file_range`)."""
    total = 0
    for batch in _windows(buffers, window):
        start = base + total
        pending = list(batch)
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


def _hash(buffers: Iterable[memoryview]) -> int:
    hasher = xxhash.xxh3_64()
    for b in buffers:
        hasher.update(b)
    return hasher.intdigest()


def _write_hashing(fd: int, buffers: list[memoryview]) -> tuple[int, int]:
    """Write ``buffers`` and fsync while another thread hashes them; return (size, xxh3_64).

    Writing, the disk flush and the hash overlap, so the whole-file checksum the manifest
    records costs no time of its own while the disk is the bottleneck.
    """

    def write() -> int:
        size = _writev_all(fd, buffers)
        os.fsync(fd)
        return size

    digest, size = _alongside(lambda: _hash(buffers), write)
    return size, digest


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


def _write_stream(fd: int, blob: BlobStream) -> tuple[int, int]:
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


class LocalStorage:
    """POSIX files: ``writev`` straight from tensor memory, ``fsync``, rename, directory fsync.

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> LocalStorage().write_atomic(os.path.join(d, "f"), [b"ab", memoryview(b"cd")])[0]
        4
        >>> LocalStorage().read(os.path.join(d, "f"), 1, 2)
        b'bc'
    """

    def write_atomic(self, path: str, buffers: Iterable[memoryview | bytes]) -> tuple[int, int]:
        """Write to a temporary sibling, fsync, rename over ``path``, fsync the directory.

        A :class:`~zckpt.format.BlobStream` is written as it is encoded: frames from its
        ``data_offset`` on, then its head at the start (see :func:`_write_stream`).
        """
        d, name = os.path.split(path)
        tmp = os.path.join(d, f".{name}.tmp.{secrets.token_hex(4)}")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                if isinstance(buffers, BlobStream):
                    size, digest = _write_stream(fd, buffers)
                else:
                    size, digest = _write_hashing(fd, _views(buffers))
            finally:
                os.close(fd)
            os.replace(tmp, path)
            _fsync_dir(d or ".")
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StorageError(e.errno, f"writing {path}: {e.strerror or e}") from e
        return size, digest

    def read(self, path: str, offset: int, length: int) -> bytes:
        """``pread`` of ``length`` bytes at ``offset``."""
        try:
            with open(path, "rb", buffering=0) as f:
                return os.pread(f.fileno(), length, offset) if length else b""
        except FileNotFoundError as e:
            raise StorageError(errno.ENOENT, f"{path}: no such file") from e
        except OSError as e:
            raise StorageError(e.errno, f"reading {path} at byte {offset}: {e.strerror}") from e

    def will_need(self, path: str, offset: int, length: int) -> None:
        """Start reading ``length`` bytes at ``offset`` into the page cache (a hint, not waited
        for): the disk streams a fragment's chunks while earlier ones are checked and copied."""
        with contextlib.suppress(OSError, AttributeError):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def read_into(self, path: str, offset: int, out: memoryview) -> int:
        """``preadv`` into ``out`` (tensor memory) at ``offset``, looping over short reads."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError as e:
            raise StorageError(errno.ENOENT, f"{path}: no such file") from e
        try:
            view, done = out.cast("B"), 0
            while done < view.nbytes:
                n = os.preadv(fd, [view[done:]], offset + done)
                if n == 0:
                    break
                done += n
            return done
        except OSError as e:
            raise StorageError(e.errno, f"reading {path} at byte {offset}: {e.strerror}") from e
        finally:
            os.close(fd)

    def size(self, path: str) -> int:
        """``os.stat(path).st_size``."""
        try:
            return os.stat(path).st_size
        except FileNotFoundError as e:
            raise StorageError(errno.ENOENT, f"{path}: no such file") from e

    def exists(self, path: str) -> bool:
        """``os.path.exists``."""
        return os.path.exists(path)

    def is_dir(self, path: str) -> bool:
        """``os.path.isdir``."""
        return os.path.isdir(path)

    def listdir(self, path: str) -> list[str]:
        """Sorted entries, or [] for a missing directory."""
        try:
            return sorted(os.listdir(path))
        except FileNotFoundError:
            return []

    def makedirs(self, path: str) -> None:
        """``os.makedirs`` then fsync of the parent, so the new directory entry is durable."""
        path = os.path.abspath(path)
        if os.path.isdir(path):
            return
        try:
            os.makedirs(path, exist_ok=True)
            _fsync_dir(os.path.dirname(path))
        except OSError as e:
            raise StorageError(e.errno, f"creating directory {path}: {e.strerror}") from e

    def remove(self, path: str) -> None:
        """Unlink a file; missing is fine."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def rmtree(self, path: str) -> None:
        """Remove a directory tree; missing is fine."""
        shutil.rmtree(path, ignore_errors=True)
        if os.path.exists(os.path.dirname(path) or "."):
            _fsync_dir(os.path.dirname(path) or ".")
