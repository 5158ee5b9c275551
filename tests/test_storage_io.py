"""LocalStorage's I/O: the whole-file hash of a blob is computed in the write pass."""

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
from zckpt.store import _storage, _write


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
    real_piece = _write._HASH_PIECE
    try:
        _storage.os.writev = writev  # type: ignore[assignment]
        _write._HASH_PIECE = piece
        views = _write.views(buffers)
        total = _write._writev_all(fd, views, window, hasher=hasher)  # type: ignore[arg-type]
    finally:
        _storage.os.writev = real_writev  # type: ignore[assignment]
        _write._HASH_PIECE = real_piece
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
