"""Reading memory-mapped tensors without keeping their file pages resident.

DeepSpeed's files are opened with ``torch.load(weights_only=True, mmap=True)``: a tensor is a
view of a private,
read-only file mapping, and every page copied out of it stays in the process's resident set
(``RssFile``) until the mapping goes, so consolidating a 1 GB checkpoint would hold the file's
pages *and* the output. :class:`PagedSource` copies such a tensor window by window and hands the
pages of each window back (``madvise(MADV_DONTNEED)``) once copied. For a private file mapping
that was never written, this only unmaps pages: the next access reads them again from the file
(the page cache keeps them), so nothing can be lost. Only memory proven to lie in a mapping of
one of the checkpoint's files (``/proc/self/maps``) is released; anywhere else (anonymous memory,
systems without ``/proc`` or ``madvise``) the copy is an ordinary copy.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from zckpt.assemble import TensorSource

__all__ = ["FileMapping", "PagedSource", "file_mappings", "release_pages"]

_MADV_DONTNEED = 4
_WINDOW = 16 << 20
_PAGE = mmap.PAGESIZE


def _madvise() -> Callable[[int, int], None] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int

    def dontneed(addr: int, n: int) -> None:
        fn(addr, n, _MADV_DONTNEED)  # a hint: on failure the pages merely stay resident

    return dontneed


_dontneed = _madvise()


def release_pages(lo: int, hi: int) -> None:
    """Hand back the whole pages inside addresses ``[lo, hi)`` of a private file mapping that
    was never written (``MADV_DONTNEED``: they are read again from the file if touched). Only
    call it on memory :func:`file_mappings` found; elsewhere it would discard data.

    Example:
        >>> release_pages(0, 0)  # nothing inside: no call
    """
    first = -(-lo // _PAGE) * _PAGE
    last = hi // _PAGE * _PAGE
    if _dontneed is not None and last > first:
        _dontneed(first, last - first)


class FileMapping(NamedTuple):
    """Addresses ``[start, end)`` of this process mapping ``path`` from byte ``offset`` on.

    Example:
        >>> m = FileMapping(4096, 8192, 0, "/f")
        >>> m.end - m.start
        4096
    """

    start: int
    end: int
    offset: int
    path: str
    #: The mapped file's identity, ``(st_dev, st_ino)`` as ``os.stat`` gives them (``None``:
    #: not known). A later copy by ``path`` checks it: the file there may have been replaced.
    stamp: tuple[int, int] | None = None


def file_mappings(paths: Iterable[str]) -> tuple[FileMapping, ...]:
    """Where this process maps any of ``paths`` (Linux ``/proc/self/maps``; else ``()``).

    Example:
        >>> import tempfile
        >>> f = tempfile.NamedTemporaryFile()
        >>> _ = f.write(b"x" * 8192); f.flush()
        >>> m = mmap.mmap(f.fileno(), 8192, prot=mmap.PROT_READ)
        >>> len(file_mappings([f.name])) >= 1 or not os.path.exists("/proc/self/maps")
        True
    """
    wanted = {os.path.realpath(p) for p in paths}
    found = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                path = parts[5].rstrip("\n") if len(parts) == 6 else ""
                if path in wanted:
                    lo, hi = parts[0].split("-")
                    major, minor = parts[3].split(":")
                    stamp = (os.makedev(int(major, 16), int(minor, 16)), int(parts[4]))
                    found.append(
                        FileMapping(int(lo, 16), int(hi, 16), int(parts[2], 16), path, stamp)
                    )
    except (OSError, ValueError):
        return ()
    return tuple(sorted(found))


def _mapping_of(ranges: tuple[FileMapping, ...], lo: int, hi: int) -> FileMapping | None:
    return next((m for m in ranges if m.start <= lo and hi <= m.end), None)


@dataclass(frozen=True, eq=False)
class PagedSource(TensorSource):
    """A saved fragment in a file mapping: copied out window by window, each window's pages
    released once copied (see the module docstring).

    Example:
        >>> from zckpt.spec import Fragment
        >>> src = PagedSource(Fragment(0, 0, 4), torch.arange(4.0), ())
        >>> out = torch.empty(2)
        >>> src.read_into(1, 3, out).tolist()
        [1.0, 2.0]
    """

    mappings: tuple[FileMapping, ...]

    def file_range(self, start: int, stop: int) -> tuple[str, int, int] | None:
        """``(path, byte offset, bytes)`` of elements ``[start, stop)`` in the checkpoint file
        they are mapped from, or None when they lie in no mapping of one (e.g. memory).

        Example:
            >>> from zckpt.spec import Fragment
            >>> PagedSource(Fragment(0, 0, 4), torch.arange(4.0), ()).file_range(0, 2) is None
            True
        """
        src = self.data[start:stop]
        if not src.is_contiguous():
            return None
        lo = src.data_ptr()
        n = src.numel() * src.element_size()
        m = _mapping_of(self.mappings, lo, lo + n)
        return None if m is None else (m.path, m.offset + (lo - m.start), n)

    def file_stamp(self, start: int, stop: int) -> tuple[int, int] | None:
        """``(st_dev, st_ino)`` of the file elements ``[start, stop)`` are mapped from (see
        :meth:`file_range`): a copy by its path must find this file there, not one renamed
        over it since. None where not known.

        Example:
            >>> from zckpt.spec import Fragment
            >>> PagedSource(Fragment(0, 0, 4), torch.arange(4.0), ()).file_stamp(0, 2) is None
            True
        """
        src = self.data[start:stop]
        lo = src.data_ptr()
        m = _mapping_of(self.mappings, lo, lo + src.numel() * src.element_size())
        return None if m is None else m.stamp

    def read_into(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Copy elements ``[start, stop)`` into ``out``, releasing the source pages copied."""
        src = self.data[start:stop]
        item = src.element_size()
        lo = src.data_ptr()
        inside = _mapping_of(self.mappings, lo, lo + src.numel() * item)
        release = _dontneed is not None and inside is not None
        step = max(1, _WINDOW // item)
        with torch.no_grad():
            for a in range(0, src.numel(), step):
                b = min(src.numel(), a + step)
                out[a:b].copy_(src[a:b])
                if release:
                    release_pages(lo + a * item, lo + b * item)
        return out
