"""Buffers cut into the bodies of S3 requests, without copying them: a file-like view over a
list of buffers (what botocore reads and aiohttp sends), and the cuts a multipart upload
makes (the first bytes of a stream held for part 1, parts that grow so that a stream of
unknown size stays within S3's 10,000 parts).
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from zckpt.store._write import windows

__all__ = ["GROW_EVERY", "ViewsReader", "flat_head", "flat_tail", "growing_parts"]

# Parts per size step of growing_parts (S3 allows 10,000 parts).
GROW_EVERY = 1000


class ViewsReader(io.RawIOBase):
    """A seekable, read-only file over a sequence of buffers, without copying them.

    The body of one request: botocore reads it for its checksum, seeks back, and aiohttp reads
    it again to send it.

    Example:
        >>> r = ViewsReader([memoryview(b"abc"), memoryview(b"de")])
        >>> len(r), r.read(4), r.read(), r.seek(1), r.read(2)
        (5, b'abcd', b'e', 1, b'bc')
    """

    def __init__(self, views: Iterable[memoryview]) -> None:
        super().__init__()
        self._views = [v for v in views if v.nbytes]
        self._starts: list[int] = []
        pos = 0
        for v in self._views:
            self._starts.append(pos)
            pos += v.nbytes
        self._size, self._pos, self._at = pos, 0, 0

    def __len__(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        self._at = 0
        while self._at + 1 < len(self._views) and self._starts[self._at + 1] <= self._pos:
            self._at += 1
        return self._pos

    def readinto(self, b: Any) -> int:
        out = memoryview(b).cast("B")
        done = 0
        while done < out.nbytes and self._pos < self._size:
            v, start = self._views[self._at], self._starts[self._at]
            inner = self._pos - start
            if inner >= v.nbytes:
                self._at += 1
                continue
            n = min(out.nbytes - done, v.nbytes - inner)
            out[done : done + n] = v[inner : inner + n]
            done, self._pos = done + n, self._pos + n
        return done


def flat_head(views: list[memoryview], n: int) -> list[memoryview]:
    """The first ``n`` bytes of ``views``, as views.

    Example:
        >>> [bytes(v) for v in flat_head([memoryview(b"abc"), memoryview(b"de")], 4)]
        [b'abc', b'd']
    """
    out: list[memoryview] = []
    for v in views:
        if n <= 0:
            break
        out.append(v[:n])
        n -= out[-1].nbytes
    return out


def flat_tail(views: list[memoryview], skip: int) -> list[memoryview]:
    """``views`` without their first ``skip`` bytes.

    Example:
        >>> [bytes(v) for v in flat_tail([memoryview(b"abc"), memoryview(b"de")], 4)]
        [b'e']
    """
    out: list[memoryview] = []
    for v in views:
        if skip >= v.nbytes:
            skip -= v.nbytes
            continue
        out.append(v[skip:])
        skip = 0
    return out


def growing_parts(buffers: Iterable[memoryview | bytes], size: int) -> Iterator[list[memoryview]]:
    """``buffers`` cut into parts of ``size`` bytes, twice that after 1,000 parts, four times
    after 2,000, ... (only the last may be shorter): parts small enough to hold while the
    size of the whole is still unknown, and never more than S3's 10,000 of them.

    Example:
        >>> [[bytes(v) for v in p] for p in growing_parts([b"abc", b"de"], 2)]
        [[b'ab'], [b'c', b'd'], [b'e']]
    """
    return windows(buffers, size, max_buffers=sys.maxsize, grow_every=GROW_EVERY)
