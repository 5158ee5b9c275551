"""Frame codecs: raw, zstd and byteplane, one chunk at a time (docs/format.md, "Frames").

Each function works on one chunk and is safe to run in worker threads: python-zstandard
releases the GIL while it (de)compresses, and every thread keeps its own compressor and
decompressor (they are not thread-safe, and making one per chunk costs more than small chunks).

Decompression never trusts a frame's own header: it streams into a buffer of the length the
index declares (already checked against the blob size), and the frame must fill it exactly.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, NamedTuple

from zckpt._lazy import lazy_module
from zckpt.errors import AllocationError, FormatError
from zckpt.format._checksum import xxh3, xxh3_parts

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    import zstandard

    U8 = npt.NDArray[np.uint8]
    Bytes = bytes | bytearray | memoryview | U8
else:
    # Imported where a chunk needs them: verifying raw frames (zckpt verify) needs neither.
    np = lazy_module("numpy")
    zstandard = lazy_module("zstandard")

__all__ = [
    "BYTEPLANE",
    "CODECS",
    "MAX_EXPANSION",
    "RAW",
    "ZSTD",
    "Frame",
    "decode_chunk",
    "encode_chunk",
]

RAW, ZSTD, BYTEPLANE = 0, 1, 2
CODECS: dict[str, int] = {"raw": RAW, "zstd": ZSTD, "byteplane": BYTEPLANE}

# A zstd block of up to 128 KiB costs at least 4 stored bytes (an RLE block), so no valid frame
# expands more than 32768-fold. Declared sizes beyond that are rejected before any allocation.
MAX_EXPANSION = 32768
# Largest zstd window a reader accepts (levels <= 19 never exceed it): bounds decoder memory.
MAX_WINDOW = 1 << 23
MIN_LEVEL, MAX_LEVEL = -(1 << 17), 19
# Byteplane: a plane larger than two samples is compressed whole only if a sample from its
# middle pays; mantissa planes of real weights do not, and trying them whole costs time.
_SAMPLE = 64 << 10


class Frame(NamedTuple):
    """One encoded chunk: its codec, stored pieces (in file order), length and checksum."""

    codec: int
    pieces: tuple[bytes | memoryview, ...]
    length: int
    checksum: int
    planes: tuple[tuple[int, int], ...]


_local = threading.local()


def _compressor(level: int) -> Any:
    cache: dict[int, Any] | None = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(
            level=level, write_checksum=False, write_content_size=True, write_dict_id=False
        )
    return c


def _plane_compressor() -> Any:
    """zstd tuned for byte planes: low-entropy noise with no long repeats (exponent bytes).

    The fast strategy with a tiny hash table and 7-byte minimum matches leaves nearly everything
    to zstd's Huffman literal coding: on the exponent plane of randn*0.02 weights and Adam
    moments it reaches 2.9-3.07x (the byte entropy allows 2.99-3.14x) where level 1 gives
    2.7-2.78x, at about twice level 1's speed both ways.
    """
    c = getattr(_local, "plane_cctx", None)
    if c is None:
        params = zstandard.ZstdCompressionParameters(
            window_log=17,
            hash_log=6,
            chain_log=6,
            search_log=1,
            min_match=7,
            target_length=0,
            strategy=zstandard.STRATEGY_FAST,
            write_content_size=True,
            write_checksum=False,
            write_dict_id=False,
        )
        c = _local.plane_cctx = zstandard.ZstdCompressor(compression_params=params)
    return c


def _decompressor() -> Any:
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
    return d


def _pays(stored: int, raw: int) -> bool:
    """Keep compressed bytes only when they save at least 1/32 of the raw size (writer policy)."""
    return stored < raw - (raw >> 5)


def _compress(data: Bytes, level: int) -> bytes:
    return bytes(_compressor(level).compress(data))


def _compress_plane(plane: U8) -> bytes | None:
    """The plane compressed, or None when compressing it does not pay."""
    c, n = _plane_compressor(), len(plane)
    if n > 2 * _SAMPLE:
        mid = n // 2 - _SAMPLE // 2
        if not _pays(len(c.compress(plane[mid : mid + _SAMPLE])), _SAMPLE):
            return None
    out = bytes(c.compress(plane))
    return out if _pays(len(out), n) else None


def encode_chunk(src: U8, itemsize: int, planar: bool, codec: int, level: int) -> Frame:
    """Encode one chunk's raw bytes, falling back to raw where compression does not pay.

    Raw frames are views of ``src`` (no copy). The checksum covers the stored bytes. ``level``
    applies to whole-chunk zstd (the zstd codec, and byteplane on dtypes it does not split);
    byte planes always use the plane-tuned parameters of :func:`_plane_compressor`.

    Example:
        >>> f = encode_chunk(np.zeros(4096, np.uint8), 4, True, ZSTD, 1)
        >>> f.codec, f.length < 4096
        (1, True)
    """
    if codec == BYTEPLANE and planar:
        from zckpt import kernels

        n = len(src) // itemsize
        planes = np.empty((itemsize, n), np.uint8)
        kernels.split_planes(src, itemsize, planes, threads=1)
        pieces: list[bytes | memoryview] = []
        table: list[tuple[int, int]] = []
        for i in range(itemsize):
            packed = _compress_plane(planes[i])
            if packed is None:
                pieces.append(planes[i].data)
                table.append((RAW, n))
            else:
                pieces.append(packed)
                table.append((ZSTD, len(packed)))
        if any(c == ZSTD for c, _ in table):
            return Frame(
                BYTEPLANE,
                tuple(pieces),
                sum(ln for _, ln in table),
                xxh3_parts(pieces),
                tuple(table),
            )
    elif codec != RAW:
        packed = _compress(src, level)
        if _pays(len(packed), len(src)):
            return Frame(ZSTD, (packed,), len(packed), xxh3(packed), ())
    view = src.data
    return Frame(RAW, (view,), len(src), xxh3(view), ())


def _zstd_into(src: Bytes, dst: U8 | memoryview, where: str) -> None:
    """Decompress one zstd frame into ``dst``, which it must fill exactly."""
    out = dst if isinstance(dst, memoryview) else dst.data
    got = 0
    try:
        with _decompressor().stream_reader(src, read_across_frames=True) as reader:
            while got < len(out):
                k = reader.readinto(out[got:])
                if not k:
                    break
                got += k
            more = reader.read(1) if got == len(out) else b""
    except zstandard.ZstdError as e:
        raise FormatError(f"{where}: corrupt zstd frame ({e})") from None
    if got != len(out) or more:
        what = "fewer" if got < len(out) else "more"
        raise FormatError(
            f"{where}: zstd frame decodes to {what} than the {len(out)} bytes declared"
        )


_SCRATCH_KEEP = 16 << 20  # larger scratch buffers are not kept alive between chunks


def _scratch(nbytes: int) -> U8:
    """A per-thread reusable buffer of at least ``nbytes`` (byteplane decoding)."""
    try:
        if nbytes > _SCRATCH_KEEP:
            return np.empty(nbytes, np.uint8)
        buf: U8 | None = getattr(_local, "scratch", None)
        if buf is None or len(buf) < nbytes:
            buf = _local.scratch = np.empty(max(nbytes, 1 << 20), np.uint8)
    except MemoryError:
        raise AllocationError(f"cannot allocate {nbytes} bytes to decode byte planes") from None
    return buf[:nbytes]


def decode_chunk(
    codec: int,
    planes: tuple[tuple[int, int], ...],
    stored: memoryview,
    dst: U8 | memoryview,
    itemsize: int,
    where: str,
    *,
    join: bool = True,
) -> None:
    """Decode one frame (checksum already verified) into ``dst``, its exact raw length.

    ``join=False`` only checks what can fail: a zstd frame, and each compressed byte plane of a
    byteplane frame, is still decompressed and its length checked, but a raw frame is not copied
    (its bytes are ``stored``) and byte planes are not put back together (the transposition
    cannot fail), so ``dst`` is left undefined, except for a byteplane frame of one-byte elements,
    whose one plane is the bytes. ``zckpt verify`` checks this way: with a ``memoryview`` as
    ``dst`` it needs neither NumPy nor the compiled kernels.

    Example:
        >>> f = encode_chunk(np.arange(4096, dtype=np.uint8), 4, True, BYTEPLANE, 1)
        >>> out = np.empty(4096, np.uint8)
        >>> decode_chunk(f.codec, f.planes, memoryview(b"".join(f.pieces)), out, 4, "chunk")
        >>> bool((out == np.arange(4096, dtype=np.uint8)).all())
        True
    """
    if codec == ZSTD:
        _zstd_into(stored, dst, where)
    elif codec == RAW:
        if join:
            _array(dst)[:] = np.frombuffer(stored, np.uint8)
    elif join:
        from zckpt import kernels

        n = len(dst) // itemsize
        work = _scratch(itemsize * n).reshape(itemsize, n)
        pos = 0
        for i, (c, ln) in enumerate(planes):
            piece = stored[pos : pos + ln]
            if c == RAW:
                work[i] = np.frombuffer(piece, np.uint8)
            else:
                _zstd_into(piece, work[i], f"{where}, byte plane {i}")
            pos += ln
        kernels.join_planes(work, _array(dst), threads=1)
    else:
        # Each compressed plane decoded into its own stretch of dst; a raw one needs no check,
        # except the one plane of a one-byte dtype, which is the bytes.
        n = len(dst) // itemsize
        out = dst if isinstance(dst, memoryview) else dst.data
        pos = 0
        for i, (c, ln) in enumerate(planes):
            if c != RAW:
                _zstd_into(
                    stored[pos : pos + ln], out[i * n : (i + 1) * n], f"{where}, byte plane {i}"
                )
            elif itemsize == 1:
                out[:] = stored[pos : pos + ln]
            pos += ln


def _array(dst: U8 | memoryview) -> U8:
    return np.frombuffer(dst, np.uint8) if isinstance(dst, memoryview) else dst
