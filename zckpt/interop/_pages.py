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

import torch

from zckpt.assemble import TensorSource

__all__ = ["PagedSource", "file_mappings"]

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


def file_mappings(paths: Iterable[str]) -> tuple[tuple[int, int], ...]:
    """Address ranges ``[start, end)`` where this process maps any of ``paths`` (Linux).

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
                if len(parts) == 6 and parts[5].rstrip("\n") in wanted:
                    lo, hi = parts[0].split("-")
                    found.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return ()
    return tuple(sorted(found))


def _inside(ranges: tuple[tuple[int, int], ...], lo: int, hi: int) -> bool:
    return any(a <= lo and hi <= b for a, b in ranges)


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

    mappings: tuple[tuple[int, int], ...]

    def read_into(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Copy elements ``[start, stop)`` into ``out``, releasing the source pages copied."""
        src = self.data[start:stop]
        item = src.element_size()
        lo = src.data_ptr()
        release = _dontneed is not None and _inside(self.mappings, lo, lo + src.numel() * item)
        step = max(1, _WINDOW // item)
        with torch.no_grad():
            for a in range(0, src.numel(), step):
                b = min(src.numel(), a + step)
                out[a:b].copy_(src[a:b])
                if release and _dontneed is not None:
                    first = -(-(lo + a * item) // _PAGE) * _PAGE
                    last = (lo + b * item) // _PAGE * _PAGE
                    if last > first:
                        _dontneed(first, last - first)
        return out
