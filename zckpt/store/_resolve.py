"""Where a path lives: :func:`storage_for` turns a path or URL into a (Storage, path) pair.

Every entry point (saves, loads, retention, ``clean``, ``verify``, the CLI) calls it once, so
``s3://bucket/run1``, ``memory://run1``, ``file:///data/run1`` and plain paths work the same
everywhere. fsspec is imported only for URLs that need it: ``import zckpt`` and local paths
never load it.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

from zckpt.errors import ArgumentError
from zckpt.store._storage import LocalStorage, Storage

__all__ = [
    "is_url",
    "isdir",
    "lexists",
    "listdir",
    "local_path",
    "storage_for",
    "storage_options_scope",
]

_LOCAL = ("file://", "local://")
# FsspecStorage per filesystem instance (fsspec caches instances per options), so repeated
# calls share one storage and its lock-renewal thread.
_wrapped: weakref.WeakKeyDictionary[Any, Storage] = weakref.WeakKeyDictionary()
# Options for URLs opened without explicit ones: the CLI's --storage-option.
_scoped: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "zckpt_storage_options", default=None
)


def is_url(path: object) -> bool:
    """Whether ``path`` is a URL (``proto://...``, or fsspec's chained ``a::b://...``).

    Example:
        >>> is_url("s3://bucket/run"), is_url("/data/run"), is_url("file:///data/run")
        (True, False, True)
    """
    return isinstance(path, str) and "://" in path


def local_path(path: str) -> str:
    """The local path a ``file://`` (or ``local://``) URL names; any other path or URL as it is.

    Local URLs are local files: :class:`~zckpt.store.LocalStorage`, with its real renames,
    fsyncs and ``flock`` locks (never fsspec's ``LocalFileSystem``, which has none of them),
    and the code that reads DeepSpeed or DCP checkpoints or writes exports, which takes paths.

    Example:
        >>> local_path("file:///data/run1/"), local_path("s3://b/run1"), local_path("run1")
        ('/data/run1/', 's3://b/run1', 'run1')
    """
    if isinstance(path, str) and path.startswith(_LOCAL):
        return path.split("://", 1)[1] or "/"
    return path


def _is_filesystem(obj: object) -> bool:
    return (
        hasattr(obj, "_strip_protocol")
        and hasattr(obj, "protocol")
        and not hasattr(obj, "write_atomic")
    )


def _wrap(fs: Any) -> Storage:
    from zckpt.store._fsspec import FsspecStorage

    try:
        found = _wrapped.get(fs)
    except TypeError:  # an unhashable filesystem: not cached
        return FsspecStorage(fs)
    if found is None:
        found = FsspecStorage(fs)
        _wrapped[fs] = found
    return found


def _url_path(path: str) -> str:
    """A URL without its trailing ``/`` (the bucket's root keeps its own)."""
    stripped = path.rstrip("/")
    return path if stripped.endswith(":") or "://" not in stripped else stripped


def storage_for(
    path: str | os.PathLike[str],
    storage: Storage | Any | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[Storage, str]:
    """The storage that holds ``path``, and the path to give it.

    * ``storage`` given (a :class:`~zckpt.store.Storage`, or an fsspec filesystem, wrapped in
      :class:`~zckpt.store.FsspecStorage`): used as it is, with ``path`` as given (a
      :class:`~zckpt.store.LocalStorage` takes a ``file://`` URL's local path, and refuses
      any other URL: it would become a local directory named after the scheme).
    * a plain path or ``file://`` URL: :class:`~zckpt.store.LocalStorage` and the local path.
    * any other URL (``s3://``, ``memory://``, ``gs://``, ...): the fsspec filesystem for it,
      built with ``storage_options`` (credentials, ``endpoint_url``, ...) as ``fsspec.open``
      would, in an :class:`~zckpt.store.FsspecStorage`; the URL is kept, so messages and
      returned paths show it. Needs ``pip install 'zckpt[s3]'`` (fsspec, and s3fs for S3).
      For ``s3://`` on an ``http://`` endpoint, botocore's CRC32 request checksum is off unless
      the options ask for it (:func:`zckpt.store._s3_options.default_options` says why).

    Raises:
        ArgumentError: ``storage_options`` with a plain path or an explicit ``storage``, an
            unknown protocol, or fsspec (or the protocol's package) not installed.

    Example:
        >>> storage_for("/data/run1")
        (<zckpt.store._storage.LocalStorage object at ...>, '/data/run1')
        >>> storage_for("file:///data/run1")[1]
        '/data/run1'
        >>> storage_for("memory://run1/")
        (FsspecStorage(MemoryFileSystem), 'memory://run1')
        >>> storage_for("file:///data/run1", LocalStorage())[1]
        '/data/run1'

    """
    if isinstance(path, os.PathLike) or not is_url(path):
        if storage_options:
            raise ArgumentError(
                f"storage_options apply to URLs (s3://..., memory://...), not to the path {path}"
            )
        return _explicit(storage) or LocalStorage(), os.fspath(path)
    text = os.fspath(path)
    explicit = _explicit(storage)
    if explicit is not None:
        if storage_options:
            raise ArgumentError("pass storage_options or storage=, not both")
        if isinstance(explicit, LocalStorage):  # a URL taken as a path: ./s3:/bucket/...
            if not text.startswith(_LOCAL):
                raise ArgumentError(
                    f"{text} is a URL, and the storage given is local files ({explicit!r}): "
                    "pass a path, or the URL without storage="
                )
            return explicit, local_path(text)
        return explicit, _url_path(text)
    if text.startswith(_LOCAL):
        return LocalStorage(), local_path(text)
    options = dict(_scoped.get() or {}) if storage_options is None else dict(storage_options)
    try:
        import fsspec
    except ImportError:
        raise ArgumentError(
            f"{text}: URLs need fsspec (and s3fs for s3://): pip install 'zckpt[s3]'"
        ) from None
    if text.split("://", 1)[0].lower() in ("s3", "s3a"):
        from zckpt.store._s3_options import default_options

        options = default_options(options)
    try:
        fs, _ = fsspec.core.url_to_fs(text, **options)
    except ImportError as e:
        raise ArgumentError(f"{text}: {e} (pip install 'zckpt[s3]' for s3://)") from None
    except (ValueError, TypeError) as e:
        raise ArgumentError(f"{text}: {e}") from None
    return _wrap(fs), _url_path(text)


def _explicit(storage: Any) -> Storage | None:
    if storage is None:
        return None
    if _is_filesystem(storage):
        return _wrap(storage)
    result: Storage = storage
    return result


@contextlib.contextmanager
def storage_options_scope(options: Mapping[str, Any] | None) -> Iterator[None]:
    """Use ``options`` for every URL opened without its own ``storage_options`` in this
    block (the CLI's ``--storage-option``).

    Example:
        >>> with storage_options_scope({"skip_instance_cache": True}):
        ...     storage_for("memory://scoped")[1]
        'memory://scoped'
    """
    token = _scoped.set(options)
    try:
        yield
    finally:
        _scoped.reset(token)


def isdir(path: str) -> bool:
    """``os.path.isdir`` for a path; for a URL, whether its storage holds a directory there.

    Example:
        >>> isdir("/"), isdir("memory://nothing-here")
        (True, False)
    """
    if not is_url(path):
        return os.path.isdir(path)
    storage, p = storage_for(path)
    return storage.is_dir(p)


def lexists(path: str) -> bool:
    """``os.path.lexists`` for a path; for a URL, whether an object or directory is there.

    Example:
        >>> lexists("/"), lexists("memory://nothing-here")
        (True, False)
    """
    if not is_url(path):
        return os.path.lexists(path)
    storage, p = storage_for(path)
    return storage.exists(p)


def listdir(path: str) -> list[str]:
    """``os.listdir`` for a path; for a URL, the names its storage lists there.

    Example:
        >>> listdir("memory://nothing-here")
        []
    """
    if not is_url(path):
        return os.listdir(path)
    storage, p = storage_for(path)
    return storage.listdir(p)
