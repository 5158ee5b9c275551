"""Any fsspec filesystem as a :class:`~zckpt.store.Storage`: object stores without rename.

The commit protocol (``docs/layout.md``) needs three things from a store, and object stores give
them differently from POSIX files:

* **An atomic, durable write of a whole file.** An object store has no rename, but a single PUT
  (or a completed multipart upload) makes the whole object appear at once, and names are never
  reused for data: every blob carries a fresh generation. So a blob is uploaded under its final
  name and counted only once the store has confirmed it (on S3 its ETags: the MD5 of what was
  sent, which confirms the size too; elsewhere its size). The manifest, a single small PUT
  written last by rank 0, is the commit; ``latest`` is written after it. A failed upload
  leaves no object (an unfinished multipart upload is aborted), and the save removes what it
  uploaded, as on local disk.
* **Only regular files.** Objects are the files; a "directory" is a name prefix that some
  object lies under. Reading a directory, or a name that is neither, is a ``StorageError``.
* **Locks whose holder may die.** Lock objects with a lease, renewed by their holder and taken
  over once stale, with conditional writes where the store has them (:mod:`zckpt.store._lease`,
  whose :class:`~zckpt.store._lease.LeaseLocks` this class inherits).

Transient errors (HTTP 5xx, ``SlowDown``, dropped or timed-out connections) are retried with
exponential backoff for at most ``retry_for`` seconds per request; anything else, and a
transient error that outlasts that, raises a ``StorageError`` naming the object.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import errno
import os
import posixpath
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

from zckpt.store._fsbackend import FsBackend, Head, PreconditionFailedError, UnsupportedError
from zckpt.store._layout import generation_of
from zckpt.store._lease import LeaseLocks
from zckpt.store._storage import StorageError
from zckpt.store._transient import Retry, is_transient

__all__ = [
    "FsspecStorage",
    "Head",
    "PreconditionFailedError",
    "Retry",
    "UnsupportedError",
    "is_transient",
]

# A blob's first bytes, fetched by the read of its preamble for the read of its header that
# follows (see FsspecStorage.read): how many, for how long, for how many blobs at most.
HEAD_PREFIX = 64 << 10
_PREFIX_FOR = 10.0
_PREFIXES_KEPT = 64
# Sizes of blobs (names never reused: a blob's size never changes) that a GET of their first
# bytes reported (its Content-Range): size() answers from them, for as long as the bytes are
# kept, instead of a HEAD.
_SIZES_KEPT = 4096
# A fragment's span, named by will_need (S3): fetched in ranged GETs of PREFETCH_PIECE bytes,
# at most PREFETCH_AHEAD of them fetched or held at a time per span; the chunk reads that
# follow are served from them. At most _SPANS_KEPT spans, each for at most _SPAN_FOR seconds.
PREFETCH_PIECE = 16 << 20
PREFETCH_AHEAD = 3
_SPAN_FOR = 60.0
_SPANS_KEPT = 8
# Chunks in a blob may lie up to this many bytes apart (alignment): reads that far apart count
# as covering the bytes between them when deciding that a piece has been used up.
_GAP = 4096


class _Span:
    """Bytes ``[offset, end)`` of one object, fetched ahead in pieces (see
    :meth:`FsspecStorage.will_need`). Every field is guarded by the storage's mutex."""

    def __init__(self, key: str, offset: int, length: int) -> None:
        self.key, self.offset, self.end = key, offset, offset + length
        self.count = -(-length // PREFETCH_PIECE)
        self.pieces: dict[int, concurrent.futures.Future[bytes]] = {}
        self.served: set[int] = set()  # offsets of the reads served (each chunk is read once)
        self.done: list[list[int]] = []  # the bytes served, as sorted [start, stop) runs
        self.scheduled = 0  # pieces [0, scheduled) were asked for
        self.born = time.monotonic()

    def piece(self, i: int) -> tuple[int, int]:
        at = self.offset + i * PREFETCH_PIECE
        return at, min(PREFETCH_PIECE, self.end - at)

    def covers(self, offset: int, length: int) -> bool:
        return self.offset <= offset and offset + length <= self.end and offset not in self.served

    def serve(self, offset: int, length: int) -> None:
        """Record the bytes of a read served (its offset is in ``served`` already, taken when
        the read claimed it), then let go of the pieces whose bytes have all been read."""
        runs, stop = self.done, offset + length
        i = bisect.bisect_left(runs, [offset])
        runs.insert(i, [offset, stop])
        j = max(0, i - 1)  # merge the new run with its neighbours, across alignment gaps
        while j + 1 < len(runs):
            if runs[j + 1][0] - runs[j][1] <= _GAP:
                runs[j][1] = max(runs[j][1], runs[j + 1][1])
                del runs[j + 1]
            elif j >= i:
                break
            else:
                j += 1
        for k in list(self.pieces):
            at, n = self.piece(k)
            r = runs[max(0, bisect.bisect_right(runs, [at, sys.maxsize]) - 1)]
            if r[0] <= at and at + n <= r[1]:
                del self.pieces[k]


def _is_s3(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "s3" in protocol and hasattr(fs, "get_s3") and hasattr(fs, "split_path")


PART_SIZE = 16 << 20
"""S3 multipart part size: the parallelism of one large blob (on the loopback bench, 16 MiB
parts saved a 256 MiB blob 15% faster than 50 MiB parts and as fast as 8 MiB ones)."""
MULTIPART_THRESHOLD = 100 << 20
"""S3 blobs under this many bytes go up as one PUT (one request to sign, send and confirm)."""


class FsspecStorage(LeaseLocks):
    """Checkpoints in an object store or any fsspec filesystem: ``s3://``, ``memory://``, ...

    Paths given to it may be URLs of its filesystem (``s3://bucket/run1/latest``) or the
    filesystem's own paths (``bucket/run1/latest``). ``zckpt.save_checkpoint("s3://...")``
    and the other entry points build one from the URL (``storage_options`` go to fsspec); pass
    ``storage=FsspecStorage(fs)`` to use a filesystem you configured yourself.

    Args:
        fs: an ``fsspec.AbstractFileSystem`` (``s3fs.S3FileSystem`` gets the fast S3 path).
        part_size: bytes per multipart part (S3: at least 5 MiB).
        multipart_threshold: blobs of fewer bytes go up as one PUT, larger ones as a
            multipart upload with ``max_concurrency`` parts in flight (S3; AWS advises
            multipart from about 100 MB).
        max_concurrency: parts in flight per blob (S3).
        lease: seconds after which a lock that was not renewed is stale and may be taken.
            Holders renew theirs every ``lease / 4``.
        retry_for: seconds a request is retried while its errors are transient.
        conditional_writes: use ``If-None-Match``/``If-Match`` for locks (S3); None: yes,
            until the server says it does not implement them.

    Example:
        >>> import fsspec, torch, zckpt
        >>> fs = fsspec.filesystem("memory")
        >>> st = FsspecStorage(fs)
        >>> st.write_atomic("memory://doc/a.bin", [b"ab", memoryview(b"cd")])[0]
        4
        >>> st.read("memory://doc/a.bin", 1, 2), st.listdir("memory://doc")
        (b'bc', ['a.bin'])
        >>> _ = zckpt.save_checkpoint("memory://doc/run", {"w": torch.ones(2)},
        ...                           zckpt.ZeroSpec(1, 1), tag="t")
        >>> zckpt.load_checkpoint("memory://doc/run").state["w"].tolist()
        [1.0, 1.0]
    """

    def __init__(
        self,
        fs: Any,
        *,
        part_size: int = PART_SIZE,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        max_concurrency: int = 8,
        lease: float = 30.0,
        retry_for: float = 60.0,
        conditional_writes: bool | None = None,
    ) -> None:
        if not (lease > 0 and retry_for >= 0 and part_size > 0 and max_concurrency > 0):
            raise ValueError("lease, part_size and max_concurrency must be > 0, retry_for >= 0")
        if multipart_threshold < 0:
            raise ValueError(f"multipart_threshold must be >= 0, got {multipart_threshold}")
        self.fs, self.lease, self.retry = fs, float(lease), Retry(total=float(retry_for))
        self._backend: Any
        self._s3 = _is_s3(fs)
        # Whether a directory is only a name prefix (S3): it exists while an object lies under
        # it, so makedirs and remove_dir have nothing to do and an empty listing means absent.
        self.dirs_are_prefixes = self._s3
        if self._s3:
            from zckpt.store._s3 import S3Backend

            self._backend = S3Backend(
                fs, part_size, max_concurrency, self.retry, multipart_threshold
            )
        else:
            self._backend = FsBackend(fs, self.retry)
        self._prefixes: dict[str, tuple[float, bytes]] = {}  # see read()
        self._sizes: dict[str, tuple[float, int]] = {}  # see size()
        self._spans: list[_Span] = []  # see will_need()
        self._mutex = threading.Lock()
        self._init_locks(conditional_writes)

    def __repr__(self) -> str:
        return f"FsspecStorage({type(self.fs).__name__})"

    # -- paths and errors ---------------------------------------------------------------

    def _key(self, path: str) -> str:
        return str(self.fs._strip_protocol(os.fspath(path)))

    def _fail(self, what: str, path: str, e: BaseException) -> StorageError:
        if isinstance(e, StorageError):
            return e
        detail = " ".join(str(e).split()) or type(e).__name__
        if is_transient(e):
            detail += f" (retried for up to {self.retry.total:g} s)"
        return StorageError(getattr(e, "errno", None) or errno.EIO, f"{what} {path}: {detail}")

    def _not_a_file(self, path: str) -> StorageError:
        """The error for a name that holds no object: a directory, or nothing."""
        key = self._key(path)
        try:
            directory = self._backend.is_prefix(key)
        except Exception:
            directory = False
        if directory:
            return StorageError(
                errno.EISDIR, f"{path}: is a directory, not a regular file; zckpt reads only files"
            )
        return StorageError(errno.ENOENT, f"{path}: no such file")

    # -- Storage --------------------------------------------------------------------------

    def write_atomic(self, path: str, buffers: Iterable[memoryview | bytes]) -> tuple[int, int]:
        """Upload ``buffers`` as the object ``path``; return (size, xxh3_64) once the store has
        confirmed it (on S3 by its ETags, the MD5s of the bytes sent, or by a HEAD's size where
        the answers cannot tell; elsewhere by its size). A failed upload leaves no new object."""
        try:
            result: tuple[int, int] = self._backend.put(self._key(path), buffers)
            return result
        except Exception as e:
            raise self._fail("writing", path, e) from e

    def read(self, path: str, offset: int, length: int) -> bytes:
        """A ranged GET of ``length`` bytes at ``offset`` (fewer at the end of the object).

        A blob's header is read in two steps, its fixed-size preamble (which says how long the
        header is), then the header: on S3 the first short read at offset 0 of a blob (names
        are never reused, so its bytes never change) fetches :data:`HEAD_PREFIX` bytes, and
        the next read within them, from any thread, within a few seconds, is served from
        those: one ranged GET per blob opened instead of two.
        """
        if length <= 0:
            self.size(path)  # a missing file or a directory still raises
            return b""
        key = self._key(path)
        try:
            if self._spans:
                ahead = self._from_span(key, offset, length)
                if ahead is not None:
                    return ahead
            if self._s3 and offset + length <= HEAD_PREFIX:
                return self._read_prefix(key, offset, length)
            data: bytes = self._backend.get(key, offset, length)
            return data
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise self._not_a_file(path) from None
        except Exception as e:
            raise self._fail(f"reading byte {offset} of", path, e) from e

    def _read_prefix(self, key: str, offset: int, length: int) -> bytes:
        with self._mutex:
            kept = self._prefixes.pop(key, None)
        if kept is not None and time.monotonic() - kept[0] < _PREFIX_FOR:
            first = kept[1]
            if offset + length <= len(first) or len(first) < HEAD_PREFIX:  # shorter: the end
                return first[offset : offset + length]
        if offset != 0 or generation_of(posixpath.basename(key)) is None:
            got: bytes = self._backend.get(key, offset, length)
            return got
        got_sized: tuple[bytes, int | None] = self._backend.get_sized(key, 0, HEAD_PREFIX)
        data, total = got_sized
        with self._mutex:
            self._prefixes[key] = (time.monotonic(), data)
            while len(self._prefixes) > _PREFIXES_KEPT:
                self._prefixes.pop(next(iter(self._prefixes)))
            if total is not None:
                self._sizes[key] = (time.monotonic(), total)
                while len(self._sizes) > _SIZES_KEPT:
                    self._sizes.pop(next(iter(self._sizes)))
        return data[:length]

    def will_need(self, path: str, offset: int, length: int) -> None:
        """A hint that bytes ``[offset, offset + length)`` of ``path`` (a fragment's chunks) are
        about to be read, chunk by chunk. On S3 they are fetched at once, in ranged GETs of
        :data:`PREFETCH_PIECE` bytes, :data:`PREFETCH_AHEAD` in flight or held per span (more
        as the reads use them up), and the reads within the span are served from those:
        fewer, larger GETs than one per chunk, in parallel, while earlier chunks are decoded.
        Elsewhere nothing. A piece that fails is not an error here: the read it would have
        served goes to the store itself and fails (or is retried) there.

        Example:
            >>> import fsspec
            >>> st = FsspecStorage(fsspec.filesystem("memory"))
            >>> _ = st.write_atomic("memory://doc/w.bin", [b"0123456789"])
            >>> st.will_need("memory://doc/w.bin", 2, 6); st.read("memory://doc/w.bin", 2, 3)
            b'234'
        """
        if not self._s3 or length <= 0:
            return
        span = _Span(self._key(path), offset, length)
        now = time.monotonic()
        with self._mutex:
            dropped = [s for s in self._spans if now - s.born >= _SPAN_FOR]
            self._spans = [s for s in self._spans if now - s.born < _SPAN_FOR]
            self._spans.append(span)
            while len(self._spans) > _SPANS_KEPT:
                dropped.append(self._spans.pop(0))
            self._schedule(span, PREFETCH_AHEAD)
        for old in dropped:
            for fut in old.pieces.values():
                fut.cancel()

    def _schedule(self, span: _Span, upto: int) -> None:
        """Ask for the span's pieces up to ``upto`` (mutex held)."""
        while span.scheduled < min(upto, span.count):
            i = span.scheduled
            at, n = span.piece(i)
            coro = self._backend._get(span.key, at, n)
            span.pieces[i] = asyncio.run_coroutine_threadsafe(coro, self.fs.loop)
            span.scheduled += 1

    def _from_span(self, key: str, offset: int, length: int) -> bytes | None:
        """The bytes of a read that a will_need span covers (None: not covered, or a piece
        failed or came short: the caller reads from the store)."""
        with self._mutex:
            span = next((s for s in self._spans if s.key == key and s.covers(offset, length)), None)
            if span is None:
                return None
            span.served.add(offset)  # here: of two readers of one chunk, one takes it from span
            first = (offset - span.offset) // PREFETCH_PIECE
            last = (offset + length - 1 - span.offset) // PREFETCH_PIECE
            self._schedule(span, last + PREFETCH_AHEAD)
            wanted = [(i, span.pieces.get(i)) for i in range(first, last + 1)]
        out: list[bytes] = []
        ok = True
        for i, fut in wanted:
            at, n = span.piece(i)
            try:
                data = fut.result() if fut is not None else b""
            except BaseException:
                data = b""
            if len(data) != n:
                ok = False  # failed, cancelled or short: the store's own read says which
            lo, hi = max(offset, at) - at, min(offset + length, at + n) - at
            out.append(data[lo:hi])
        with self._mutex:
            span.serve(offset, length)
            if span.scheduled >= span.count and not span.pieces and span in self._spans:
                self._spans.remove(span)
        if not ok:
            return None
        return out[0] if len(out) == 1 else b"".join(out)

    def read_into(self, path: str, offset: int, out: memoryview) -> int:
        """Read into ``out`` at ``offset``; return the bytes read."""
        view = out.cast("B")
        data = self.read(path, offset, view.nbytes)
        view[: len(data)] = data
        return len(data)

    def read_whole(self, path: str, limit: int) -> bytes | None:
        """The object ``path`` whole (at most ``limit`` bytes of it), or None when there is no
        object there: one GET, where ``exists``, ``size`` and ``read`` make three requests, and
        an object replaced meanwhile reads as one version or the other, never a mix of the two
        (``latest`` and manifests are replaced in place). Optional in
        :class:`~zckpt.store._storage.Storage`: readers of small objects use it where it exists.

        Example:
            >>> import fsspec
            >>> st = FsspecStorage(fsspec.filesystem("memory"))
            >>> _ = st.write_atomic("memory://doc/latest", [b"step3"])
            >>> st.read_whole("memory://doc/latest", 4096), st.read_whole("memory://doc/no", 9)
            (b'step3', None)
        """
        if limit <= 0:
            return b"" if self.exists(path) else None
        try:
            data: bytes = self._backend.get(self._key(path), 0, limit)
            return data
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        except Exception as e:
            if isinstance(e, StorageError) and e.errno == errno.ENOENT:
                return None
            raise self._fail("reading", path, e) from e

    def size(self, path: str) -> int:
        """The object's size (a StorageError for a directory or nothing). On S3 a blob whose
        first bytes were just read (its header, see :meth:`read`) is not asked again: that GET
        reported its size, and a blob's name is never reused."""
        key = self._key(path)
        with self._mutex:
            known = self._sizes.get(key)
        if known is not None and time.monotonic() - known[0] < _PREFIX_FOR:
            return known[1]
        try:
            head = self._backend.head(key)
        except Exception as e:
            raise self._fail("looking up", path, e) from e
        if head is None:
            raise self._not_a_file(path)
        return int(head.size)

    def files_under(self, path: str) -> list[tuple[str, int, str]]:
        """Every object under ``path`` as (name relative to ``path``, size, ETag: "" where the
        store keeps none), from one listing (on S3 a request per thousand objects), asked of
        the store each time. Optional in :class:`~zckpt.store._storage.Storage`: a staged copy
        of a foreign checkpoint (``interop/_staged.py``) lists what it copies with it, before
        and after, where HEADs would take a round trip per file.

        Example:
            >>> import fsspec
            >>> st = FsspecStorage(fsspec.filesystem("memory"))
            >>> _ = st.write_atomic("memory://fu/ck/a", [b"abc"])
            >>> _ = st.write_atomic("memory://fu/ck/d/b", [b"x"])
            >>> [(n, size) for n, size, _ in sorted(st.files_under("memory://fu/ck"))]
            [('a', 3), ('d/b', 1)]
        """
        try:
            found: list[tuple[str, Head]] = self._backend.files_under(self._key(path))
        except FileNotFoundError:
            return []
        except Exception as e:
            raise self._fail("listing", path, e) from e
        return [(name, head.size, head.etag) for name, head in found]

    def fingerprint(self, path: str) -> tuple[int, str]:
        """The object's size and ETag ("" where the store keeps none), asked of the store each
        time: what changes when the object is replaced. Optional in
        :class:`~zckpt.store._storage.Storage`: a staged copy of a foreign checkpoint
        (``interop/_staged.py``) checks with it that no object changed while it was copied.

        Example:
            >>> import fsspec
            >>> st = FsspecStorage(fsspec.filesystem("memory"))
            >>> _ = st.write_atomic("memory://fp/a", [b"abc"])
            >>> st.fingerprint("memory://fp/a")[0]
            3
        """
        try:
            head = self._backend.head(self._key(path))
        except Exception as e:
            raise self._fail("looking up", path, e) from e
        if head is None:
            raise self._not_a_file(path)
        return int(head.size), str(head.etag)

    def exists(self, path: str) -> bool:
        """Whether an object, or a directory (a prefix some object lies under), is at ``path``."""
        key = self._key(path)
        try:
            return self._backend.head(key) is not None or bool(self._backend.is_prefix(key))
        except Exception as e:
            raise self._fail("looking up", path, e) from e

    def is_dir(self, path: str) -> bool:
        """Whether some object lies under ``path/``."""
        try:
            return bool(self._backend.is_prefix(self._key(path)))
        except Exception as e:
            raise self._fail("listing", path, e) from e

    def listdir(self, path: str) -> list[str]:
        """Sorted names right under ``path`` ([] when nothing is)."""
        try:
            names: list[str] = self._backend.listdir(self._key(path))
            return names
        except FileNotFoundError:
            return []
        except Exception as e:
            raise self._fail("listing", path, e) from e

    def makedirs(self, path: str) -> None:
        """Nothing on S3 (a directory exists once an object is in it); ``makedirs`` elsewhere."""
        if self._s3:
            return
        try:
            self._backend.makedirs(self._key(path))
        except Exception as e:
            raise self._fail("creating directory", path, e) from e

    def remove(self, path: str) -> None:
        """Delete the object ``path``; missing is fine."""
        key = self._key(path)
        with self._mutex:
            self._sizes.pop(key, None)
            self._prefixes.pop(key, None)
        try:
            self._backend.delete(key)
        except Exception as e:
            raise self._fail("removing", path, e) from e

    def rmtree(self, path: str) -> None:
        """Delete every object under ``path``; missing is fine."""
        below = self._key(path).rstrip("/") + "/"
        with self._mutex:
            for kept in (self._sizes, self._prefixes):
                for key in [k for k in kept if k.startswith(below)]:
                    del kept[key]
        try:
            self._backend.rmtree(self._key(path))
        except Exception as e:
            raise self._fail("removing", path, e) from e

    def remove_dir(self, path: str) -> None:
        """An empty directory goes with its last object on S3; elsewhere ``rmdir`` if empty."""
        if not self._s3:
            self._backend.remove_dir(self._key(path))

    def unfinished_uploads(self, path: str) -> list[str]:
        """Names, relative to ``path``, of the multipart uploads begun and never completed
        under it (a killed save leaves them; S3 bills their parts). [] off S3."""
        if not self._s3:
            return []
        try:
            return sorted({name for name, _ in self._backend.uploads(self._key(path))})
        except Exception as e:
            raise self._fail("listing uploads under", path, e) from e

    def abort_uploads(self, path: str) -> list[str]:
        """Abort the unfinished multipart uploads under ``path``; their names relative to it."""
        if not self._s3:
            return []
        try:
            aborted: list[str] = self._backend.abort_uploads(self._key(path))
            return aborted
        except Exception as e:
            raise self._fail("aborting uploads under", path, e) from e
