"""Encoding a shard into a blob: chunk, compress in parallel, lay out, index."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import msgpack

from zckpt.errors import StateError
from zckpt.format._checksum import xxh3
from zckpt.format._codecs import CODECS, MAX_LEVEL, MIN_LEVEL, RAW, Frame, encode_chunk
from zckpt.format._dtypes import ITEMSIZE, dtype_code, is_planar
from zckpt.format._header import (
    PREAMBLE_SIZE,
    BlobHeader,
    ChunkEntry,
    align,
    pack_preamble,
)
from zckpt.format._index import decode_header, pack_index, shard_index
from zckpt.format._skeleton import check_plain
from zckpt.shard import Shard
from zckpt.spec import Fragment

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    import torch

__all__ = ["EncodedShard", "default_threads", "encode_shard", "encode_shard_parts", "pool_map"]

_ZEROS = memoryview(bytes(64))
# Below this much work a thread pool costs more than it saves.
_PARALLEL_MIN_BYTES = 1 << 20

T = TypeVar("T")
R = TypeVar("R")


class EncodedShard(NamedTuple):
    """A blob as a list of buffers in file order, ready for ``os.writev``.

    ``buffers[0]`` is the preamble, index and padding; then each frame's stored pieces and the
    zero padding before the next frame. Raw frames are memoryviews of the shard's tensor memory
    (no copy): keep the tensors unchanged until the buffers are written.

    Example:
        >>> import torch, zckpt
        >>> s = {"w": torch.ones(4)}
        >>> shard = zckpt.shard_state(s, zckpt.plan_shards(s, zckpt.ZeroSpec(1, 1)), 0)
        >>> parts = encode_shard_parts(shard)
        >>> parts.nbytes == sum(len(b) for b in parts.buffers) == parts.header.size
        True
    """

    buffers: list[memoryview | bytes]
    nbytes: int
    header: BlobHeader


def default_threads() -> int:
    """Worker threads used when ``threads`` is None: the usable cores, at most 8.

    Example:
        >>> default_threads() >= 1
        True
    """
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def pool_map(fn: Callable[[T], R], items: Sequence[T], threads: int, work: int) -> Iterator[R]:
    """``map(fn, items)`` in order, in a thread pool when there is enough work to pay for one,
    with at most ``2 * threads`` results computed ahead of the consumer (a streaming consumer
    holds a few results, not all of them)."""
    if threads <= 1 or len(items) <= 1 or work < _PARALLEL_MIN_BYTES:
        return map(fn, items)

    def results() -> Iterator[R]:
        with ThreadPoolExecutor(min(threads, len(items)), thread_name_prefix="zckpt-codec") as pool:
            ahead: deque[Future[R]] = deque()
            try:
                for item in items:
                    ahead.append(pool.submit(fn, item))
                    if len(ahead) >= 2 * threads:
                        yield ahead.popleft().result()
                while ahead:
                    yield ahead.popleft().result()
            finally:
                for f in ahead:
                    f.cancel()

    return results()


def _tensor_bytes(t: torch.Tensor) -> npt.NDArray[np.uint8]:
    """The bytes of a 1-D tensor as a uint8 array sharing its memory (CPU, contiguous)."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.view(torch.uint8).numpy()


def _check_extra(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    if extra is None:
        return {}
    if not isinstance(extra, Mapping) or not all(isinstance(k, str) for k in extra):
        raise StateError("extra must be a mapping with str keys")
    out = dict(extra)
    try:  # what we write we must be able to read back (str keys, plain values, bounded depth)
        packed = msgpack.packb(out, use_bin_type=True)
        back = msgpack.unpackb(packed, raw=False, strict_map_key=True)
    except Exception as e:
        raise StateError(f"extra is not msgpack-able: {e}") from None
    problem = check_plain(back)  # the reader's bound (MAX_DEPTH levels)
    if problem is not None:
        raise StateError(f"extra cannot be read back: {problem}")
    return out


def check_version(version: int) -> None:
    """``version`` is a blob version this zckpt writes (1 or 2), else a ValueError."""
    if isinstance(version, bool) or version not in (1, 2):
        raise ValueError(f"blob version must be 1 or 2, got {version!r}")


def _check_args(codec: str, level: int, chunk_bytes: int, threads: int | None) -> int:
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; expected one of {sorted(CODECS)}")
    if isinstance(level, bool) or not isinstance(level, int) or not MIN_LEVEL <= level <= MAX_LEVEL:
        raise ValueError(f"zstd level must be an int in [{MIN_LEVEL}, {MAX_LEVEL}], got {level!r}")
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    return CODECS[codec]


def on_host(t: torch.Tensor) -> bool:
    """Whether a tensor's bytes are in host memory (its frames can be views of it).

    Example:
        >>> import torch
        >>> on_host(torch.ones(2))
        True
    """
    return t.device.type == "cpu"


class _DeviceSlice(NamedTuple):
    """Elements ``[start, stop)`` of a tensor on another device (a GPU), copied to host memory
    only when its chunk is encoded, so a streamed blob never holds the whole shard on the host."""

    tensor: torch.Tensor
    start: int
    stop: int
    itemsize: int

    def __len__(self) -> int:
        return (self.stop - self.start) * self.itemsize

    def host(self) -> npt.NDArray[np.uint8]:
        return _tensor_bytes(self.tensor[self.start : self.stop])


class _Job(NamedTuple):
    fragment: int
    start: int
    stop: int
    src: npt.NDArray[np.uint8] | _DeviceSlice
    itemsize: int
    planar: bool


def _jobs(shard: Shard, chunk_bytes: int, lazy_devices: bool = False) -> list[_Job]:
    """One job per chunk; with ``lazy_devices``, chunks of non-CPU tensors are copied to the
    host one by one when encoded (:class:`_DeviceSlice`) instead of whole tensors up front."""
    jobs = []
    for i, (f, t) in enumerate(zip(shard.fragments, shard.data, strict=True)):
        code = dtype_code(t.dtype, shard.skeleton.name(f.leaf))
        size = ITEMSIZE[code]
        lazy = lazy_devices and not on_host(t)
        flat = t.detach().reshape(-1) if lazy else t
        src = None if lazy else _tensor_bytes(t)
        per = max(1, chunk_bytes // size)
        for a in range(0, f.numel, per):
            b = min(f.numel, a + per)
            piece: npt.NDArray[np.uint8] | _DeviceSlice = (
                _DeviceSlice(flat, a, b, size) if src is None else src[a * size : b * size]
            )
            jobs.append(_Job(i, a, b, piece, size, is_planar(code)))
    return jobs


def _layout(
    shard: Shard, jobs: list[_Job], frames: list[Frame], extra: dict[str, Any], version: int
) -> tuple[bytes, list[ChunkEntry], int]:
    """Pack the index with absolute frame offsets; return (head bytes, chunks in file order,
    offset of the first frame).

    Offsets depend on the index length, which depends on the offsets: iterate from below. The
    index length never shrinks as the data offset grows, so this reaches the least fixed point
    (usually on the first or second pass).
    """
    data_offset = 0
    while True:
        flat: list[ChunkEntry] = []
        entries: list[tuple[Fragment, list[ChunkEntry]]] = [(f, []) for f in shard.fragments]
        pos = data_offset
        for job, fr in zip(jobs, frames, strict=True):
            pos = align(pos)
            c = ChunkEntry(
                job.start, job.stop, fr.codec, pos, fr.length, len(job.src), fr.checksum, fr.planes
            )
            entries[job.fragment][1].append(c)
            flat.append(c)
            pos += fr.length
        size = max(pos, data_offset)
        index = pack_index(shard_index(shard, entries, extra, size, version))
        need = align(PREAMBLE_SIZE + len(index))
        if need <= data_offset:
            head = pack_preamble(index, xxh3(index), version) + index
            return head + bytes(data_offset - len(head)), flat, data_offset
        data_offset = need


def _encode(job: _Job, codec: int, level: int) -> Frame:
    src = job.src.host() if isinstance(job.src, _DeviceSlice) else job.src
    return encode_chunk(src, job.itemsize, job.planar, codec, level)


def encode_shard_parts(
    shard: Shard,
    *,
    codec: str = "raw",
    level: int = 1,
    chunk_bytes: int = 8 << 20,
    threads: int | None = None,
    extra: Mapping[str, Any] | None = None,
    version: int = 1,
) -> EncodedShard:
    """Encode a shard as a list of buffers in file order (see :func:`encode_shard`).

    Example:
        >>> import torch, zckpt
        >>> s = {"w": torch.arange(1000.0)}
        >>> shard = zckpt.shard_state(s, zckpt.plan_shards(s, zckpt.ZeroSpec(1, 1)), 0)
        >>> parts = encode_shard_parts(shard, chunk_bytes=1024)
        >>> len(parts.header.fragments[0].chunks)
        4
    """
    code = _check_args(codec, level, chunk_bytes, threads)
    check_version(version)
    extra_map = _check_extra(extra)
    jobs = _jobs(shard, chunk_bytes)
    work = 0 if code == RAW else sum(len(j.src) for j in jobs)
    n_threads = default_threads() if threads is None else threads
    frames = list(pool_map(lambda j: _encode(j, code, level), jobs, n_threads, work))
    head, chunks, data_offset = _layout(shard, jobs, frames, extra_map, version)
    buffers: list[memoryview | bytes] = [head]
    pos = data_offset
    for c, fr in zip(chunks, frames, strict=True):
        if c.offset > pos:
            buffers.append(_ZEROS[: c.offset - pos])
        buffers.extend(fr.pieces)
        pos = c.offset + c.length
    header = decode_header(head, skeleton=shard.skeleton)
    return EncodedShard(buffers, max(pos, data_offset), header)


def encode_shard(
    shard: Shard,
    *,
    codec: str = "raw",
    level: int = 1,
    chunk_bytes: int = 8 << 20,
    threads: int | None = None,
    extra: Mapping[str, Any] | None = None,
    version: int = 1,
) -> bytes:
    """Encode one rank's shard as a blob (docs/format.md).

    Args:
        shard: from :func:`zckpt.shard_state` or :func:`zckpt.shard_from_local`.
        codec: ``"raw"`` (no compression: fastest), ``"zstd"``, or ``"byteplane"`` (float
            tensors split into byte planes, the exponent plane compressed; best for weights
            and optimizer states). A chunk is stored raw whenever compressing it does not pay.
        level: zstd level (1 is the measured sweet spot; higher levels rarely pay here).
        chunk_bytes: fragments are cut into chunks of at most this many bytes (whole elements),
            each compressed in parallel and checksummed, and decodable on its own.
        threads: worker threads for compression (None: the usable cores, at most 8).
        extra: a small msgpack-able map stored in the index (str keys).
        version: 1 (the default) writes a self-describing blob, whose index carries the whole
            skeleton: :func:`~zckpt.format.decode_shard` needs nothing else. 2 writes what
            saves into large checkpoints write: the skeleton's digest and the dtypes and
            shapes of only the tensors the shard holds fragments of, so the index grows with
            the shard, not the state; decoding it takes the skeleton
            (``decode_shard(blob, skeleton=shard.skeleton)``), checked against the digest.

    Returns:
        The blob bytes; ``b"".join(encode_shard_parts(shard, ...).buffers)``.

    Raises:
        StateError: a dtype without a format code, a state nested too deeply, a bad ``extra``.
        ValueError: bad codec, level, chunk size, thread count or version.

    Example:
        >>> import torch, zckpt
        >>> from zckpt.format import decode_shard
        >>> s = {"master": {"w": torch.randn(1000)}, "step": 3}
        >>> shard = zckpt.shard_state(s, zckpt.plan_shards(s, zckpt.ZeroSpec(2, 1)), 0)
        >>> blob = encode_shard(shard, codec="byteplane")
        >>> torch.equal(decode_shard(blob).data[0], shard.data[0])
        True
    """
    parts = encode_shard_parts(
        shard,
        codec=codec,
        level=level,
        chunk_bytes=chunk_bytes,
        threads=threads,
        extra=extra,
        version=version,
    )
    return b"".join(parts.buffers)
