"""Plain NumPy versions of the kernels: the oracle the Numba kernels are tested against, and the
fallback when Numba's JIT is disabled (``NUMBA_DISABLE_JIT=1``) or an array is misaligned.

Every function here takes arguments already checked and normalised by :mod:`zckpt.kernels`
(1-D C-contiguous arrays, a valid ``int64`` table of shape ``(n, 3)``); it does no checking of
its own. They are written for obviousness, not speed: one NumPy slice assignment per table row.
The fp16 conversion deliberately takes a different route from the Numba kernel (NumPy's own
``float16`` cast, then a NaN fix-up) so that the two are independent witnesses of each other.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["copy_ranges", "f16_bits_to_f32_bits", "join_planes", "split_planes", "upcast_ranges"]


def copy_ranges(
    dst: npt.NDArray[np.generic], src: npt.NDArray[np.generic], table: npt.NDArray[np.int64]
) -> None:
    """Copy ``src[s:s+c]`` to ``dst[d:d+c]`` for every row ``(s, d, c)`` of ``table``, in order.

    Example:
        >>> dst = np.zeros(5, np.uint8)
        >>> copy_ranges(dst, np.arange(1, 4, dtype=np.uint8), np.array([[0, 2, 3]]))
        >>> dst.tolist()
        [0, 0, 1, 2, 3]
    """
    for s, d, c in table.tolist():
        # NumPy gives a slice assignment memmove semantics, so overlapping dst/src rows are right.
        dst[d : d + c] = src[s : s + c]


def f16_bits_to_f32_bits(h: npt.NDArray[np.uint16]) -> npt.NDArray[np.uint32]:
    """The float32 bit patterns of IEEE fp16 bit patterns, as torch's bulk ``.float()`` gives them.

    Finite values and infinities convert exactly (NumPy's cast). A NaN keeps its sign and its 10
    payload bits (shifted to the top of the float32 mantissa) and is made quiet: torch sets the
    quiet bit of a signalling NaN where NumPy's cast leaves it signalling, so NaNs are rebuilt.

    Example:
        >>> [hex(b) for b in f16_bits_to_f32_bits(np.array([0x3C00, 0x0001, 0x7C01], np.uint16))]
        ['0x3f800000', '0x33800000', '0x7fc02000']
    """
    out = h.view(np.float16).astype(np.float32).view(np.uint32)
    w = h.astype(np.uint32)
    nan = ((w & 0x7C00) == 0x7C00) & ((w & 0x03FF) != 0)
    out[nan] = ((w[nan] & 0x8000) << 16) | 0x7FC00000 | ((w[nan] & 0x03FF) << 13)
    return out


def upcast_ranges(
    dst: npt.NDArray[np.float32],
    src: npt.NDArray[np.uint16],
    table: npt.NDArray[np.int64],
    kind: str,
) -> None:
    """Like :func:`copy_ranges`, converting bf16 or fp16 bit patterns (``kind``) to float32.

    Example:
        >>> dst = np.zeros(3, np.float32)
        >>> upcast_ranges(dst, np.array([0x3F80, 0xC000], np.uint16), np.array([[0, 1, 2]]), "bf16")
        >>> dst.tolist()
        [0.0, 1.0, -2.0]
    """
    out = dst.view(np.uint32)  # write bit patterns: a float assignment could touch NaN payloads
    for s, d, c in table.tolist():
        part = src[s : s + c]
        if kind == "bf16":
            out[d : d + c] = part.astype(np.uint32) << 16
        else:
            out[d : d + c] = f16_bits_to_f32_bits(part)


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
    out[:, start:stop] = src[start * k : stop * k].reshape(-1, k).T


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
    out[start * k : stop * k].reshape(-1, k)[...] = planes[:, start:stop].T
