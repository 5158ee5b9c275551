"""Numba versions of the kernels (compiled lazily on first call, cached in ``__pycache__``).

The functions without a leading underscore have the same signatures and meaning as those in
:mod:`zckpt.kernels._reference` and, like them, trust their arguments to have been checked by
:mod:`zckpt.kernels`. The jitted loops still clamp every loop bound to the arrays they index, so
that even unchecked arguments cannot make them touch memory outside those arrays.

How the loops are written matters more than usual here:

* Each table row (each chunk of planes) is sliced first and the inner loop walks the slices from
  0: offset arithmetic inside the inner loop stopped LLVM from vectorising it (measured 2.8
  against 12 GB/s for upcasts, 5 against 27 GB/s for byte planes).
* Numba widens integer arithmetic to 64 bits; the fp16 loop wraps each step in ``_U32(...)`` so
  that LLVM can narrow it back to 32-bit SIMD lanes (64-bit lanes ran at half the speed).
* Normalising an fp16 subnormal needs its leading bit; ``float32(2**23 + m) - 2**23`` gets it from
  the FPU for the price of two bit casts (Numba has none, hence the two tiny intrinsics). Every
  float there is zero or normal, so flush-to-zero/denormals-are-zero modes cannot change it.

With ``NUMBA_DISABLE_JIT=1`` the same functions run as plain Python (slowly, element by element;
:mod:`zckpt.kernels` then uses the NumPy reference instead, but the tests still run these).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba
import numpy as np
import numpy.typing as npt
from numba import types
from numba.extending import intrinsic

__all__ = ["copy_ranges", "join_planes", "split_planes", "upcast_ranges"]

_F = TypeVar("_F", bound=Callable[..., Any])

_U8 = np.uint8
_U16 = np.uint16
_U32 = np.uint32
_U64 = np.uint64
_F32 = np.float32

# Elements per block in the generic (any itemsize) plane loops: the block's source bytes stay in
# L1/L2 while each of the ``itemsize`` planes is written, instead of ``itemsize`` passes over RAM.
_BLOCK = 4096


def _jit(fn: _F) -> _F:
    """``numba.njit(cache=True, nogil=True)``, typed so that mypy keeps the function's signature.

    ``nogil`` lets :mod:`zckpt.kernels` run chunks of one call on several threads; ``cache`` keeps
    the machine code in ``__pycache__`` so that only the first process pays for compiling.
    """
    return cast(_F, numba.njit(cache=True, nogil=True)(fn))


def _bitcast_intrinsic(src: Any, dst: Any) -> Callable[[Any], Any]:
    """A Numba intrinsic reinterpreting a ``src`` scalar's bits as ``dst`` (LLVM ``bitcast``)."""

    def typer(typingctx: Any, x: Any) -> Any:
        if x != src:
            return None
        sig = dst(src)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.bitcast(args[0], context.get_value_type(dst))

        return sig, codegen

    return cast(Callable[[Any], Any], intrinsic(typer))


def _py_f32_from_bits(x: Any) -> Any:
    return _U32(x).view(_F32)


def _py_bits_from_f32(x: Any) -> Any:
    return _F32(x).view(_U32)


# Intrinsics cannot run as Python, so pure-Python mode gets NumPy scalar views doing the same.
_f32_from_bits: Callable[[Any], Any]
_bits_from_f32: Callable[[Any], Any]
if getattr(numba.config, "DISABLE_JIT", False):  # attribute set at run time
    _f32_from_bits = _py_f32_from_bits
    _bits_from_f32 = _py_bits_from_f32
else:  # pragma: no cover - exercised whenever the JIT is on
    _f32_from_bits = _bitcast_intrinsic(types.uint32, types.float32)
    _bits_from_f32 = _bitcast_intrinsic(types.float32, types.uint32)


@_jit
def copy_ranges(dst: npt.NDArray[Any], src: npt.NDArray[Any], table: npt.NDArray[np.int64]) -> None:
    """Copy ``src[s:s+c]`` to ``dst[d:d+c]`` for every row ``(s, d, c)``, in order.

    Example:
        >>> dst = np.zeros(4, np.uint16)
        >>> copy_ranges(dst, np.array([7, 8, 9], np.uint16), np.array([[1, 0, 2]], np.int64))
        >>> dst.tolist()
        [8, 9, 0, 0]
    """
    for r in range(table.shape[0]):
        s = table[r, 0]
        d = table[r, 1]
        c = table[r, 2]
        a = src[s : s + c]
        b = dst[d : d + c]
        for j in range(min(a.size, b.size)):
            b[j] = a[j]


@_jit
def _bf16_ranges(
    dst: npt.NDArray[np.uint32], src: npt.NDArray[np.uint16], table: npt.NDArray[np.int64]
) -> None:
    for r in range(table.shape[0]):
        s = table[r, 0]
        d = table[r, 1]
        c = table[r, 2]
        a = src[s : s + c]
        b = dst[d : d + c]
        for j in range(min(a.size, b.size)):
            # bf16 is the top half of a float32: widening is a shift, NaN payloads and all.
            b[j] = _U32(_U32(a[j]) << _U32(16))


@_jit
def _f16_ranges(
    dst: npt.NDArray[np.uint32], src: npt.NDArray[np.uint16], table: npt.NDArray[np.int64]
) -> None:
    for r in range(table.shape[0]):
        s = table[r, 0]
        d = table[r, 1]
        c = table[r, 2]
        a = src[s : s + c]
        b = dst[d : d + c]
        for j in range(min(a.size, b.size)):
            h = _U32(a[j])
            sign = _U32(_U32(h & _U32(0x8000)) << _U32(16))
            em = _U32(h & _U32(0x7FFF))  # exponent and mantissa
            # Normal: move the fields up 13 bits and rebias the exponent by 127 - 15 = 112.
            normal = _U32(_U32(em << _U32(13)) + _U32(112 << 23))
            # Subnormal or zero, m * 2**-24: 2**23 + m minus 2**23 is float32(m), exact and
            # normalised by the FPU; scaling by 2**-24 is exact too (the result is a normal float).
            f = _f32_from_bits(_U32(_U32(0x4B000000) | em)) - _F32(8388608.0)
            sub = _U32(_bits_from_f32(f * _F32(2.0**-24)))
            # Infinity, or NaN: the payload stays, the quiet bit is set (what torch does in bulk).
            special = _U32(_U32(em << _U32(13)) | _U32(0x7F800000))
            if _U32(em & _U32(0x3FF)) != _U32(0):
                special = _U32(special | _U32(0x00400000))
            v = normal
            if em < _U32(0x0400):
                v = sub
            if em >= _U32(0x7C00):
                v = special
            b[j] = _U32(sign | v)


def upcast_ranges(
    dst: npt.NDArray[np.float32],
    src: npt.NDArray[np.uint16],
    table: npt.NDArray[np.int64],
    kind: str,
) -> None:
    """Like :func:`copy_ranges`, converting bf16 or fp16 bit patterns (``kind``) to float32.

    Example:
        >>> dst = np.zeros(2, np.float32)
        >>> upcast_ranges(dst, np.array([0x3C00, 0xC000], np.uint16), np.array([[0, 0, 2]]), "f16")
        >>> dst.tolist()
        [1.0, -2.0]
    """
    kernel = _bf16_ranges if kind == "bf16" else _f16_ranges
    kernel(dst.view(np.uint32), src, table)


@_jit
def _split2(
    words: npt.NDArray[np.uint16], out: npt.NDArray[np.uint8], start: int, stop: int
) -> None:
    w = words[start:stop]
    o0 = out[0, start:stop]
    o1 = out[1, start:stop]
    for i in range(min(w.size, o0.size)):
        x = w[i]
        o0[i] = _U8(x & _U16(0xFF))
        o1[i] = _U8(x >> _U16(8))


@_jit
def _split4(
    words: npt.NDArray[np.uint32], out: npt.NDArray[np.uint8], start: int, stop: int
) -> None:
    w = words[start:stop]
    o0 = out[0, start:stop]
    o1 = out[1, start:stop]
    o2 = out[2, start:stop]
    o3 = out[3, start:stop]
    for i in range(min(w.size, o0.size)):
        x = w[i]
        o0[i] = _U8(x & _U32(0xFF))
        o1[i] = _U8(_U32(x >> _U32(8)) & _U32(0xFF))
        o2[i] = _U8(_U32(x >> _U32(16)) & _U32(0xFF))
        o3[i] = _U8(x >> _U32(24))


@_jit
def _split8(
    words: npt.NDArray[np.uint64], out: npt.NDArray[np.uint8], start: int, stop: int
) -> None:
    w = words[start:stop]
    o0 = out[0, start:stop]
    o1 = out[1, start:stop]
    o2 = out[2, start:stop]
    o3 = out[3, start:stop]
    o4 = out[4, start:stop]
    o5 = out[5, start:stop]
    o6 = out[6, start:stop]
    o7 = out[7, start:stop]
    for i in range(min(w.size, o0.size)):
        x = w[i]
        o0[i] = _U8(x & _U64(0xFF))
        o1[i] = _U8(_U64(x >> _U64(8)) & _U64(0xFF))
        o2[i] = _U8(_U64(x >> _U64(16)) & _U64(0xFF))
        o3[i] = _U8(_U64(x >> _U64(24)) & _U64(0xFF))
        o4[i] = _U8(_U64(x >> _U64(32)) & _U64(0xFF))
        o5[i] = _U8(_U64(x >> _U64(40)) & _U64(0xFF))
        o6[i] = _U8(_U64(x >> _U64(48)) & _U64(0xFF))
        o7[i] = _U8(x >> _U64(56))


@_jit
def _split_any(
    src: npt.NDArray[np.uint8], out: npt.NDArray[np.uint8], start: int, stop: int
) -> None:
    k = out.shape[0]
    stop = min(stop, out.shape[1], src.size // k)
    for lo in range(max(start, 0), stop, _BLOCK):
        hi = min(lo + _BLOCK, stop)
        block = src[lo * k : hi * k]
        for b in range(k):
            row = out[b, lo:hi]
            for i in range(row.size):
                row[i] = block[i * k + b]


@_jit
def _join2(
    planes: npt.NDArray[np.uint8], words: npt.NDArray[np.uint16], start: int, stop: int
) -> None:
    w = words[start:stop]
    p0 = planes[0, start:stop]
    p1 = planes[1, start:stop]
    for i in range(min(w.size, p0.size)):
        w[i] = _U16(_U16(p0[i]) | _U16(_U16(p1[i]) << _U16(8)))


@_jit
def _join4(
    planes: npt.NDArray[np.uint8], words: npt.NDArray[np.uint32], start: int, stop: int
) -> None:
    w = words[start:stop]
    p0 = planes[0, start:stop]
    p1 = planes[1, start:stop]
    p2 = planes[2, start:stop]
    p3 = planes[3, start:stop]
    for i in range(min(w.size, p0.size)):
        lo = _U32(_U32(p0[i]) | _U32(_U32(p1[i]) << _U32(8)))
        hi = _U32(_U32(_U32(p2[i]) << _U32(16)) | _U32(_U32(p3[i]) << _U32(24)))
        w[i] = _U32(lo | hi)


@_jit
def _join8(
    planes: npt.NDArray[np.uint8], words: npt.NDArray[np.uint64], start: int, stop: int
) -> None:
    w = words[start:stop]
    p0 = planes[0, start:stop]
    p1 = planes[1, start:stop]
    p2 = planes[2, start:stop]
    p3 = planes[3, start:stop]
    p4 = planes[4, start:stop]
    p5 = planes[5, start:stop]
    p6 = planes[6, start:stop]
    p7 = planes[7, start:stop]
    for i in range(min(w.size, p0.size)):
        a = _U64(_U64(p0[i]) | _U64(_U64(p1[i]) << _U64(8)))
        b = _U64(_U64(_U64(p2[i]) << _U64(16)) | _U64(_U64(p3[i]) << _U64(24)))
        c = _U64(_U64(_U64(p4[i]) << _U64(32)) | _U64(_U64(p5[i]) << _U64(40)))
        d = _U64(_U64(_U64(p6[i]) << _U64(48)) | _U64(_U64(p7[i]) << _U64(56)))
        w[i] = _U64(_U64(a | b) | _U64(c | d))


@_jit
def _join_any(
    planes: npt.NDArray[np.uint8], out: npt.NDArray[np.uint8], start: int, stop: int
) -> None:
    k = planes.shape[0]
    stop = min(stop, planes.shape[1], out.size // k)
    for lo in range(max(start, 0), stop, _BLOCK):
        hi = min(lo + _BLOCK, stop)
        block = out[lo * k : hi * k]
        for b in range(k):
            row = planes[b, lo:hi]
            for i in range(row.size):
                block[i * k + b] = row[i]


_WORDS = {2: np.uint16, 4: np.uint32, 8: np.uint64}
_SPLIT: dict[int, Callable[..., None]] = {2: _split2, 4: _split4, 8: _split8}
_JOIN: dict[int, Callable[..., None]] = {2: _join2, 4: _join4, 8: _join8}


def _words(buf: npt.NDArray[np.uint8], k: int) -> npt.NDArray[Any] | None:
    """``buf`` as little-endian ``k``-byte words when a word loop may use it, else ``None``.

    Numba types an array without its alignment, so a misaligned view would be read with aligned
    loads; such buffers take the byte loop instead.
    """
    if k not in _WORDS or buf.ctypes.data % k:
        return None
    return buf.view(_WORDS[k])


def split_planes(
    src: npt.NDArray[np.uint8], out: npt.NDArray[np.uint8], start: int, stop: int
) -> None:
    """Byte planes of elements ``[start, stop)``: ``out[b, i] = src[i * k + b]``, ``k = len(out)``.

    Example:
        >>> out = np.zeros((2, 3), np.uint8)
        >>> split_planes(np.arange(6, dtype=np.uint8), out, 0, 3)
        >>> out.tolist()
        [[0, 2, 4], [1, 3, 5]]
    """
    k = out.shape[0]
    words = _words(src, k)
    if words is None:
        _split_any(src, out, start, stop)
    else:
        _SPLIT[k](words, out, start, stop)


def join_planes(
    planes: npt.NDArray[np.uint8], out: npt.NDArray[np.uint8], start: int, stop: int
) -> None:
    """Inverse of :func:`split_planes` for elements ``[start, stop)``.

    Example:
        >>> out = np.zeros(6, np.uint8)
        >>> join_planes(np.array([[0, 2, 4], [1, 3, 5]], np.uint8), out, 0, 3)
        >>> out.tolist()
        [0, 1, 2, 3, 4, 5]
    """
    k = planes.shape[0]
    words = _words(out, k)
    if words is None:
        _join_any(planes, out, start, stop)
    else:
        _JOIN[k](planes, words, start, stop)
