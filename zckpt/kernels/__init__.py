"""Compiled kernels for the byte-moving hot paths of saving, consolidating and resharding.

Most of the time spent on a sharded checkpoint goes into moving bytes, not into logic:

* **Range copies.** Consolidation gathers the fragments each rank saved of a tensor into the full
  tensor; resharding scatters tensors into the partitions of a new world size. Both are lists of
  ``(src_start, dst_start, count)`` copies between flat buffers. In torch that is one
  ``dst[a:b].copy_(src[c:d])`` per range, each paying Python and dispatcher overhead (dominant for
  the many small fragments of a large model); :func:`copy_ranges` does a whole table per call.
* **Upcasts.** Loading bf16/fp16 weights as fp32 masters is ``dst[o:o+n].copy_(src.float())``,
  which materialises a temporary fp32 tensor for each range; :func:`upcast_ranges` converts
  straight into a preallocated destination, bit-exactly as torch converts.
* **Byte planes.** zstd compresses floats far better when byte ``b`` of every element is stored
  together (exponent bytes repeat; mantissa noise does not). :func:`split_planes` and
  :func:`join_planes` do the transposition in one pass, with word loads for 2/4/8-byte elements.

The kernels are Numba functions (compiled on first use, cached in ``__pycache__``, so nothing is
compiled at import) that release the GIL: a call moving at least ``_PARALLEL_MIN_BYTES`` is split
into chunks run by a shared thread pool. ``zckpt/kernels/_reference.py`` holds plain NumPy
versions: the oracle for the tests and the fallback when Numba's JIT is off
(``NUMBA_DISABLE_JIT=1``), when an array is misaligned, and when ``src`` and ``dst`` share memory.

All arrays are 1-D and C-contiguous (``planes`` arrays are 2-D); callers view tensors as NumPy
(``t.view(torch.uint8).numpy()``). Every argument is checked before any compiled code runs, so a
bad table raises :class:`ValueError` naming the row instead of corrupting memory.

Example:
    >>> import numpy as np
    >>> dst = np.zeros(6, np.uint8)
    >>> copy_ranges(dst, np.arange(1, 5, dtype=np.uint8), np.array([[0, 4, 2], [2, 0, 2]]))
    >>> dst.tolist()
    [3, 4, 0, 0, 1, 2]
"""

from __future__ import annotations

import itertools
import operator
import os
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from types import ModuleType
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from zckpt.kernels import _reference

__all__ = ["backend", "copy_ranges", "join_planes", "split_planes", "upcast_ranges"]

# A call moving fewer bytes (counted on the destination) runs on the calling thread: below this,
# waking pool threads costs more than it saves. Tests lower it to exercise the chunking.
_PARALLEL_MIN_BYTES = 8 << 20
# With ``threads=None``, each thread gets at least this much, and at most this many threads run.
_MIN_CHUNK_BYTES = 4 << 20
_MAX_AUTO_THREADS = 8
# Chunk boundaries fall on multiples of this many elements so that threads do not write to the
# same cache line.
_ALIGN = 64

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}

_impl: ModuleType | None = None
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _load_impl() -> ModuleType:
    """The Numba kernels, or the NumPy reference where Numba cannot or should not run them."""
    global _impl
    if _impl is None:
        try:
            import numba

            from zckpt.kernels import _numba
        except ImportError:  # pragma: no cover - numba is a dependency; keep working without it
            _impl = _reference
        else:
            # The word loops and the fp16 bit layout assume little-endian memory.
            jit = not getattr(numba.config, "DISABLE_JIT", False) and sys.byteorder == "little"
            _impl = _numba if jit else _reference
    return _impl


def backend() -> str:
    """Which implementation the kernels run: ``"numba"``, or ``"numpy"`` (the reference).

    Example:
        >>> backend() in ("numba", "numpy")
        True
    """
    return "numba" if _load_impl() is not _reference else "numpy"


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def _forget_pool() -> None:
    # A forked child inherits the pool object but not its threads: start a new one there.
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_cpus(), thread_name_prefix="zckpt-kernels")
        return _pool


def _run(tasks: Sequence[Callable[[], None]]) -> None:
    """Run the tasks, all but the first on the pool, and return once every one has finished."""
    if not tasks:
        return
    if len(tasks) == 1:
        tasks[0]()
        return
    futures: list[Future[None]] = [_executor().submit(t) for t in tasks[1:]]
    error: BaseException | None = None
    try:
        tasks[0]()
    except BaseException as e:  # re-raised below, once no worker writes into the arrays any more
        error = e
    for f in futures:
        # Wait for all: returning while a worker still writes into the caller's array is not OK.
        error = error or f.exception()
    if error is not None:
        raise error


def _check_threads(threads: int | None) -> int | None:
    if threads is None:
        return None
    n = operator.index(threads)
    if n < 1:
        raise ValueError(f"threads must be at least 1, got {n}")
    return n


def _n_threads(threads: int | None, nbytes: int) -> int:
    """How many chunks to run: ``threads`` if given, else by size (1 below the threshold)."""
    if threads is not None:
        return threads
    if nbytes < _PARALLEL_MIN_BYTES:
        return 1
    return max(1, min(_cpus(), _MAX_AUTO_THREADS, nbytes // _MIN_CHUNK_BYTES))


def _bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """``[0, n)`` cut into at most ``parts`` non-empty pieces on ``_ALIGN`` boundaries."""
    cuts = sorted({min(n, (n * k // parts) // _ALIGN * _ALIGN) for k in range(1, parts)} | {0, n})
    return [(a, b) for a, b in itertools.pairwise(cuts) if b > a]


def _check_array(name: str, a: Any, ndim: int = 1, writeable: bool = False) -> npt.NDArray[Any]:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, not {type(a).__name__}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if a.dtype.hasobject:
        raise TypeError(f"{name} must hold plain data, not dtype {a.dtype}")
    if writeable and not a.flags.writeable:
        raise ValueError(f"{name} is read-only")
    return a


def _bad_row(i: int, row: list[int], src_len: int, dst_len: int) -> ValueError:
    s, _, c = row
    if min(row) < 0:
        why = "has a negative entry"
    elif s + c > src_len:
        why = f"reads past the end of src ({src_len} elements)"
    else:
        why = f"writes past the end of dst ({dst_len} elements)"
    return ValueError(f"table row {i} (src_start, dst_start, count) = {row} {why}")


def _check_table(table: Any, src_len: int, dst_len: int) -> tuple[npt.NDArray[np.int64], int]:
    """``table`` as a C-contiguous ``int64`` array of in-bounds rows, and its total count.

    Raises :class:`ValueError` naming the first bad row.
    """
    t = table if isinstance(table, np.ndarray) else np.asarray(table)
    if t.size == 0:
        return np.zeros((0, 3), np.int64), 0
    if t.ndim != 2 or t.shape[1] != 3:
        raise ValueError(f"table must have shape (n, 3), got {t.shape}")
    if t.dtype.kind not in "iu":
        raise TypeError(f"table must hold integers, not {t.dtype}")
    if t.dtype != np.int64 or not t.flags.c_contiguous:
        if t.dtype == np.uint64 and t.max() > np.iinfo(np.int64).max:
            i = int(np.argmax((t > np.iinfo(np.int64).max).any(axis=1)))
            raise ValueError(f"table row {i} {t[i].tolist()} is out of range")
        t = np.ascontiguousarray(t, dtype=np.int64)
    if len(t) <= 16:
        # Python ints: cheaper than NumPy for the one-row tables of most calls, and no overflow.
        total = 0
        for i, (s, d, c) in enumerate(t.tolist()):
            if min(s, d, c) < 0 or s + c > src_len or d + c > dst_len:
                raise _bad_row(i, [s, d, c], src_len, dst_len)
            total += c
        return t, total
    s, d, c = t[:, 0], t[:, 1], t[:, 2]
    # Written as ``start > len - count`` so that huge values cannot overflow int64.
    bad = (s < 0) | (d < 0) | (c < 0) | (c > src_len) | (s > src_len - c)
    bad |= (c > dst_len) | (d > dst_len - c)
    if bad.any():
        i = int(np.argmax(bad))
        raise _bad_row(i, t[i].tolist(), src_len, dst_len)
    return t, int(c.sum())


def _dst_disjoint(table: npt.NDArray[np.int64]) -> bool:
    """Whether no two rows write the same element (only then may rows run in any order)."""
    t = table[table[:, 2] > 0]
    t = t[np.argsort(t[:, 1], kind="stable")]
    return bool(np.all(t[:-1, 1] + t[:-1, 2] <= t[1:, 1]))


def _split_table(table: npt.NDArray[np.int64], parts: int) -> list[npt.NDArray[np.int64]]:
    """``table`` cut into tables that each copy about ``1/parts`` of its elements.

    Rows straddling a cut are split in two; every element of every row lands in exactly one part.
    """
    count = table[:, 2]
    ends = np.cumsum(count)
    starts = ends - count
    out = []
    for lo, hi in _bounds(int(ends[-1]) if len(ends) else 0, parts):
        r0 = int(np.searchsorted(ends, lo, side="right"))  # first row ending after lo
        r1 = int(np.searchsorted(starts, hi, side="left"))  # first row starting at or after hi
        part = table[r0:r1].copy()
        skip = np.maximum(lo - starts[r0:r1], 0)
        keep = np.minimum(hi - starts[r0:r1], count[r0:r1])
        part[:, 0] += skip
        part[:, 1] += skip
        part[:, 2] = keep - skip
        out.append(part)
    return out


def _run_ranges(
    kernel: Callable[[npt.NDArray[np.int64]], None],
    table: npt.NDArray[np.int64],
    threads: int | None,
    nbytes: int,
) -> None:
    n = _n_threads(threads, nbytes)
    if n > 1 and len(table) > 1 and not _dst_disjoint(table):
        n = 1  # rows writing the same elements must run in table order
    if n == 1:
        kernel(table)
    else:
        _run([partial(kernel, p) for p in _split_table(table, n)])


def copy_ranges(
    dst: npt.NDArray[Any],
    src: npt.NDArray[Any],
    table: npt.ArrayLike,
    *,
    threads: int | None = None,
) -> None:
    """Copy ``src[s:s+c]`` to ``dst[d:d+c]`` for every row ``(s, d, c)`` of ``table``.

    Rows are applied in order (a later row wins where rows write the same elements). ``src`` and
    ``dst`` may share memory; each row then behaves as if its source were read before writing.

    Args:
        dst: 1-D C-contiguous writeable array; callers pass ``uint8``/``uint16``/``uint32``/
            ``uint64`` views, but any plain dtype works (only the bytes are moved).
        src: 1-D C-contiguous array of ``dst``'s dtype.
        table: ``(n, 3)`` integers ``(src_start, dst_start, count)``, in elements.
        threads: how many threads may share the work (default: by size, one below 8 MiB).

    Raises:
        TypeError: an array is not a NumPy array, dtypes differ, or the table is not integer.
        ValueError: an array's shape/layout is wrong, or a table row is negative or out of
            bounds (the message names the row); nothing has been copied then.

    Example:
        >>> import numpy as np
        >>> dst = np.zeros(5, np.uint32)
        >>> copy_ranges(dst, np.array([10, 11, 12], np.uint32), [[1, 0, 2], [0, 4, 1]])
        >>> dst.tolist()
        [11, 12, 0, 0, 10]
        >>> copy_ranges(dst, np.zeros(3, np.uint32), [[2, 0, 2]])
        Traceback (most recent call last):
        ...
        ValueError: table row 0 ... = [2, 0, 2] reads past the end of src (3 elements)
    """
    threads = _check_threads(threads)
    _check_array("dst", dst, writeable=True)
    _check_array("src", src)
    if dst.dtype != src.dtype:
        raise TypeError(f"dst and src dtypes differ: {dst.dtype} and {src.dtype}")
    t, total = _check_table(table, len(src), len(dst))
    if not total:
        return
    k = dst.dtype.itemsize
    if k in _UINT:
        # One compiled kernel per element size, whatever the dtype (float, int, bool...).
        dst, src = dst.view(_UINT[k]), src.view(_UINT[k])
    else:
        dst, src, t = dst.view(np.uint8), src.view(np.uint8), t * k
    impl = _load_impl()
    if np.may_share_memory(dst, src) or not (dst.flags.aligned and src.flags.aligned):
        _reference.copy_ranges(dst, src, t)
        return
    _run_ranges(lambda p: impl.copy_ranges(dst, src, p), t, threads, total * k)


def upcast_ranges(
    dst: npt.NDArray[np.float32],
    src: npt.NDArray[Any],
    table: npt.ArrayLike,
    kind: Literal["bf16", "f16"],
    *,
    threads: int | None = None,
) -> None:
    """Like :func:`copy_ranges`, converting bf16 or fp16 bit patterns to float32 on the way.

    The result is bit for bit what ``torch`` gives for ``t.view(torch.bfloat16).float()`` (resp.
    ``torch.float16``) on CPU, for all 65536 inputs: subnormals are normalised, infinities and
    signed zeros kept, and a NaN keeps its sign and payload with the quiet bit set. torch itself
    is not consistent about fp16 NaNs: the scalar loop that finishes each of its vector loops
    (the last ``n % 8`` elements, and a few more wherever its threads' chunks meet) turns every
    fp16 NaN into ``0x7FFFFFFF``. These kernels convert every element as torch's vector loop does.

    Args:
        dst: 1-D C-contiguous writeable ``float32`` array.
        src: 1-D C-contiguous array of 2-byte elements (bit patterns; viewed as ``uint16``).
        table: ``(n, 3)`` integers ``(src_start, dst_start, count)``, in elements.
        kind: ``"bf16"`` (bfloat16) or ``"f16"`` (IEEE half precision).
        threads: as for :func:`copy_ranges`.

    Raises:
        TypeError: wrong array types or dtypes.
        ValueError: bad ``kind``, layout, or table row (as for :func:`copy_ranges`).

    Example:
        >>> import numpy as np
        >>> dst = np.full(4, -1.0, np.float32)
        >>> src = np.array([0x3C00, 0x0001, 0xFC00], np.uint16)  # 1.0, 2**-24, -inf
        >>> upcast_ranges(dst, src, [[0, 1, 3]], "f16")
        >>> dst.tolist()
        [-1.0, 1.0, 5.960464477539063e-08, -inf]
    """
    if kind not in ("bf16", "f16"):
        raise ValueError(f"kind must be 'bf16' or 'f16', got {kind!r}")
    threads = _check_threads(threads)
    _check_array("dst", dst, writeable=True)
    _check_array("src", src)
    if dst.dtype != np.float32:
        raise TypeError(f"dst must be float32, not {dst.dtype}")
    if src.dtype.itemsize != 2:
        raise TypeError(f"src must have 2-byte elements (bf16/fp16 bits), not {src.dtype}")
    t, total = _check_table(table, len(src), len(dst))
    if not total:
        return
    src = src.view(np.uint16)
    impl = _load_impl()
    if np.may_share_memory(dst, src) or not (dst.flags.aligned and src.flags.aligned):
        _reference.upcast_ranges(dst, src, t, kind)
        return
    _run_ranges(lambda p: impl.upcast_ranges(dst, src, p, kind), t, threads, 4 * total)


def _run_planes(
    kernel: Callable[[int, int], None], n: int, itemsize: int, threads: int | None
) -> None:
    parts = _bounds(n, _n_threads(threads, n * itemsize))
    _run([partial(kernel, a, b) for a, b in parts])


def split_planes(
    src: npt.NDArray[np.uint8],
    itemsize: int,
    out: npt.NDArray[np.uint8],
    *,
    threads: int | None = None,
) -> None:
    """Split ``n`` elements of ``itemsize`` bytes into byte planes: ``out[b, i] = src[i*k + b]``.

    Args:
        src: 1-D C-contiguous ``uint8`` array of ``n * itemsize`` bytes (``x.view(np.uint8)``).
        itemsize: bytes per element, at least 1 (2, 4 and 8 have fast word loops).
        out: C-contiguous writeable ``uint8`` array of shape ``(itemsize, n)``.
        threads: as for :func:`copy_ranges`.

    Raises:
        TypeError: an array is not a ``uint8`` NumPy array.
        ValueError: ``itemsize`` below 1, ``len(src)`` not a multiple of it, or ``out`` of the
            wrong shape/layout.

    Example:
        >>> import numpy as np
        >>> x = np.array([0x0102, 0x0304, 0x0506], np.uint16)  # little-endian in memory
        >>> out = np.empty((2, 3), np.uint8)
        >>> split_planes(x.view(np.uint8), 2, out)
        >>> out.tolist()
        [[2, 4, 6], [1, 3, 5]]
    """
    k = operator.index(itemsize)
    if k < 1:
        raise ValueError(f"itemsize must be at least 1, got {k}")
    threads = _check_threads(threads)
    _check_array("src", src)
    _check_array("out", out, ndim=2, writeable=True)
    if src.dtype != np.uint8 or out.dtype != np.uint8:
        raise TypeError(
            f"src and out must be uint8 (use .view(np.uint8)), not {src.dtype}/{out.dtype}"
        )
    if len(src) % k:
        raise ValueError(f"src has {len(src)} bytes, not a multiple of itemsize {k}")
    n = len(src) // k
    if out.shape != (k, n):
        raise ValueError(f"out must have shape {(k, n)}, got {out.shape}")
    if np.may_share_memory(src, out):
        _reference.split_planes(src, out, 0, n)  # in one piece: NumPy buffers overlapping copies
        return
    impl = _load_impl()
    _run_planes(lambda a, b: impl.split_planes(src, out, a, b), n, k, threads)


def join_planes(
    planes: npt.NDArray[np.uint8], out: npt.NDArray[np.uint8], *, threads: int | None = None
) -> None:
    """Interleave byte planes back into elements: the inverse of :func:`split_planes`.

    Args:
        planes: C-contiguous ``uint8`` array of shape ``(itemsize, n)``, ``itemsize >= 1``.
        out: 1-D C-contiguous writeable ``uint8`` array of ``n * itemsize`` bytes.
        threads: as for :func:`copy_ranges`.

    Raises:
        TypeError: an array is not a ``uint8`` NumPy array.
        ValueError: wrong shapes or layout.

    Example:
        >>> import numpy as np
        >>> out = np.empty(6, np.uint8)
        >>> join_planes(np.array([[2, 4, 6], [1, 3, 5]], np.uint8), out)
        >>> out.view(np.uint16).tolist() == [0x0102, 0x0304, 0x0506]
        True
    """
    threads = _check_threads(threads)
    _check_array("planes", planes, ndim=2)
    _check_array("out", out, writeable=True)
    if planes.dtype != np.uint8 or out.dtype != np.uint8:
        raise TypeError(f"planes and out must be uint8, not {planes.dtype}/{out.dtype}")
    k, n = planes.shape
    if k < 1:
        raise ValueError("planes must have at least one plane (itemsize >= 1)")
    if len(out) != k * n:
        raise ValueError(f"out must have {k * n} bytes ({k} planes of {n}), got {len(out)}")
    if np.may_share_memory(planes, out):
        _reference.join_planes(planes, out, 0, n)
        return
    impl = _load_impl()
    _run_planes(lambda a, b: impl.join_planes(planes, out, a, b), n, k, threads)
