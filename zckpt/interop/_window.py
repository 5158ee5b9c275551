"""A byte range of a file as a read-only file object: a ``torch.save`` zip stored inside a
larger file (each tensor and value of a DCP ``.distcp`` file is one) opened by ``zipfile``
without copying it out.

Example:
    >>> import os, tempfile, zipfile
    >>> d = tempfile.mkdtemp()
    >>> with zipfile.ZipFile(d + "/z.zip", "w") as z:
    ...     z.writestr("a/x", b"hello")
    >>> with open(d + "/z.zip", "rb") as f:
    ...     inner = f.read()
    >>> with open(d + "/big", "wb") as f:
    ...     _ = f.write(b"junk" + inner + b"more")
    >>> fd = os.open(d + "/big", os.O_RDONLY)
    >>> zipfile.ZipFile(FileWindow(fd, 4, len(inner))).read("a/x")
    b'hello'
    >>> os.close(fd)
"""

from __future__ import annotations

import io
import os

__all__ = ["FileWindow"]


class FileWindow(io.RawIOBase):
    """Bytes ``[offset, offset + length)`` of the open file ``fd`` (read with ``pread``, so
    several windows of one descriptor never move each other's position); the descriptor stays
    the caller's.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryFile() as f:
        ...     _ = f.write(b"0123456789"); f.flush()
        ...     w = FileWindow(f.fileno(), 2, 5)
        ...     w.read(3), w.seek(0, 2), w.read()
        (b'234', 5, b'')
    """

    def __init__(self, fd: int, offset: int, length: int) -> None:
        super().__init__()
        self._fd, self._base, self._length, self._pos = fd, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        start = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        if start + pos < 0:
            raise OSError(f"seek to {start + pos}, before the window's start")
        self._pos = start + pos
        return self._pos

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(b).cast("B")
        n = max(0, min(len(view), self._length - self._pos))
        if not n:
            return 0
        got = os.preadv(self._fd, [view[:n]], self._base + self._pos)
        self._pos += got
        return got
