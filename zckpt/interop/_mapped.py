"""Eager output tensors mapped from the checkpoint's files instead of copied into fresh memory.

A DeepSpeed fp32 weight is, byte for byte, a run of ranges of the optimizer files (the ranks'
flat fp32 partitions, ``_stream.py``). Copying it into new memory costs a page fault and the
zeroing of every output page (0.35-0.45 s for 383 MB on this project's VM, loaded or not: the
floor of any copy, and most of both DeepSpeed's and zckpt's time). :func:`mapped_tensor` builds
the tensor without that copy: one private anonymous mapping per tensor, over which each whole
page of a range is mapped, with ``MAP_PRIVATE | MAP_FIXED``, from the file itself; only the
pieces a page mapping cannot cover (the partial pages at the ranges' ends, and ranges whose file
offset is not congruent, modulo the page size, with their place in the tensor) are copied.

The result is an ordinary CPU tensor, as ``torch.load(mmap=True)`` returns them: writable
(copy-on-write: a written page becomes the process's own, the file never changes), freed with
its last reference (the whole mapping is unmapped), and ``share_memory_()``, ``pin_memory()``,
``load_state_dict`` and ``torch.save`` treat it as any tensor. Its pages are the page cache's
until written, so they count as file-backed memory (``RssFile``), and under memory pressure the
kernel may drop them and read them again from the file.

What it asks of the files: **they must not be truncated or rewritten in place while the tensors
live** (a page not yet written would read the new bytes, or fault with ``SIGBUS`` past a
truncated end). Deleting or renaming them is safe (the mapping keeps the old file). DeepSpeed
writes each save under its tag's directory with ``torch.save``, which truncates a file it
replaces, so a run saving again under the same tag would change a live state dict silently.
That is why mapping is **off by default** (the outputs are copied, as
``torch.load(mmap=False)`` does) and is turned on by whoever knows the files stay as they are:
``ZCKPT_MAP=1`` in the environment (read at each call), or ``map_files=True``.

Only tensors of at least :data:`MIN_BYTES` are mapped (below that a few page faults cost less
than the system calls), only on Linux, and at most a quarter of ``vm.max_map_count`` mappings
made here are alive at once; past that, tensors are copied as before.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
import weakref
from collections.abc import Sequence

import torch

from zckpt.assemble import Source
from zckpt.interop._pages import PagedSource
from zckpt.interop._stream import Segment

__all__ = ["ENV", "MIN_BYTES", "mapped_tensor", "mapping_enabled"]

#: Set to ``0`` (or ``off``, ``no``, ``false``) to copy every eager output into new memory.
ENV = "ZCKPT_MAP"
#: Tensors smaller than this are copied.
MIN_BYTES = 1 << 20

_PAGE = mmap.PAGESIZE
_MAP_FIXED = 0x10  # Linux
_PROT = mmap.PROT_READ | mmap.PROT_WRITE
_LOCK = threading.Lock()
_live = [0]  # mappings (VMAs, counted generously) made here and still alive


def _libc_mmap() -> object | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).mmap
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    fn.argtypes += [ctypes.c_long]
    fn.restype = ctypes.c_void_p
    return fn


_mmap = _libc_mmap()


def _budget() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read()) // 4
    except (OSError, ValueError):
        return 16384


_BUDGET = _budget()


def mapping_enabled(map_files: bool | None = None) -> bool:
    """Whether eager outputs are mapped: ``map_files`` if given, else ``ZCKPT_MAP=1`` in the
    environment (default off: copies), and only where this system can (Linux).

    Example:
        >>> mapping_enabled(False)
        False
    """
    if _mmap is None:
        return False
    if map_files is not None:
        return map_files
    return os.environ.get(ENV, "0").strip().lower() in ("1", "on", "yes", "true")


def _release(n: int) -> None:
    with _LOCK:
        _live[0] -= n


def _map_fixed(
    addr: int, n: int, path: str, offset: int, stamp: tuple[int, int] | None = None
) -> bool:
    """Map ``n`` bytes of ``path`` from ``offset`` at ``addr`` (inside our own mapping); False
    (nothing mapped) where ``path`` is no longer the file of ``stamp`` (``(st_dev, st_ino)``
    of the file the source maps: one renamed over it since has other bytes)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if stamp is not None and (st.st_dev, st.st_ino) != stamp:
            return False
        got = _mmap(addr, n, _PROT, mmap.MAP_PRIVATE | _MAP_FIXED, fd, offset)  # type: ignore[operator]
    finally:
        os.close(fd)
    if got == addr:
        return True
    # A failed MAP_FIXED may have unmapped the range: put anonymous memory back, then copy.
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED
    if _mmap(addr, n, _PROT, flags, -1, 0) != addr:  # type: ignore[operator]
        raise MemoryError(f"cannot restore {n} bytes of memory at {addr:#x} after mapping {path}")
    return False


def _copy(src: Source, a: int, b: int, out: torch.Tensor) -> None:
    if isinstance(src, PagedSource):
        src.read_into(a, b, out)  # the source's file pages released as they are copied
    else:
        part = src.read(a, b)
        if part.dtype != out.dtype:
            raise TypeError(f"a {part.dtype} segment in a {out.dtype} tensor")
        out.copy_(part.reshape(-1))


def mapped_tensor(
    shape: Sequence[int], dtype: torch.dtype, segments: Sequence[Segment]
) -> torch.Tensor | None:
    """The tensor whose elements are ``segments``' in order, its whole pages mapped from the
    checkpoint files they lie in (see the module docstring); None where too little of it can
    be mapped (small, in memory, another system, or the mapping budget spent): copy it then.

    Example:
        >>> import tempfile
        >>> from zckpt.spec import Fragment
        >>> f = tempfile.NamedTemporaryFile(suffix=".bin")
        >>> torch.arange(1 << 19, dtype=torch.float32).numpy().tofile(f.name)
        >>> data = torch.from_file(f.name, size=1 << 19, dtype=torch.float32)
        >>> from zckpt.interop._pages import file_mappings
        >>> src = PagedSource(Fragment(0, 0, 1 << 19), data, file_mappings([f.name]))
        >>> t = mapped_tensor((1 << 18,), torch.float32, [(src, 1024, 1024 + (1 << 18))])
        >>> t is None or (t[0].item(), t[-1].item())  # None off Linux
        (1024.0, 263167.0)
    """
    item = torch.empty((), dtype=dtype).element_size()
    pieces: list[tuple[int, Source, int, int, tuple[str, int, int] | None]] = []
    pos = 0
    for src, a, b in segments:
        where = src.file_range(a, b) if isinstance(src, PagedSource) else None
        pieces.append((pos, src, a, b, where))
        pos += (b - a) * item
    total = pos
    if _mmap is None or total < MIN_BYTES:
        return None
    weight: dict[int, int] = {}
    for p, _src, _a, _b, where in pieces:
        if where is not None and where[1] % item == 0:
            r = (where[1] - p) % _PAGE
            weight[r] = weight.get(r, 0) + where[2]
    if not weight:
        return None
    r, best = max(weight.items(), key=lambda kv: kv[1])
    if best < MIN_BYTES:
        return None
    # Each file range mapped splits the anonymous mapping: 1 + 2 per range at most.
    vmas = 1 + 2 * sum(1 for p, *_, w in pieces if w is not None and (w[1] - p) % _PAGE == r)
    with _LOCK:
        if _live[0] + vmas > _BUDGET:
            return None
        _live[0] += vmas
    try:
        m = mmap.mmap(-1, -(-(r + total) // _PAGE) * _PAGE, flags=mmap.MAP_PRIVATE, prot=_PROT)
    except OSError:
        _release(vmas)
        return None
    weakref.finalize(m, _release, vmas)
    flat = torch.frombuffer(m, dtype=dtype, count=total // item, offset=r)
    base = flat.data_ptr()  # byte ``pos`` of the tensor is at ``base + pos``
    for p, src, a, b, where in pieces:
        n = (b - a) * item
        lo, hi = base + p, base + p + n
        vlo, vhi = -(-lo // _PAGE) * _PAGE, hi // _PAGE * _PAGE
        if where is None or (where[1] - p) % _PAGE != r or vhi <= vlo:
            _copy(src, a, b, flat[p // item : (p + n) // item])
            continue
        stamp = src.file_stamp(a, b) if isinstance(src, PagedSource) else None
        if not _map_fixed(vlo, vhi - vlo, where[0], where[1] + (vlo - lo), stamp):
            vlo = vhi = lo  # nothing mapped: copy it all
        head, tail = (vlo - lo) // item, (vhi - lo) // item
        if head:
            _copy(src, a, a + head, flat[p // item : p // item + head])
        if tail < b - a:
            _copy(src, a + tail, b, flat[p // item + tail : (p + n) // item])
    return flat.view(tuple(shape))
