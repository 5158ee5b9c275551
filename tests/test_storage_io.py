"""LocalStorage's I/O: the whole-file hash computed in the write pass, sequential read-ahead."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import xxhash
from hypothesis import example, given
from hypothesis import strategies as st

import zckpt
from zckpt.store import _storage


class Recorder:
    """A hasher that logs what it is fed, beside a real xxh3, into a shared event log."""

    def __init__(self, log: list[tuple[str, bytes]]) -> None:
        self.log, self.real = log, xxhash.xxh3_64()

    def update(self, data: memoryview) -> None:
        self.log.append(("hash", bytes(data)))
        self.real.update(data)


@given(
    sizes=st.lists(st.integers(0, 3000), max_size=10),
    window=st.integers(1, 4000),
    piece=st.integers(1, 700),
    short=st.lists(st.integers(1, 300), max_size=6),
)
@example(sizes=[2000], window=4000, piece=512, short=[])
def test_each_piece_is_hashed_just_before_it_is_written(
    tmp_path_factory: pytest.TempPathFactory,
    sizes: list[int],
    window: int,
    piece: int,
    short: list[int],
) -> None:
    """With a hasher, every ``writev`` writes exactly the bytes hashed since the previous one
    (at most one hash piece, so they are still in the cache), short writes included; the bytes
    hashed are the file's, in order."""
    data = bytes(range(256)) * 12
    buffers = [memoryview(data[:n]) for n in sizes]
    log: list[tuple[str, bytes]] = []
    caps = iter(short)
    real_writev = os.writev

    def writev(fd: int, bufs: Sequence[memoryview]) -> int:
        joined = b"".join(bytes(b) for b in bufs)
        cap = next(caps, None)  # the kernel may write less than asked
        n = real_writev(fd, bufs) if cap is None else os.write(fd, joined[:cap])
        log.append(("write", joined[:n]))
        return n

    path = tmp_path_factory.mktemp("h") / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    hasher = Recorder(log)
    real_piece = _storage._HASH_PIECE
    try:
        _storage.os.writev = writev  # type: ignore[assignment]
        _storage._HASH_PIECE = piece
        views = _storage._views(buffers)
        total = _storage._writev_all(fd, views, window, hasher=hasher)  # type: ignore[arg-type]
    finally:
        _storage.os.writev = real_writev  # type: ignore[assignment]
        _storage._HASH_PIECE = real_piece
        os.close(fd)
    want = b"".join(bytes(b) for b in buffers)
    assert total == len(want) and path.read_bytes() == want
    assert hasher.real.intdigest() == xxhash.xxh3_64_intdigest(want)
    # Group the log into (hashed, written) rounds: each round's writes are its hashed bytes.
    hashed, written = b"", b""
    for kind, b in log:
        if kind == "hash" and written:
            assert written == hashed and len(hashed) <= min(piece, window)
            hashed, written = b"", b""
        if kind == "hash":
            hashed += b
        else:
            written += b
    assert written == hashed and len(hashed) <= min(piece, window)


def test_raw_save_hashes_in_the_writing_thread(tmp_path: Path) -> None:
    """A raw-codec save computes the manifest's whole-file hash without a second thread going
    over the tensors' memory while they are written (it slowed the write on a busy machine)."""
    started: list[str] = []
    real_start = threading.Thread.start

    def start(self: threading.Thread) -> None:
        started.append(self.name)
        real_start(self)

    state = {"w": torch.randn(300_000), "b": torch.arange(1000.0)}
    threading.Thread.start = start  # type: ignore[method-assign]
    try:
        zckpt.save_checkpoint(tmp_path, state, zckpt.ZeroSpec(1, 2), tag="t")
    finally:
        threading.Thread.start = real_start  # type: ignore[method-assign]
    assert "zckpt-io" not in started
    ck = zckpt.open_checkpoint(tmp_path)
    (rec,) = ck.manifest.files
    data = (tmp_path / "t" / rec.name).read_bytes()
    assert xxhash.xxh3_64_intdigest(data) == rec.xxh3 and len(data) == rec.size
    got = zckpt.load_checkpoint(tmp_path).state
    assert all(torch.equal(got[k], v) for k, v in state.items())


reads = st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 800)), max_size=25)


@given(reads=reads, ahead=st.integers(0, 3000))
@example(reads=[(0, 10), (10, 10), (20, 10)], ahead=100)
@example(reads=[(1, 0), (0, 1)], ahead=0)  # a step back before anything was hinted
def test_read_ahead_hints_at_least_what_is_asked(reads: list[tuple[int, int]], ahead: int) -> None:
    """Whatever the access pattern, each read's bytes are hinted by now (by this hint or an
    earlier one since the file's last jump); a hint never reaches more than ``ahead`` past the
    read that made it."""
    plan = _storage._ReadAhead(ahead=ahead)
    hinted: list[tuple[int, int]] = []
    for offset, length in reads:
        start, stop = plan.plan("f", offset, length)
        assert stop <= offset + length + ahead
        if stop > start:
            hinted.append((start, stop))
        covered = sorted(hinted)
        pos = offset  # [offset, offset + length) lies within the union of hinted ranges
        for a, b in covered:
            if a <= pos < b:
                pos = b
        assert pos >= offset + length or length == 0


@given(sizes=st.lists(st.integers(0, 400), min_size=1, max_size=30), ahead=st.integers(1, 1000))
def test_a_sequential_walk_hints_each_byte_once_and_ahead(sizes: list[int], ahead: int) -> None:
    """Reading a file front to back, fragment after fragment: the hints tile the file without
    overlap, each new hint (after the first) reaching ``ahead`` bytes past its fragment."""
    plan = _storage._ReadAhead(ahead=ahead)
    pos, reached = 0, 0
    for i, n in enumerate(sizes):
        start, stop = plan.plan("f", pos, n)
        if i == 0:
            assert (start, stop) == (0, n)
        else:
            assert stop == pos + n + ahead
            assert start == max(pos, reached)
        if stop > start:
            assert start >= reached  # never hinted twice
            reached = stop
        pos += n


def test_will_need_reads_ahead_of_a_sequential_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A raw-codec load walks its blob in file order: after the first fragment, each hint to
    the kernel reaches past the fragment being read, so the disk is never left without work
    between fragments."""
    state = {f"t{i}": torch.randn(50_000) for i in range(4)}
    zckpt.save_checkpoint(tmp_path, state, zckpt.ZeroSpec(1, 2), tag="t", chunk_bytes=64 << 10)
    advised: list[tuple[int, int]] = []
    real = os.posix_fadvise

    def fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_WILLNEED:
            advised.append((offset, offset + length))
        real(fd, offset, length, advice)

    monkeypatch.setattr(_storage.os, "posix_fadvise", fadvise)
    monkeypatch.setattr(_storage, "_READS", _storage._ReadAhead(ahead=1 << 20))
    got = zckpt.load_checkpoint(tmp_path).state
    assert all(torch.equal(got[k], v) for k, v in state.items())
    ck = zckpt.open_checkpoint(tmp_path)
    (rec,) = ck.manifest.files
    frags = sorted(
        (c[0].offset, c[-1].offset + c[-1].length)
        for c in (f.chunks for f in ck.header(rec).fragments)
    )
    assert len(advised) >= 2
    assert advised[0] == frags[0]  # the first hint: as asked
    assert advised[1][1] > frags[1][1]  # then ahead of the fragment being read
    for (_, b), (c, _) in zip(advised, advised[1:], strict=False):
        assert c >= b  # no byte hinted twice
