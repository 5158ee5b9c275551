"""Decoding blobs: whole shards, single fragments (ranged, read on demand), and verification."""

from __future__ import annotations

import os
import re
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

from zckpt._lazy import lazy_module
from zckpt.errors import AllocationError, FormatError, TruncatedError, ZckptError
from zckpt.format._checksum import check
from zckpt.format._codecs import RAW, decode_chunk
from zckpt.format._dtypes import ITEMSIZE, dtype_code
from zckpt.format._header import BlobHeader, as_bytes_view
from zckpt.format._index import decode_header
from zckpt.format._span import read_raw_span, spans_of
from zckpt.shard import Shard
from zckpt.tree import Skeleton

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

    import numpy as np
    import numpy.typing as npt
    import torch

    U8 = npt.NDArray[np.uint8]
else:
    np = lazy_module("numpy")  # verifying a blob (iter_problems) needs none

__all__ = ["decode_fragment", "decode_shard", "iter_problems", "verify_blob"]

Read = Callable[[int, int], Any]
ReadInto = Callable[[int, memoryview], int]
_PARALLEL_MIN_BYTES = 1 << 20
_NOT_BOOL = re.compile(rb"[^\x00\x01]")  # a byte of a bool tensor that is neither 0 nor 1
_NOT_ZERO = re.compile(rb"[^\x00]")
# Worker pools, one per thread count, kept for the process's life: a load decodes fragment
# after fragment, and starting threads for each one cost as much as checking its checksums on a
# busy machine (each ``Thread.start`` waits until the new thread runs).
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _forget_pools() -> None:
    # A forked child inherits the pool objects but not their threads: it starts its own.
    _pools.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


def _pool(threads: int) -> ThreadPoolExecutor:
    from concurrent.futures import ThreadPoolExecutor  # here: verifying a blob needs no pool

    with _pools_lock:
        pool = _pools.get(threads)
        if pool is None:
            pool = _pools[threads] = ThreadPoolExecutor(
                max(threads, 1), thread_name_prefix="zckpt-codec" if threads > 0 else "zckpt-hash"
            )
        return pool


def _empty(numel: int, dtype: torch.dtype, what: str) -> torch.Tensor:
    """``torch.empty(numel, dtype)``, or an :class:`AllocationError` naming what it is for.

    The index bounds every size by the blob's own (a compressed chunk declares at most 32768
    times its stored bytes), but a blob may still declare more than this machine holds."""
    import torch

    try:
        return torch.empty(numel, dtype=dtype)
    except (RuntimeError, MemoryError) as e:
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        raise AllocationError(
            f"{what}: cannot allocate {nbytes} bytes ({numel} {dtype}) for it: "
            f"{' '.join(str(e).split())[:200]}"
        ) from None


def _bytes(n: int, what: str) -> U8:
    """``np.empty(n, uint8)``, or an :class:`AllocationError`."""
    try:
        return np.empty(n, np.uint8)
    except MemoryError:
        raise _cannot_allocate(n, what) from None


def _scratch(n: int, what: str) -> memoryview:
    """``n`` bytes to check frames in (a ``bytearray``: verification needs no NumPy), or an
    :class:`AllocationError`."""
    try:
        return memoryview(bytearray(n))
    except MemoryError:
        raise _cannot_allocate(n, what) from None


def _cannot_allocate(n: int, what: str) -> AllocationError:
    return AllocationError(f"{what}: cannot allocate {n} bytes for it")


def _decode_one(
    h: BlobHeader,
    fi: int,
    ci: int,
    stored: Any,
    dst: U8 | memoryview,
    *,
    check_only: bool = False,
) -> None:
    """Check one frame's length and checksum, then decode it into ``dst`` (its raw bytes).

    ``check_only``: every check is made, but a raw frame is not copied and a byteplane frame's
    planes are not put back together (``dst`` is then left undefined): see
    :func:`~zckpt.format._codecs.decode_chunk`.
    """
    c = h.fragments[fi].chunks[ci]
    where = h.describe(fi, ci)
    mv = as_bytes_view(stored)
    if len(mv) != c.length:
        raise TruncatedError(f"{where}: read {len(mv)} of its {c.length} bytes")
    check(mv, c.checksum, where)
    meta = h.meta(h.fragments[fi].fragment.leaf)
    size = ITEMSIZE[dtype_code(meta.dtype_name)]
    decode_chunk(c.codec, c.planes, mv, dst, size, where, join=not check_only)
    raw = mv if c.codec == RAW else dst if isinstance(dst, memoryview) else dst.data
    if meta.dtype_name == "bool" and _NOT_BOOL.search(raw):
        raise FormatError(f"{where}: a bool byte is neither 0 nor 1")


def _hash_pool() -> ThreadPoolExecutor:
    """The one thread that hashes behind a disk reader: its tasks run in the order they come."""
    return _pool(-1)


def _run(thunks: Iterable[Callable[[], None]], threads: int) -> None:
    """Run thunks in order, at most ``2 * threads`` in flight; the first failure (in order)
    is raised. The generator producing them runs in the calling thread only (``read`` is
    called there; ``read_into`` calls run in the thunks, in parallel)."""
    if threads <= 1:
        for t in thunks:
            t()
        return
    pool = _pool(threads)
    pending: deque[Future[None]] = deque()
    try:
        try:
            for t in thunks:
                pending.append(pool.submit(t))
                if len(pending) >= 2 * threads:
                    pending.popleft().result()
        except Exception:  # the producer failed (a read, an allocation): earlier work first
            while pending:
                pending.popleft().result()
            raise
        while pending:
            pending.popleft().result()
    finally:
        # A failure leaves nothing running behind the caller's back: what has not started is
        # cancelled, and what has is waited for (it writes into the caller's memory).
        for f in pending:
            f.cancel()
        for f in pending:
            if not f.cancelled():
                f.exception()


def _threads_for(nbytes: int, nchunks: int, threads: int | None) -> int:
    if nchunks <= 1 or nbytes < _PARALLEL_MIN_BYTES:
        return 1
    if threads is not None:
        return threads
    return decode_threads()


def decode_threads() -> int:
    """Decoding threads per process when ``threads`` is None: the usable cores (at most 8)
    shared among the job's processes on this machine, ``LOCAL_WORLD_SIZE`` of them (torchrun
    and DeepSpeed's launcher set it; 1 when unset or not a positive int), at least 1.

    Two ranks on two cores each running two readers would oversubscribe the cores: each
    rank's thread hand-offs then wait for a core (``docs/benchmarks.md``, issue 14 part 1).

    Example:
        >>> import os
        >>> os.environ.pop("LOCAL_WORLD_SIZE", None) and None
        >>> from zckpt.format._encode import default_threads
        >>> decode_threads() == default_threads()
        True
        >>> os.environ["LOCAL_WORLD_SIZE"] = "64"
        >>> decode_threads()
        1
        >>> del os.environ["LOCAL_WORLD_SIZE"]
    """
    from zckpt.format._encode import default_threads  # here: a small blob needs no pool

    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    share = int(local) if local.isdigit() and int(local) > 0 else 1
    return max(1, default_threads() // share)


def decode_fragment(
    header: BlobHeader,
    index: int,
    read: Read,
    *,
    start: int | None = None,
    stop: int | None = None,
    out: torch.Tensor | None = None,
    threads: int | None = None,
    read_into: ReadInto | None = None,
    piece_bytes: int | None = None,
    span_bytes: int | None = None,
    hash_behind: bool = False,
) -> torch.Tensor:
    """Decode fragment ``index`` of a blob, or its elements ``[start, stop)``, reading only the
    chunks that overlap them.

    Args:
        header: from :func:`decode_header`.
        index: which of ``header.fragments``.
        read: ``read(offset, length)`` returns ``length`` bytes of the blob at absolute byte
            ``offset`` (a file's ``os.pread``, an object store's ranged GET). Called once per
            overlapping chunk, in file order, from the calling thread only.
        start: first element, relative to the fragment (default 0).
        stop: end element, relative to the fragment (default the fragment's length).
        out: a 1-D tensor of the fragment's dtype with ``stop - start`` elements to decode into
            (raw chunks are copied straight into it); a new CPU tensor when None.
        threads: decompression threads (None: :func:`decode_threads`, the usable cores, at
            most 8, divided among the ``LOCAL_WORLD_SIZE`` processes of the job on this machine).
        read_into: ``read_into(offset, buffer)`` fills ``buffer`` with the blob's bytes at
            ``offset`` and returns how many it read (a file's ``os.preadv``). When given, raw
            chunks that lie wholly inside ``[start, stop)`` are read straight into ``out`` (no
            intermediate buffer, no copy), from the worker threads, and checked there; a chunk
            that fails its checksum leaves garbage in its part of ``out`` and raises.
        piece_bytes: when given, ``read_into`` may read fewer bytes than the buffer holds (at
            least one, unless the blob ends; e.g. a local file's page-cache-only read of one
            piece) and is called again for the rest of the chunk; the bytes each call returns
            are hashed right away, ``piece_bytes`` at a time, while they are in the CPU cache.
            None: ``read_into`` reads whole chunks (an object store's ranged GET), each hashed
            after its read. Either way every byte is checked against its chunk's checksum
            before this returns.
        span_bytes: when given (with ``read_into``), raw chunks adjacent in the file are read
            together: each run of them is cut into about one span per thread, at most
            ``span_bytes`` each (in whole chunks), and ``read_into`` is asked for a whole span
            at once (a local file's kernel read-ahead then sees one large sequential read per
            span, not one "random" read per chunk). Each chunk of a span is still checked
            against its own checksum. None: one ``read_into`` call per chunk.
        hash_behind: hash the bytes of each span on a thread of their own, behind its reads,
            instead of right after each read in the reading thread: for a reader that waits
            on a disk, which then goes on to its next read at once (a disk stream kept busy
            while the bytes just read are checked, on another core). Every chunk is still
            checked before this returns, and a mismatch before a failed read is raised first.

    Returns:
        ``out``, or the new 1-D tensor.

    Raises:
        ChecksumError: a chunk's bytes are damaged; ``TruncatedError`` when ``read`` returns
            short; ``FormatError`` for a frame that does not decode (each naming the tensor,
            element range and byte offset). ``IndexError``/``ValueError`` for bad arguments.

    Example:
        >>> import torch, zckpt
        >>> from zckpt.format import decode_header, encode_shard
        >>> s = {"w": torch.arange(100.0)}
        >>> shard = zckpt.shard_state(s, zckpt.plan_shards(s, zckpt.ZeroSpec(1, 3)), 0)
        >>> blob = encode_shard(shard, codec="zstd", chunk_bytes=64)
        >>> calls = []
        >>> def read(offset, length):
        ...     calls.append(offset)
        ...     return blob[offset : offset + length]
        >>> decode_fragment(decode_header(blob), 0, read, start=46, stop=50).tolist()
        [46.0, 47.0, 48.0, 49.0]
        >>> len(calls)
        2
    """
    n_frag = len(header.fragments)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n_frag:
        raise IndexError(f"fragment index {index!r} out of range ({n_frag} fragments)")
    f, chunks = header.fragments[index]
    lo = 0 if start is None else start
    hi = f.numel if stop is None else stop
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)) or not (
        0 <= lo <= hi <= f.numel
    ):
        raise ValueError(f"{header.describe(index)}: bad range [{start}, {stop}) of {f.numel}")
    for name, value in (("piece_bytes", piece_bytes), ("span_bytes", span_bytes)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    import torch

    dtype = header.meta(f.leaf).dtype
    if out is None:
        out = _empty(hi - lo, dtype, header.describe(index))
    elif out.dtype != dtype or out.dim() != 1 or out.numel() != hi - lo:
        raise ValueError(
            f"{header.describe(index)}: out must be a 1-D {dtype} tensor of {hi - lo} elements, "
            f"got {out.dtype} of shape {tuple(out.shape)}"
        )
    if hi == lo:
        return out
    direct = out.device.type == "cpu" and out.is_contiguous() and not out.requires_grad
    target = out if direct else _empty(hi - lo, dtype, header.describe(index))
    dst = target.view(torch.uint8).numpy()
    size = ITEMSIZE[dtype_code(dtype)]
    todo = [ci for ci, c in enumerate(chunks) if c.start_elem < hi and c.stop_elem > lo]
    work = sum(chunks[ci].raw_length for ci in todo)
    n_threads = _threads_for(work, len(todo), threads)
    # Whole raw chunks go straight into ``dst``, in spans of adjacent frames (one per chunk
    # without ``span_bytes``).
    straight = [
        ci
        for ci in todo
        if read_into is not None
        and chunks[ci].codec == RAW
        and lo <= chunks[ci].start_elem
        and chunks[ci].stop_elem <= hi
    ]
    spans = (
        [(ci,) for ci in straight]
        if span_bytes is None
        else spans_of(chunks, straight, n_threads, span_bytes)
    )
    span_at = {span[0]: span for span in spans}
    covered = set(straight)

    def thunks() -> Iterator[Callable[[], None]]:
        for ci in todo:
            c = chunks[ci]
            if ci in covered:
                span = span_at.get(ci)
                if span is not None and read_into is not None:
                    a, b = c.start_elem, chunks[span[-1]].stop_elem
                    part = dst[(a - lo) * size : (b - lo) * size]
                    yield partial(
                        read_raw_span,
                        header,
                        index,
                        span,
                        read_into,
                        part,
                        piece_bytes,
                        _hash_pool() if hash_behind else None,
                    )
                continue
            a, b = max(lo, c.start_elem), min(hi, c.stop_elem)
            part = dst[(a - lo) * size : (b - lo) * size]
            whole = (a, b) == (c.start_elem, c.stop_elem)
            stored = read(c.offset, c.length)
            if whole:
                yield partial(_decode_one, header, index, ci, stored, part)
            else:
                skip = (a - c.start_elem) * size
                yield partial(_decode_partial, header, index, ci, stored, part, skip)

    _run(thunks(), n_threads)
    if not direct:
        with torch.no_grad():
            out.copy_(target)
    return out


def _decode_partial(h: BlobHeader, fi: int, ci: int, stored: Any, part: U8, skip: int) -> None:
    """The bytes ``[skip, skip + len(part))`` of a frame that ``part`` needs only some of: the
    whole frame is checked (its checksum covers all of it); a raw frame is copied from the
    read buffer directly, a compressed one decoded into a temporary first."""
    c = h.fragments[fi].chunks[ci]
    if c.codec != RAW:
        tmp = _bytes(c.raw_length, h.describe(fi, ci))
        _decode_one(h, fi, ci, stored, tmp)
        part[:] = tmp[skip : skip + len(part)]
        return
    where = h.describe(fi, ci)
    mv = as_bytes_view(stored)
    if len(mv) != c.length:
        raise TruncatedError(f"{where}: read {len(mv)} of its {c.length} bytes")
    check(mv, c.checksum, where)
    part[:] = np.frombuffer(mv, np.uint8, len(part), skip)
    if h.meta(h.fragments[fi].fragment.leaf).dtype_name == "bool" and part.max() > 1:
        raise FormatError(f"{where}: a bool byte is neither 0 nor 1")


def decode_shard(
    data: bytes | bytearray | memoryview,
    *,
    threads: int | None = None,
    skeleton: Skeleton | None = None,
) -> Shard:
    """Decode a whole blob into a :class:`~zckpt.Shard` whose tensors own fresh memory.

    Every chunk's checksum is verified; nothing in the result aliases ``data``.

    Args:
        data: the blob (any contiguous buffer: bytes, bytearray, memoryview, mmap).
        threads: decompression threads (None: :func:`decode_threads`).
        skeleton: needed for a version 2 blob (written by saves into large checkpoints), whose
            skeleton is in its checkpoint's manifest:
            ``zckpt.open_checkpoint(path).manifest.skeleton``, checked against the blob's
            digest and leaf columns. A version 1 blob carries its own and ignores it.

    Raises:
        FormatError: not a valid blob (``VersionError``, ``TruncatedError``, ``ChecksumError``
            for the specific cases), naming the tensor, element range and byte offset; a
            version 2 blob without ``skeleton``, or with one it was not written with.
        AllocationError: the blob declares tensors larger than the memory available (each
            tensor is allocated only when its first chunk is about to be decoded).

    Example:
        >>> import torch, zckpt
        >>> from zckpt.format import encode_shard
        >>> s = {"w": torch.arange(6, dtype=torch.bfloat16), "n": [1, None]}
        >>> shard = zckpt.shard_state(s, zckpt.plan_shards(s, zckpt.ZeroSpec(1, 1)), 0)
        >>> back = decode_shard(encode_shard(shard, codec="zstd"))
        >>> back.data[0].tolist(), zckpt.tree.unflatten(back.skeleton, back.data)["n"]
        ([0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [1, None])
        >>> v2 = encode_shard(shard, version=2)  # no skeleton inside: pass it
        >>> decode_shard(v2, skeleton=shard.skeleton).data[0].tolist()
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
        >>> decode_shard(v2)
        Traceback (most recent call last):
        ...
        zckpt.errors.FormatError: rank 0: a version 2 blob does not carry its skeleton ...
    """
    mv = as_bytes_view(data)
    h = decode_header(mv, blob_size=len(mv), skeleton=skeleton)
    skel = h.skeleton
    if skel is None:
        raise FormatError(
            f"rank {h.rank}: a version {h.version} blob does not carry its skeleton (the state's "
            "containers, values and tensor paths): it is in its checkpoint's manifest. Load it "
            "through the checkpoint (zckpt.load_checkpoint, zckpt.open_checkpoint), or pass "
            "decode_shard(data, skeleton=zckpt.open_checkpoint(path).manifest.skeleton); the "
            f"blob's skeleton digest ({h.digest or 0:#018x}) is checked against it"
        )
    tensors: list[torch.Tensor] = []

    def thunks() -> Iterator[Callable[[], None]]:
        # Each tensor is allocated when its first chunk is queued (at most 2 x threads chunks
        # ahead of the decoding), so a bad chunk stops the allocations that would follow it.
        for fi, (f, chunks) in enumerate(h.fragments):
            import torch  # here: a blob without tensors (a plain client state) needs none

            dtype = h.meta(f.leaf).dtype
            t = _empty(f.numel, dtype, h.describe(fi))
            tensors.append(t)
            dst = t.view(torch.uint8).numpy()
            size = ITEMSIZE[dtype_code(dtype)]
            for ci, c in enumerate(chunks):
                part = dst[c.start_elem * size : c.stop_elem * size]
                stored = mv[c.offset : c.offset + c.length]
                yield partial(_decode_one, h, fi, ci, stored, part)

    n_chunks = sum(len(e.chunks) for e in h.fragments)
    _run(thunks(), _threads_for(h.size, n_chunks, threads))
    frags = tuple(e.fragment for e in h.fragments)
    return Shard(h.rank, h.spec, skel, frags, tuple(tensors))


def iter_problems(data: bytes | bytearray | memoryview) -> Iterator[ZckptError]:
    """Every problem in a blob, in file order: header first (a bad header ends the list), then
    each damaged frame and any non-zero padding. A version 2 blob is checked alone, from its
    own leaf columns (that it fits its manifest is what a checkpoint reader checks).

    Example:
        >>> import torch, zckpt
        >>> from zckpt.format import encode_shard
        >>> s = {"w": torch.ones(64)}
        >>> shard = zckpt.shard_state(s, zckpt.plan_shards(s, zckpt.ZeroSpec(1, 1)), 0)
        >>> blob = bytearray(encode_shard(shard, chunk_bytes=64))
        >>> blob[-1] ^= 1
        >>> blob[-100] ^= 1
        >>> [type(p).__name__ for p in iter_problems(blob)]
        ['ChecksumError', 'ChecksumError']
    """
    mv = as_bytes_view(data)
    try:
        h = decode_header(mv, blob_size=len(mv))
    except ZckptError as e:
        yield e
        return
    frames = sorted(
        (c.offset, c.length, fi, ci)
        for fi, e in enumerate(h.fragments)
        for ci, c in enumerate(e.chunks)
    )
    biggest = max((c.raw_length for e in h.fragments for c in e.chunks), default=0)
    scratch = _scratch(biggest, f"rank {h.rank}: the largest chunk")
    pos = h.index_size
    for off, n, fi, ci in [*frames, (h.size, 0, -1, -1)]:
        if _NOT_ZERO.search(mv[pos:off]):
            yield FormatError(f"rank {h.rank}: non-zero padding in bytes [{pos}, {off})")
        if fi >= 0:
            try:
                raw = h.fragments[fi].chunks[ci].raw_length
                _decode_one(h, fi, ci, mv[off : off + n], scratch[:raw], check_only=True)
            except ZckptError as e:
                yield e
        pos = off + n


def verify_blob(data: bytes | bytearray | memoryview) -> None:
    """Check a whole blob: header, every frame's checksum and decoding, sizes, padding.

    Raises:
        FormatError: the first problem :func:`iter_problems` finds.

    Example:
        >>> import torch, zckpt
        >>> from zckpt.format import encode_shard
        >>> s = {"w": torch.ones(4)}
        >>> blob = encode_shard(zckpt.shard_state(s, zckpt.plan_shards(s, zckpt.ZeroSpec(1, 1)), 0))
        >>> verify_blob(blob)
        >>> verify_blob(blob[:-1])
        Traceback (most recent call last):
        ...
        zckpt.errors.TruncatedError: rank 0: blob is ... bytes but its index declares ...
    """
    for problem in iter_problems(data):
        raise problem
