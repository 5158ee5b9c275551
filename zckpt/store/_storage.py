"""Storage: the only place zckpt touches files. Atomic, durable writes and ranged reads.

Every file is written under a temporary name in its final directory, fsynced, renamed into
place, and the directory fsynced, so a crash at any instant leaves either no file or the whole
file. A failed write removes its temporary file. Tests swap in a :class:`Storage` that injects
faults (ENOSPC, EIO) to check that nothing already on disk is lost.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from zckpt.errors import ZckptError
from zckpt.store._write import views, write_hashing, write_stream

if TYPE_CHECKING:
    pass

__all__ = ["LocalStorage", "Lock", "OpenFile", "Storage", "StorageError"]

# ``preadv2`` flag: fail with EAGAIN instead of waiting for the disk (Linux 4.14+); 0 elsewhere.
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
# Linux's ``cachestat`` (6.5+; one number on every architecture since 5.1's common table).
_CACHESTAT = 451
_cachestat: list[Any] = []  # [libc.syscall] once found to work; [None] once found not to


def cached(fd: int, offset: int, length: int) -> bool | None:
    """Whether the page cache holds all of bytes ``[offset, offset + length)`` of ``fd``
    (``cachestat(2)``: a question to the page cache that starts no disk read); None where the
    kernel cannot say (not Linux, older than 6.5, or the call refused).

    A ``preadv2(RWF_NOWAIT)`` that misses is no such question: it starts a small read-ahead of
    4 KiB pages at the place it asked for, which splits the large requests of a sequential
    read that arrives there next (``docs/benchmarks.md``, issue 14 part 1, fourth session).

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "f")
        >>> _ = LocalStorage().write_atomic(p, [b"x" * 8192])
        >>> fd = os.open(p, os.O_RDONLY)
        >>> cached(fd, 0, 8192) in (True, False, None)
        True
        >>> os.close(fd)
    """
    if not _cachestat:
        _cachestat.append(_libc_syscall())
    call = _cachestat[0]
    if call is None:
        return None
    import ctypes

    rng = (ctypes.c_uint64 * 2)(offset, length)
    out = (ctypes.c_uint64 * 5)()  # cache, dirty, writeback, evicted, recently evicted
    if call(_CACHESTAT, fd, rng, out, 0) != 0:
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):  # no such call, or not allowed
            _cachestat[0] = None
        return None
    first, last = offset // _PAGE, (offset + length - 1) // _PAGE
    return bool(out[0] >= last - first + 1)


def _libc_syscall() -> Any:
    """libc's ``syscall`` on Linux, else None."""
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


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
        """Whether ``path`` is a directory itself (not a symbolic link to one)."""
        ...

    def remove_dir(self, path: str) -> None:
        """Remove ``path`` if it is an empty directory (missing or not empty: left as it is)."""
        ...

    def try_lock(self, path: str, owner: str) -> Lock | None:
        """Take the exclusive lock named ``path`` without waiting, or return None when another
        holder has it. ``owner`` (who and since when) is readable by others with
        :meth:`lock_owner` while it is held. A holder that dies loses the lock."""
        ...

    def lock_owner(self, path: str) -> str:
        """Who holds the lock ``path`` (best effort: "" when unknown)."""
        ...


class Lock(Protocol):
    """A held lock (see :meth:`Storage.try_lock`)."""

    def intact(self) -> bool:
        """Whether the lock is still held and still the one at its path (nobody removed it)."""
        ...

    def release(self) -> None:
        """Remove the lock's file and let it go; a second call does nothing."""
        ...


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISLNK, "a symbolic link"),
)


def _kind(mode: int) -> str:
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def open_regular(path: str, *, follow: bool = False) -> int:
    """A read-only descriptor of ``path`` if it is a regular file, else a StorageError.

    Opened without blocking (a FIFO would block ``open`` forever) and, unless ``follow``,
    without following a final symbolic link, then checked with ``fstat``: zckpt never reads
    from anything but a regular file. (zckpt's own files are never links; DeepSpeed folders,
    which users assemble, may link to regular files: ``follow=True``.)
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as e:
        raise StorageError(errno.ENOENT, f"{path}: no such file") from e
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise StorageError(
                e.errno, f"{path}: is a symbolic link; zckpt opens only regular files"
            ) from e
        raise StorageError(e.errno, f"opening {path}: {e.strerror}") from e
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise StorageError(
            errno.EINVAL, f"{path}: is {_kind(mode)}, not a regular file; zckpt reads only files"
        )
    return fd


class _FileLock:
    """``flock`` on a lock file: released by the kernel when its holder dies, so a crashed
    writer never leaves a stale lock; the file's identity is rechecked after locking, so a lock
    file removed and recreated by someone else is never mistaken for ours."""

    def __init__(self, path: str, fd: int) -> None:
        self.path, self._fd = path, fd

    def intact(self) -> bool:
        if self._fd < 0:
            return False
        try:
            here, mine = os.stat(self.path, follow_symlinks=False), os.fstat(self._fd)
        except OSError:
            return False
        return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)

    def release(self) -> None:
        if self._fd < 0:
            return
        try:
            if self.intact():
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
        finally:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = -1


def lock_owner_text() -> str:
    """Who this process is, for a lock file: host, pid and when it took the lock."""
    import socket  # here: reading a checkpoint takes no lock

    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return f"pid {os.getpid()} on {socket.gethostname()} since {stamp}"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Bytes of a disk read at a time (see OpenFile.read_some): the caller hashes each while the
# kernel's read-ahead, a window ahead on the same descriptor, keeps the disk busy.
DISK_STEP = 16 << 20


class OpenFile:
    """A regular file (checked by :func:`open_regular`) open for ranged reads: ``preadv`` at
    offsets, safe from several threads at once (no shared file position). A context manager:
    it closes the file on exit.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "f")
        >>> _ = LocalStorage().write_atomic(p, [b"abcdef"])
        >>> with LocalStorage().open_reads(p) as f:
        ...     buf = bytearray(4)
        ...     f.read_into(4, memoryview(buf))
        2
    """

    def __init__(self, path: str, fd: int) -> None:
        self.path, self._fd = path, fd
        # Reads that wait for the disk: one at a time, in the order they come, through a
        # descriptor of their own (see read_some).
        self._disk_fd = -1
        self._disk = threading.Lock()

    def read_into(self, offset: int, out: memoryview) -> int:
        """``preadv`` into ``out`` at ``offset``, looping over short reads; the bytes read
        (fewer than ``out`` holds only at the end of the file)."""
        return _pread_fully(self._fd, self.path, offset, out.cast("B"))

    def read_some(self, offset: int, out: memoryview, piece: int, *, ask: bool = True) -> int:
        """Read at ``offset`` into ``out``; the bytes read (at least one, unless the file
        ends). When the page cache holds the first ``piece`` bytes of ``out`` (asked with
        :func:`cached` unless ``ask`` is false, for a caller that has just asked about a range
        holding them; tried too where the kernel cannot say): those bytes, with
        ``preadv2(RWF_NOWAIT)``, which never waits for the disk. Otherwise (or when that read
        would wait) the next :data:`DISK_STEP` bytes of ``out`` from the disk.

        Reads from the disk take turns on one descriptor of their own, kept for this object's
        life: the disk then sees one sequential stream of large requests, as a plain read of
        the file from start to end makes, and the kernel's read-ahead on that descriptor (its
        window, and the large folios it grows into) carries on from one read to the next.
        Nothing else reads through it, and no read that misses the cache is tried first: a
        ``RWF_NOWAIT`` read that misses starts a read-ahead of small pages at its offset,
        which splits that stream into small disk requests (``docs/benchmarks.md``, issue 14
        part 1, fourth session).

        Example:
            >>> import tempfile, os
            >>> p = os.path.join(tempfile.mkdtemp(), "f")
            >>> _ = LocalStorage().write_atomic(p, [b"abcdef"])
            >>> with LocalStorage().open_reads(p) as f:
            ...     f.read_some(1, memoryview(bytearray(4)), 2) in (2, 4)
            True
        """
        view = out.cast("B")
        first = view[:piece]
        if _NOWAIT and (not ask or cached(self._fd, offset, first.nbytes) is not False):
            try:
                n = os.preadv(self._fd, [first], offset, _NOWAIT)
            except BlockingIOError:
                pass  # still (or again) on its way from the disk: wait for it below
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise StorageError(
                        e.errno, f"reading {self.path} at byte {offset}: {e.strerror}"
                    ) from e
            else:
                if n > 0:
                    return n
        with self._disk:
            if self._disk_fd < 0:
                if self._fd < 0:
                    raise StorageError(errno.EBADF, f"reading {self.path}: the file is closed")
                self._disk_fd = open_regular(self.path)
            return _pread_fully(self._disk_fd, self.path, offset, view[:DISK_STEP])

    def cached(self, offset: int, length: int) -> bool | None:
        """Whether the page cache holds all of ``[offset, offset + length)`` (:func:`cached`;
        None where the kernel cannot say).

        Example:
            >>> import tempfile, os
            >>> p = os.path.join(tempfile.mkdtemp(), "f")
            >>> _ = LocalStorage().write_atomic(p, [b"abcdef"])
            >>> with LocalStorage().open_reads(p) as f:
            ...     f.cached(0, 6) in (True, None)  # just written: in the page cache
            True
        """
        return cached(self._fd, offset, length)

    def close(self) -> None:
        """Close the file; a second call does nothing."""
        with self._disk:
            fds, self._fd, self._disk_fd = (self._fd, self._disk_fd), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def __enter__(self) -> OpenFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pread_fully(fd: int, path: str, offset: int, view: memoryview) -> int:
    """``preadv`` into ``view`` at ``offset``, looping over short reads; the bytes read (fewer
    than ``view`` holds only at the end of the file)."""
    done = 0
    try:
        while done < view.nbytes:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                break
            done += n
    except OSError as e:
        raise StorageError(e.errno, f"reading {path} at byte {offset + done}: {e.strerror}") from e
    return done


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
        ``data_offset`` on, then its head at the start (see :func:`write_stream`).
        """
        from zckpt.format import BlobStream  # here: reading files needs no encoder

        d, name = os.path.split(path)
        tmp = os.path.join(d, f".{name}.tmp.{os.urandom(4).hex()}")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                if isinstance(buffers, BlobStream):
                    size, digest = write_stream(fd, buffers)
                else:
                    size, digest = write_hashing(fd, views(buffers))
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
        """``pread`` of ``length`` bytes at ``offset`` (of a regular file: see
        :func:`open_regular`); never more than the file holds is allocated."""
        fd = open_regular(path)
        try:
            if not length:
                return b""
            length = max(0, min(length, os.fstat(fd).st_size - offset))
            return os.pread(fd, length, offset) if length else b""
        except OSError as e:
            raise StorageError(e.errno, f"reading {path} at byte {offset}: {e.strerror}") from e
        finally:
            os.close(fd)

    def will_need(self, path: str, offset: int, length: int) -> None:
        """Start reading ``length`` bytes at ``offset`` into the page cache (a hint, not waited
        for): the disk streams a fragment's chunks while earlier ones are checked and copied."""
        with contextlib.suppress(OSError, AttributeError):
            fd = open_regular(path)
            try:
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def read_into(self, path: str, offset: int, out: memoryview) -> int:
        """``preadv`` into ``out`` (tensor memory) at ``offset``, looping over short reads."""
        with self.open_reads(path) as f:
            return f.read_into(offset, out)

    def open_reads(self, path: str) -> OpenFile:
        """``path`` held open for many ranged reads (see :class:`OpenFile`): a fragment's
        chunks, and the pieces each is read in, cost one ``open`` in all, not one each.

        Example:
            >>> import tempfile, os
            >>> p = os.path.join(tempfile.mkdtemp(), "f")
            >>> _ = LocalStorage().write_atomic(p, [b"abcdef"])
            >>> buf = bytearray(3)
            >>> with LocalStorage().open_reads(p) as f:
            ...     f.read_into(2, memoryview(buf)), bytes(buf)
            (3, b'cde')
        """
        return OpenFile(path, open_regular(path))

    def size(self, path: str) -> int:
        """The size of the regular file ``path`` (a StorageError for anything else)."""
        try:
            st = os.stat(path, follow_symlinks=False)
        except FileNotFoundError as e:
            raise StorageError(errno.ENOENT, f"{path}: no such file") from e
        except OSError as e:
            raise StorageError(e.errno, f"{path}: {e.strerror}") from e
        if not stat.S_ISREG(st.st_mode):
            raise StorageError(errno.EINVAL, f"{path}: is {_kind(st.st_mode)}, not a regular file")
        return st.st_size

    def exists(self, path: str) -> bool:
        """Whether anything (even a dangling symbolic link) is at ``path``."""
        return os.path.lexists(path)

    def is_dir(self, path: str) -> bool:
        """A directory itself: a symbolic link to one is not (retention never follows one)."""
        try:
            return stat.S_ISDIR(os.stat(path, follow_symlinks=False).st_mode)
        except OSError:
            return False

    def remove_dir(self, path: str) -> None:
        """``rmdir`` if empty, then fsync of the parent; missing or not empty is fine."""
        try:
            os.rmdir(path)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                return
            raise StorageError(e.errno, f"removing directory {path}: {e.strerror}") from e
        with contextlib.suppress(OSError):
            _fsync_dir(os.path.dirname(path) or ".")

    def try_lock(self, path: str, owner: str) -> Lock | None:
        """``flock(LOCK_EX | LOCK_NB)`` on ``path`` (created if needed), owner text written in.

        Example:
            >>> import tempfile, os
            >>> p = os.path.join(tempfile.mkdtemp(), ".lock")
            >>> s = LocalStorage()
            >>> held = s.try_lock(p, "me")
            >>> s.try_lock(p, "other") is None, s.lock_owner(p)
            (True, 'me')
            >>> held.release(); s.try_lock(p, "other") is not None
            True
        """
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        for _ in range(16):  # retried only when the file was replaced while we locked it
            try:
                fd = os.open(path, flags, 0o644)
            except OSError as e:
                raise StorageError(e.errno, f"opening lock {path}: {e.strerror}") from e
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise StorageError(errno.EINVAL, f"{path}: a lock must be a regular file")
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    return None
                lock = _FileLock(path, fd)
                if not lock.intact():  # removed by its last holder while we waited: again
                    os.close(fd)
                    continue
                try:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, owner.encode("utf-8", "replace"), 0)
                except OSError:
                    # A full disk: the lock file goes too (as a release removes it); the
                    # descriptor is closed below, once.
                    if lock.intact():
                        with contextlib.suppress(OSError):
                            os.unlink(path)
                    raise
                return lock
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.close(fd)
                if isinstance(e, StorageError):
                    raise
                raise StorageError(e.errno, f"locking {path}: {e.strerror}") from e
        raise StorageError(errno.EAGAIN, f"{path}: the lock file keeps being replaced")

    def lock_owner(self, path: str) -> str:
        """The owner text of a lock file ("" when it cannot be read)."""
        try:
            return self.read(path, 0, 512).decode("utf-8", "replace")
        except StorageError:
            return ""

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
        """Unlink a file (or a symbolic link, never what it points to); missing is fine, and so
        is a directory, which is left alone: zckpt writes no directory where a file belongs."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            pass
        except OSError as e:
            if e.errno in (errno.EISDIR, errno.EPERM) and os.path.isdir(path):
                return  # EPERM: what unlink(2) says for a directory on some systems
            raise StorageError(e.errno, f"removing {path}: {e.strerror}") from e

    def rmtree(self, path: str) -> None:
        """Remove a directory tree; missing is fine."""
        import shutil  # here: it imports the compression modules, which reading needs not

        shutil.rmtree(path, ignore_errors=True)
        if os.path.exists(os.path.dirname(path) or "."):
            _fsync_dir(os.path.dirname(path) or ".")
