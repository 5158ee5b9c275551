"""Objects through the plain fsspec API, for :class:`~zckpt.store.FsspecStorage` on any
filesystem fsspec knows that is not S3 (``memory://``, ``file://``, ...), and the values and
errors every backend shares.
"""

from __future__ import annotations

import contextlib
import hashlib
import posixpath
import secrets
from collections.abc import Iterable
from typing import Any, NamedTuple

import xxhash

from zckpt.store._layout import generation_of
from zckpt.store._transient import Retry

__all__ = ["FsBackend", "Head", "PreconditionFailedError", "UnsupportedError"]


class Head(NamedTuple):
    """What a store says about an object: size, ETag ("" when none) and seconds since it was
    written by the server's clock (None when the store does not say)."""

    size: int
    etag: str
    age: float | None


class PreconditionFailedError(OSError):
    """A conditional write or delete found the object not as required."""


class UnsupportedError(OSError):
    """The store does not implement conditional requests."""


def _head(info: dict[str, Any]) -> Head:
    """An fsspec ``info`` entry's size and ETag ("" where the filesystem keeps none)."""
    return Head(int(info["size"]), str(info.get("ETag") or info.get("etag") or ""), None)


class FsBackend:
    """Objects through the plain fsspec API: any filesystem fsspec knows (``memory://``, ...)."""

    def __init__(self, fs: Any, retry: Retry) -> None:
        self.fs, self.retry = fs, retry
        protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
        self.renames = bool({"file", "local"} & set(protocol))

    def head(self, path: str) -> Head | None:
        try:
            info = self.retry.call(lambda: self.fs.info(path))
        except FileNotFoundError:
            return None
        if info.get("type") != "file":
            return None
        return _head(info)

    def is_prefix(self, path: str) -> bool:
        return bool(self.retry.call(lambda: self.fs.isdir(path)))

    def get(self, path: str, offset: int, length: int) -> bytes:
        data = self.retry.call(lambda: self.fs.cat_file(path, start=offset, end=offset + length))
        return bytes(data)

    def get_small(self, path: str) -> tuple[bytes, Head] | None:
        try:
            data = bytes(self.retry.call(lambda: self.fs.cat_file(path)))
        except FileNotFoundError:
            return None
        except (IsADirectoryError, NotADirectoryError):
            return None
        return data, Head(len(data), hashlib.md5(data, usedforsecurity=False).hexdigest(), None)

    def files_under(self, path: str) -> list[tuple[str, Head]]:
        if not self.is_prefix(path):
            return []
        self.fs.invalidate_cache(path)
        found = self.retry.call(lambda: self.fs.find(path, detail=True))
        base = self.fs._strip_protocol(path).rstrip("/") + "/"
        return [
            (name[len(base) :], _head(info))
            for name, info in found.items()
            if name.startswith(base) and info.get("type") == "file"
        ]

    def listdir(self, path: str) -> list[str]:
        if not self.is_prefix(path):
            return []
        try:
            entries = self.retry.call(lambda: self.fs.ls(path, detail=False, refresh=True))
        except FileNotFoundError:
            return []
        base = path.rstrip("/")
        return sorted({posixpath.basename(e.rstrip("/")) for e in entries if e.rstrip("/") != base})

    def delete(self, path: str, if_match: str | None = None) -> None:
        if if_match is not None:
            got = self.get_small(path)
            if got is None:
                return
            if got[1].etag != if_match:
                raise PreconditionFailedError(path)
        with contextlib.suppress(FileNotFoundError):
            self.retry.call(lambda: self.fs.rm_file(path))

    def rmtree(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.retry.call(lambda: self.fs.rm(path, recursive=True))

    def makedirs(self, path: str) -> None:
        self.retry.call(lambda: self.fs.makedirs(path, exist_ok=True))

    def remove_dir(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError, OSError):
            if self.fs.isdir(path) and not self.fs.ls(path, detail=False, refresh=True):
                self.fs.rmdir(path)

    def put_small(
        self, path: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None
    ) -> str:
        """Check-then-write where the filesystem offers nothing better (``mode="create"`` is
        exclusive only where the backend implements it so)."""
        if if_match is not None:
            got = self.get_small(path)
            if got is None or got[1].etag != if_match:
                raise PreconditionFailedError(path)
        try:
            mode = "create" if if_absent else "overwrite"
            self.retry.call(lambda: self.fs.pipe_file(path, data, mode=mode))
        except FileExistsError as e:
            raise PreconditionFailedError(path) from e
        return hashlib.md5(data, usedforsecurity=False).hexdigest()

    def put(self, path: str, buffers: Iterable[memoryview | bytes]) -> tuple[int, int]:
        hasher, size = xxhash.xxh3_64(), 0
        # A BlobStream iterates in file order (head first), holding its frames: this API
        # cannot write at offsets.
        views = [memoryview(b).cast("B") for b in buffers]
        for v in views:
            hasher.update(v)
            size += v.nbytes
        target = path
        if self.renames:  # a local filesystem: write aside, then rename (atomic there)
            d, name = posixpath.split(path)
            target = posixpath.join(d, f".{name}.tmp.{secrets.token_hex(4)}")
        unique = generation_of(posixpath.basename(path)) is not None
        try:
            if unique or self.renames:
                # A fresh name: stream it (a failure leaves at most an unreferenced object).
                with self.fs.open(target, "wb") as f:
                    for v in views:
                        f.write(v)
            else:  # a reused name (manifest, latest): one whole write, never a torn object
                self.retry.call(lambda: self.fs.pipe_file(target, b"".join(views)))
            if self.renames:
                self.fs.mv(target, path)
        except BaseException:
            if unique or self.renames:
                with contextlib.suppress(Exception):
                    self.fs.rm_file(target)
            raise
        self.fs.invalidate_cache(path)
        got = self.head(path)
        if got is None or got.size != size:
            raise OSError(f"the store holds {got and got.size} bytes, {size} were written")
        return size, hasher.intdigest()
