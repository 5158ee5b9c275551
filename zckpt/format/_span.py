"""Reading raw frames straight into their destination: spans of adjacent chunks read by one
thread, each frame checked against its checksum as its bytes arrive, inline or behind the
reads on the hash thread (``docs/architecture.md``, "One tensor", step 6)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import xxhash

from zckpt.errors import ChecksumError, FormatError, TruncatedError
from zckpt.format._header import BlobHeader, as_bytes_view

if TYPE_CHECKING:
    from collections.abc import Callable
    from concurrent.futures import Future, ThreadPoolExecutor

    import numpy as np
    import numpy.typing as npt

    U8 = npt.NDArray[np.uint8]
    ReadInto = Callable[[int, memoryview], int]

__all__ = ["BEHIND_STEP", "read_raw_span", "spans_of"]


class _Frames:
    """The checks of a span's frames, fed the span's bytes in order as they arrive: each
    frame's digest is compared once its last byte is in; the first mismatch is kept."""

    def __init__(self, h: BlobHeader, fi: int, span: tuple[int, ...], view: memoryview) -> None:
        self.h, self.fi, self.span, self.view = h, fi, span, view
        self.frames = h.fragments[fi].chunks
        self.k, self.frame_end = 0, self.frames[span[0]].length
        self.hasher = xxhash.xxh3_64()
        self.error: ChecksumError | None = None

    def feed(self, pos: int, end: int, step: int) -> None:
        """Hash bytes ``[pos, end)`` of the span (the next ones), ``step`` at a time."""
        while pos < end and self.error is None:
            stop = min(end, pos + step, self.frame_end)
            self.hasher.update(self.view[pos:stop])
            pos = stop
            if pos == self.frame_end:
                c = self.frames[self.span[self.k]]
                digest = self.hasher.intdigest()
                if digest != c.checksum:
                    self.error = ChecksumError(
                        f"{self.h.describe(self.fi, self.span[self.k])}: checksum mismatch "
                        f"(stored {c.checksum:#018x}, computed {digest:#018x})"
                    )
                    return
                self.hasher.reset()
                self.k += 1
                if self.k < len(self.span):
                    self.frame_end += self.frames[self.span[self.k]].length


def read_raw_span(
    h: BlobHeader,
    fi: int,
    span: tuple[int, ...],
    read_into: ReadInto,
    dst: U8,
    piece: int | None = None,
    pool: ThreadPoolExecutor | None = None,
) -> None:
    """Raw frames ``span`` (adjacent in the file and in ``dst``) read straight into their
    destination bytes, and each checked there against its own checksum.

    ``read_into`` is asked for the whole span at once: a local file not in the page cache is
    then read in one request larger than the kernel's read-ahead window, which the kernel
    serves with large folios and large disk requests and keeps reading ahead of (a frame at a
    time, 8 MiB, is read as a "random" read of small pages: docs/benchmarks.md, issue 14 part
    1, fourth session). With ``piece``, ``read_into`` may return fewer bytes than asked (what
    the page cache holds) and is called again for the rest; the bytes of each call are hashed
    right after it, by the same thread, ``piece`` at a time, while they are still in the
    core's cache. With ``pool`` (the process's one hash thread), they are hashed there
    instead, behind the reads (about every :data:`BEHIND_STEP` bytes handed over at once),
    which is waited for before this returns or raises. Each frame's digest is compared as
    soon as its last byte is in, and a mismatch before the place a read failed is raised
    first: every byte is checked before this returns.

    Example:
        >>> import numpy as np, torch, zckpt
        >>> from zckpt.format import decode_header, encode_shard
        >>> s = {"w": torch.arange(8.0)}
        >>> shard = zckpt.shard_state(s, zckpt.plan_shards(s, zckpt.ZeroSpec(1, 3)), 0)
        >>> blob = encode_shard(shard, codec="raw")
        >>> h = decode_header(blob)
        >>> def read_into(offset, out):
        ...     out[:] = blob[offset : offset + len(out)]
        ...     return len(out)
        >>> dst = np.zeros(32, np.uint8)
        >>> read_raw_span(h, 0, (0,), read_into, dst)  # one frame: the whole tensor
        >>> dst.view(np.float32).tolist()
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    """
    frames = h.fragments[fi].chunks
    view = as_bytes_view(dst)
    total = view.nbytes
    base = frames[span[0]].offset
    checks = _Frames(h, fi, span, view)
    step = BEHIND_STEP if pool is not None else total if piece is None else piece
    last: Future[None] | None = None
    pos = handed = 0  # bytes read; bytes handed to the checks
    failure: BaseException | None = None
    try:
        while pos < total and checks.error is None:
            got = read_into(base + pos, view[pos:])
            if got <= 0 or (piece is None and got != total - pos):
                at = pos + max(got, 0)
                end, k = frames[span[0]].length, 0
                while k < len(span) - 1 and at >= end:  # the frame the file ends in
                    k += 1
                    end += frames[span[k]].length
                c = frames[span[k]]
                raise TruncatedError(
                    f"{h.describe(fi, span[k])}: read {at - (end - c.length)} of its "
                    f"{c.length} bytes"
                )
            pos += got
            if pool is None:
                checks.feed(handed, pos, step)
                handed = pos
            elif pos - handed >= step or pos == total:
                last = pool.submit(checks.feed, handed, pos, step)
                handed = pos
    except BaseException as e:
        failure = e
    if last is not None:
        last.result()  # the hash thread reads the caller's memory: done before returning
    if failure is not None and handed < pos:
        checks.feed(handed, pos, step)  # the bytes read before the failure, checked
    if checks.error is not None:
        raise checks.error from None
    if failure is not None:
        raise failure
    if h.meta(h.fragments[fi].fragment.leaf).dtype_name == "bool":
        at = 0
        for ci in span:
            n = frames[ci].length
            if dst[at : at + n].max(initial=0) > 1:
                raise FormatError(f"{h.describe(fi, ci)}: a bool byte is neither 0 nor 1")
            at += n


# Bytes hashed at a time behind the reads (the bytes are in memory by then, not the cache).
BEHIND_STEP = 4 << 20


def spans_of(chunks: Any, direct: list[int], threads: int, most: int) -> list[tuple[int, ...]]:
    """``direct`` (indices of whole raw chunks, increasing) grouped into spans of consecutive
    chunks whose frames are adjacent in the file (so also in the tensor): each run of them is
    cut, in whole frames, into about ``threads`` spans of about equal size (one for each
    thread to read), none past ``most`` bytes unless one frame is.

    Example:
        >>> from types import SimpleNamespace as C
        >>> cs = [C(offset=o, length=10) for o in (0, 10, 20, 30, 50, 60)]
        >>> spans_of(cs, [0, 1, 2, 3, 4, 5], 2, 100)
        [(0, 1), (2, 3), (4,), (5,)]
        >>> spans_of(cs, [0, 1, 2, 3, 4, 5], 1, 20)
        [(0, 1), (2, 3), (4, 5)]
    """
    runs: list[list[int]] = []
    for ci in direct:
        prev = runs[-1][-1] if runs else -1
        if prev == ci - 1 >= 0 and chunks[prev].offset + chunks[prev].length == chunks[ci].offset:
            runs[-1].append(ci)
        else:
            runs.append([ci])
    out: list[tuple[int, ...]] = []
    for run in runs:
        size = sum(chunks[ci].length for ci in run)
        target = min(most, -(-size // max(threads, 1)))
        span: list[int] = []
        have = 0
        for ci in run:
            if span and have + chunks[ci].length > most:
                out.append(tuple(span))
                span, have = [], 0
            span.append(ci)
            have += chunks[ci].length
            if have >= target:
                out.append(tuple(span))
                span, have = [], 0
        if span:
            out.append(tuple(span))
    return out
