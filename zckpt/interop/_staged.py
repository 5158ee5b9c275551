"""DeepSpeed and DCP checkpoints in an object store: found there, then copied to a private
local directory, where the readers (which map and unzip local files) read them.

zckpt's own checkpoints are read from a store in ranged GETs (``store/_read.py``); DeepSpeed's
``torch.save`` zips and DCP's ``.distcp`` files are read through ``mmap`` and zip offsets, which
need files. So a foreign checkpoint at a URL (``get_fp32_state_dict_from_zero_checkpoint``,
``convert_deepspeed``, ``convert_dcp``, and ``zckpt inspect/verify/consolidate/convert/reshard``)
is *staged*: :func:`find_foreign` says what is there, asking the store only for listings and
the ``latest`` pointer, and :func:`stage` copies that one checkpoint, and nothing else, into
``tempfile.mkdtemp()`` (``$TMPDIR`` picks the place):

* in ranged GETs of :data:`PIECE` bytes, :data:`IN_FLIGHT` at a time, each written at its offset
  (memory: ``IN_FLIGHT * PIECE``, whatever the checkpoint's size);
* after checking that the local disk has room for it (else a ``StorageError`` naming both);
* with every object's size and ETag asked before and after its copy: an object replaced
  meanwhile (a sync still running) is an error, never a file made of two versions.

The copy mirrors the URL's layout (``latest`` and the one tag directory), so a reader given the
local path and the caller's ``tag`` finds what it would have found at the URL; messages that
name a local path name the URL instead (:meth:`Staged.reworded`). The directory is removed when
the call returns, or, for ``lazy_mode`` results, when the last :class:`LazyTensor` that reads
from it is gone (:meth:`Staged.keep_for`). A copy left by a process killed meanwhile (its name
carries host and pid) is removed by the next one made there (:func:`sweep`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import re
import shutil
import socket
import stat
import tempfile
import weakref
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from zckpt.store._layout import LATEST, LATEST_UNIVERSAL, check_tag, read_latest
from zckpt.store._storage import Storage, StorageError

__all__ = [
    "IN_FLIGHT",
    "PIECE",
    "Foreign",
    "Staged",
    "find_foreign",
    "foreign_tags",
    "is_remote",
    "local_only",
    "read_foreign",
    "foreign_source",
    "stage",
    "staged",
    "sweep",
]

#: Bytes per ranged GET of a staged copy.
PIECE = 16 << 20
#: Ranged GETs in flight during a staged copy.
IN_FLIGHT = 8
_MODEL_STATES = "model_states.pt"
_DCP_METADATA = ".metadata"


@dataclass(frozen=True)
class Foreign:
    """A foreign checkpoint found at a URL: ``kind`` (``"deepspeed"`` or ``"dcp"``), ``root``
    (the directory whose files are the checkpoint: a DeepSpeed tag directory or a DCP one) and
    ``pointer`` (the ``latest`` file that named it, when one did).

    Example:
        >>> Foreign("dcp", "memory://run/step3", None).kind
        'dcp'
    """

    kind: str
    root: str
    pointer: str | None


def _kind(storage: Storage, d: str) -> str | None:
    names = storage.listdir(d)
    if any(n.endswith(_MODEL_STATES) for n in names):
        return "deepspeed"
    return "dcp" if _DCP_METADATA in names else None


def find_foreign(storage: Storage, path: str, tag: str | None = None) -> Foreign | None:
    """The DeepSpeed or DCP checkpoint ``path`` (a save_dir, a tag directory or a DCP
    directory) holds in ``storage``, found as :func:`~zckpt.interop._detect.find_deepspeed`
    and :func:`~zckpt.interop._detect.find_dcp` find a local one; None when it holds neither.

    Example:
        >>> import fsspec
        >>> from zckpt.store._fsspec import FsspecStorage
        >>> st = FsspecStorage(fsspec.filesystem("memory"))
        >>> _ = st.write_atomic("memory://ff/run/step3/.metadata", [b"x"])
        >>> _ = st.write_atomic("memory://ff/run/latest", [b"step3"])
        >>> find_foreign(st, "memory://ff/run")
        Foreign(kind='dcp', root='memory://ff/run/step3', pointer='latest')
        >>> find_foreign(st, "memory://ff/elsewhere") is None
        True
    """
    if tag is not None:
        d = posixpath.join(path, check_tag(tag))
        kind = _kind(storage, d)
        return None if kind is None else Foreign(kind, d, None)
    kind = _kind(storage, path)
    if kind is not None:
        return Foreign(kind, path, None)
    for pointer in (LATEST, LATEST_UNIVERSAL):  # the first one present decides
        latest = read_latest(storage, path, pointer)
        if latest is None:
            continue
        d = posixpath.join(path, latest)
        kind = _kind(storage, d)
        return None if kind is None else Foreign(kind, d, pointer)
    return None


def foreign_tags(storage: Storage, path: str) -> list[str]:
    """The names of the DeepSpeed tag directories right under ``path`` (unordered).

    Example:
        >>> import fsspec
        >>> from zckpt.store._fsspec import FsspecStorage
        >>> st = FsspecStorage(fsspec.filesystem("memory"))
        >>> _ = st.write_atomic("memory://ft/run/s1/mp_rank_00_model_states.pt", [b"zip"])
        >>> _ = st.write_atomic("memory://ft/run/other/x", [b""])
        >>> foreign_tags(st, "memory://ft/run")
        ['s1']
    """
    return [
        n
        for n in storage.listdir(path)
        if not n.startswith(".") and _kind(storage, posixpath.join(path, n)) == "deepspeed"
    ]


def _version(storage: Storage, path: str) -> tuple[int, str]:
    """What changes when the object ``path`` is replaced: its size, and its ETag where the
    storage can say (:meth:`~zckpt.store.FsspecStorage.fingerprint`)."""
    fingerprint = getattr(storage, "fingerprint", None)
    if fingerprint is not None:
        got: tuple[int, str] = fingerprint(path)
        return got
    return storage.size(path), ""


def _walk(storage: Storage, d: str, rel: str = "") -> Iterator[tuple[str, tuple[int, str]]]:
    """``(relative path, version)`` of every object under ``d``, by listings and a HEAD each
    (for storages without ``files_under``)."""
    for name in storage.listdir(d):
        p, r = posixpath.join(d, name), posixpath.join(rel, name) if rel else name
        try:
            version = _version(storage, p)
        except StorageError as e:
            if e.errno != errno.EISDIR and not storage.is_dir(p):
                raise
            yield from _walk(storage, p, r)
            continue
        yield r, version


def _listing(storage: Storage, root: str) -> dict[str, tuple[int, str]]:
    """Every object under ``root``: relative name -> (size, ETag or ""). One listing where the
    storage offers it (:meth:`~zckpt.store.FsspecStorage.files_under`). An S3 "folder" marker
    (an empty object named ``dir/``) is no file; a name with a ``..`` or ``.`` part is refused
    (it would be copied outside the copy's directory), and so is an object named like a folder
    of others (``a`` beside ``a/b``: S3 allows both, a file system not)."""
    under = getattr(storage, "files_under", None)
    found = (
        [(n, (size, etag)) for n, size, etag in under(root)]
        if under is not None
        else list(_walk(storage, root))
    )
    out: dict[str, tuple[int, str]] = {}
    for name, version in found:
        parts = name.split("/")
        if parts[-1] == "" and version[0] == 0:
            continue  # a folder marker
        if any(x in ("", ".", "..") for x in parts):
            raise StorageError(
                errno.EINVAL,
                f"{posixpath.join(root, name)}: an object name with an empty, '.' or '..' "
                "part; it cannot be copied as a file (rename or remove it)",
            )
        out[name] = version
    dirs = {"/".join(n.split("/")[:i]) for n in out for i in range(1, n.count("/") + 1)}
    clash = sorted(dirs & out.keys())
    if clash:
        raise StorageError(
            errno.EINVAL,
            f"{posixpath.join(root, clash[0])}: an object with the name of a folder of other "
            "objects under it; a local copy cannot hold both (rename or remove one)",
        )
    return out


_STAGED = "zckpt-staged-"


def _host() -> str:
    """This machine's name as it may appear in a file name."""
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "host"


def _prefix(pid: int) -> str:
    return f"{_STAGED}{_host()}-{pid}-"


def sweep(tmp: str) -> list[str]:
    """Remove the copies that processes killed while they held one left in ``tmp`` (their
    names carry the host and pid: a copy is removed only when it is this user's, was made on
    this host, and its process is gone); return their paths.

    Example:
        >>> import tempfile
        >>> sweep(tempfile.mkdtemp())
        []
    """
    pattern = re.compile(re.escape(_STAGED + _host()) + r"-(\d+)-[^/]+")
    removed: list[str] = []
    try:
        names = os.listdir(tmp)
    except OSError:
        return removed
    for name in names:
        m = pattern.fullmatch(name)
        if m is None or int(m[1]) == os.getpid() or _alive(int(m[1])):
            continue
        p = os.path.join(tmp, name)
        try:
            st = os.lstat(p)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's: alive
        return True
    return True


class Staged:
    """A local copy of a foreign checkpoint at ``url``: ``local`` is where ``url`` is mirrored
    (pass it, with the caller's tag, to the local readers). Removed by :meth:`close`, or when
    the object is collected.

    Example:
        >>> import fsspec
        >>> from zckpt.store._fsspec import FsspecStorage
        >>> st = FsspecStorage(fsspec.filesystem("memory"))
        >>> _ = st.write_atomic("memory://sd/ck/.metadata", [b"meta"])
        >>> with staged(st, "memory://sd/ck") as s:
        ...     with open(os.path.join(s.local, ".metadata"), "rb") as f:
        ...         f.read()
        b'meta'
        >>> os.path.exists(s.local)
        False
    """

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/") or url
        sweep(tempfile.gettempdir())
        self.top = tempfile.mkdtemp(prefix=_prefix(os.getpid()))
        name = posixpath.basename(self.url.rstrip("/")) or "checkpoint"
        self.local = os.path.join(self.top, name)
        self.kept = False  # handed to a lazy result (keep_for)
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.top, True)

    def close(self) -> None:
        """Remove the local copy (again: nothing)."""
        self._cleanup()

    def reword(self, text: str) -> str:
        """``text`` with the local copy's paths named by their URLs."""
        return text.replace(self.local, self.url).replace(self.top, self.url)

    @contextlib.contextmanager
    def reworded(self) -> Iterator[None]:
        """Errors raised in this block name the URL, not the local copy (in place: the
        exception's type and other arguments stay)."""
        try:
            yield
        except BaseException as e:
            if isinstance(e, OSError):
                if isinstance(e.strerror, str):
                    e.strerror = self.reword(e.strerror)
                if isinstance(e.filename, str):
                    e.filename = self.reword(e.filename)
            if e.args and isinstance(e.args[0], str):
                e.args = (self.reword(e.args[0]), *e.args[1:])
            raise

    def keep_for(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` (a lazy_mode result, nested or not) with every
        :class:`~zckpt.store._fp32.LazyTensor` holding this copy: it is removed once none of
        them is left, not when the call ends. Tied entries stay one object."""
        from zckpt.store._fp32 import LazyTensor

        self.kept = True
        done: dict[int, Any] = {}

        def hold(v: Any) -> Any:
            if isinstance(v, LazyTensor):
                if id(v) not in done:
                    done[id(v)] = replace(v, _load=self._holding(v._load))
                return done[id(v)]
            if isinstance(v, dict):
                return {k: hold(x) for k, x in v.items()}
            if isinstance(v, list):
                return [hold(x) for x in v]
            return v

        out: dict[str, Any] = hold(state)
        return out

    def _holding(self, load: Any) -> Any:
        def read() -> Any:
            with self.reworded():  # ``self`` lives as long as this closure
                return load()

        return read


def _room(staged: Staged, url: str, total: int) -> None:
    free = shutil.disk_usage(staged.top).free
    if total > free:
        raise StorageError(
            errno.ENOSPC,
            f"{url}: reading this checkpoint copies its {total} bytes to {staged.top}, whose "
            f"disk has {free} bytes free; set TMPDIR to a larger local disk",
        )


def _piece(storage: Storage, src: str, dst: str, offset: int, n: int) -> None:
    """Bytes ``[offset, offset + n)`` of the object ``src`` written at ``offset`` of ``dst``."""
    data = storage.read(src, offset, n)
    if len(data) != n:
        raise StorageError(
            errno.ESTALE,
            f"{src}: {len(data)} bytes at offset {offset}, where its size says {n}: it "
            "changed while it was copied; try again once its writer is done",
        )
    fd = os.open(dst, os.O_WRONLY)
    try:
        view = memoryview(data)
        while view:
            view = view[os.pwrite(fd, view, offset + n - len(view)) :]
    finally:
        os.close(fd)


def _copy_all(storage: Storage, pieces: list[tuple[str, str, int, int]]) -> None:
    """Every piece, :data:`IN_FLIGHT` at a time, across files (a checkpoint of many small
    files is not copied one round trip per file); the first failure cancels the rest."""
    pool = ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="zckpt-stage")
    try:
        for f in [pool.submit(_piece, storage, *p) for p in pieces]:
            f.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def stage(storage: Storage, path: str, found: Foreign | None) -> Staged:
    """Copy the checkpoint ``found`` at ``path`` (a URL of ``storage``) to a local directory
    (None: nothing to copy; the directory mirroring ``path`` is not there).

    Raises:
        StorageError: the local disk has no room for it (naming both), an object changed
            while it was copied, or the store failed (naming the object).

    Example:
        >>> import fsspec
        >>> from zckpt.store._fsspec import FsspecStorage
        >>> st = FsspecStorage(fsspec.filesystem("memory"))
        >>> _ = st.write_atomic("memory://sg/run/s1/mp_rank_00_model_states.pt", [b"zip"])
        >>> _ = st.write_atomic("memory://sg/run/latest", [b"s1"])
        >>> s = stage(st, "memory://sg/run", find_foreign(st, "memory://sg/run"))
        >>> sorted(os.listdir(s.local)), os.listdir(os.path.join(s.local, "s1"))
        (['latest', 's1'], ['mp_rank_00_model_states.pt'])
        >>> s.close()
    """
    s = Staged(path)
    if found is None:
        return s
    base = path.rstrip("/") or path
    rel_root = posixpath.relpath(found.root, base) if found.root != base else ""
    try:
        with s.reworded():
            before = _listing(storage, found.root)
            _room(s, path, sum(size for size, _ in before.values()))
            root = os.path.join(s.local, *rel_root.split("/")) if rel_root else s.local
            os.makedirs(root)
            if found.pointer is not None:
                tag = posixpath.basename(found.root)
                with open(os.path.join(s.local, found.pointer), "w", encoding="utf-8") as f:
                    f.write(tag)
            pieces: list[tuple[str, str, int, int]] = []
            for rel, (size, _) in sorted(before.items()):
                dst = os.path.join(root, *rel.split("/"))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.ftruncate(fd, size)
                finally:
                    os.close(fd)
                src = posixpath.join(found.root, rel)
                pieces += [(src, dst, o, min(PIECE, size - o)) for o in range(0, size, PIECE)]
            _copy_all(storage, pieces)
            after = _listing(storage, found.root)
            changed = sorted(rel for rel, v in before.items() if after.get(rel) != v)
            if changed:
                first = posixpath.join(found.root, changed[0])
                raise StorageError(
                    errno.ESTALE,
                    f"{first} was replaced while it was copied (size and ETag before: "
                    f"{before[changed[0]]}, after: {after.get(changed[0], 'gone')}"
                    f"{f'; and {len(changed) - 1} more' if len(changed) > 1 else ''}); "
                    "try again once its writer is done",
                )
    except BaseException:
        s.close()
        raise
    return s


@contextlib.contextmanager
def staged(storage: Storage, path: str, tag: str | None = None) -> Iterator[Staged | None]:
    """The foreign checkpoint at ``path`` staged for this block (None when there is none);
    errors in the block name the URL. Removed when the block ends, unless it handed the copy
    on (:meth:`Staged.keep_for`).

    Example:
        >>> import fsspec
        >>> from zckpt.store._fsspec import FsspecStorage
        >>> with staged(FsspecStorage(fsspec.filesystem("memory")), "memory://none") as s:
        ...     s is None
        True
    """
    found = find_foreign(storage, path, tag)
    if found is None:
        yield None
        return
    s = stage(storage, path, found)
    try:
        with s.reworded():
            yield s
    finally:
        if not s.kept:  # a lazy result holds the copy: its last holder removes it
            s.close()


@contextlib.contextmanager
def foreign_source(
    path: str | os.PathLike[str],
    tag: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Iterator[str]:
    """The local path to read the DeepSpeed or DCP checkpoint at ``path`` from, for this block:
    a path or a ``file://`` URL's path as it is; at any other URL, its checkpoint staged (an
    empty place when there is none there, so that the reader's own error says what is missing,
    naming the URL). Errors in the block name the URL.

    Example:
        >>> with foreign_source("file:///data/ds") as local:
        ...     local
        '/data/ds'
    """
    from zckpt.store._resolve import storage_for
    from zckpt.store._storage import LocalStorage

    storage, p = storage_for(path, None, storage_options)
    if isinstance(storage, LocalStorage):
        yield p
        return
    s = stage(storage, p, find_foreign(storage, p, tag))
    try:
        with s.reworded():
            yield s.local
    finally:
        s.close()


def is_remote(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a URL of an object store or other fsspec filesystem (not a path,
    not a ``file://`` URL).

    Example:
        >>> is_remote("s3://b/run"), is_remote("file:///data/run"), is_remote("run")
        (True, False, False)
    """
    from zckpt.store._resolve import is_url, local_path

    return is_url(local_path(os.fspath(path)))


def local_only(path: str | os.PathLike[str], reader: str) -> str:
    """``path`` for a reader of local files only (a ``file://`` URL's path; a path as it is).

    Raises:
        ArgumentError: ``path`` is any other URL, naming the calls that take one.

    Example:
        >>> local_only("file:///data/ds", "open_deepspeed")
        '/data/ds'
    """
    from zckpt.errors import ArgumentError
    from zckpt.store._resolve import local_path

    if is_remote(path):
        raise ArgumentError(
            f"{os.fspath(path)}: {reader} reads local files; for a checkpoint at a URL use "
            "get_fp32_state_dict_from_zero_checkpoint, convert_deepspeed, convert_dcp, "
            "dcp_state_dict or the zckpt commands, which copy it to a local directory first"
        )
    return local_path(os.fspath(path))


def read_foreign(
    path: str | os.PathLike[str],
    tag: str | None,
    read: Callable[[str], dict[str, Any]],
    lazy_mode: bool,
) -> dict[str, Any]:
    """``read`` (a reader of a local DeepSpeed or DCP checkpoint) of the one at the URL
    ``path``, staged for it (lazy results hold the copy: :meth:`Staged.keep_for`).

    Example:
        >>> import fsspec
        >>> _ = fsspec.filesystem("memory").pipe("/rf/ck/.metadata", b"m")
        >>> read_foreign("memory://rf/ck", None, lambda d: {"n": os.listdir(d)}, False)
        {'n': ['.metadata']}
    """
    from zckpt.store._resolve import storage_for

    storage, p = storage_for(path)
    s = stage(storage, p, find_foreign(storage, p, tag))
    try:
        with s.reworded():
            got = read(s.local)
        return s.keep_for(got) if lazy_mode else got
    finally:
        if not s.kept:
            s.close()
