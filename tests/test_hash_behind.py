"""Hashing behind a disk reader (``decode_fragment(hash_behind=True)``) decides as inline does.

A cold local load reads each span with one thread, in file order; with a core to spare its
bytes are hashed on the hash thread, behind the reads. Whatever the chunk sizes, span sizes,
short reads, damaged bytes or a file cut short, the outcome must be the inline checks' own:
the same bytes in ``out``, or the same error (type and message: the first damaged chunk in
file order, before a later truncation), and the hash thread done before the call returns.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import zckpt
from zckpt.errors import ZckptError
from zckpt.format import _span as span_module
from zckpt.format import decode_fragment, decode_header, encode_shard


class Reads:
    """``read``/``read_into`` over a blob; ``read_into`` gives at most ``most`` bytes a call."""

    def __init__(self, blob: bytes, most: int | None) -> None:
        self.blob, self.most = blob, most

    def read(self, offset: int, length: int) -> bytes:
        return self.blob[offset : offset + length]

    def read_into(self, offset: int, out: memoryview) -> int:
        n = out.nbytes if self.most is None else min(self.most, out.nbytes)
        data = self.blob[offset : offset + n]
        out[: len(data)] = data
        return len(data)


def _outcome(blob: bytes, most: int | None, behind: bool, **kw: Any) -> tuple[str, Any]:
    h = decode_header(blob)
    f = h.fragments[0].fragment
    r = Reads(blob, most)
    out = torch.full((f.numel,), float("nan"))
    try:
        decode_fragment(
            h, 0, r.read, out=out, read_into=r.read_into, threads=1, hash_behind=behind, **kw
        )
    except ZckptError as e:
        return type(e).__name__, str(e)
    return "ok", out.view(torch.uint8).tolist()


@pytest.fixture(autouse=True)
def _small_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(span_module, "BEHIND_STEP", 96)  # hand over often: many hash tasks a span


@settings(
    max_examples=int(os.environ.get("ZCKPT_BEHIND_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    n=st.integers(1, 700),
    chunk=st.sampled_from([16, 64, 100, 256]),
    most=st.one_of(st.none(), st.integers(1, 300)),
    piece=st.one_of(st.none(), st.integers(1, 200)),
    span=st.sampled_from([None, 64, 1000, 1 << 20]),
    flips=st.lists(st.integers(0, 10**6), max_size=3),
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
)
@example(n=256, chunk=64, most=None, piece=None, span=1 << 20, flips=[130], cut=700)
def test_hashing_behind_decides_as_inline(
    n: int,
    chunk: int,
    most: int | None,
    piece: int | None,
    span: int | None,
    flips: list[int],
    cut: int | None,
) -> None:
    s = {"w": torch.arange(float(n))}
    shard = zckpt.shard_state(s, zckpt.plan_shards(s, zckpt.ZeroSpec(1, 1)), 0)
    blob = bytearray(encode_shard(shard, codec="raw", chunk_bytes=chunk))
    h = decode_header(bytes(blob))
    chunks = h.fragments[0].chunks
    lo, hi = chunks[0].offset, chunks[-1].offset + chunks[-1].length
    for x in flips:  # damage inside the chunks' bytes
        blob[lo + x % (hi - lo)] ^= 0x20
    data = bytes(blob) if cut is None else bytes(blob[: lo + cut % (hi - lo)])
    kw: dict[str, Any] = dict(piece_bytes=piece, span_bytes=span)
    if piece is None and most is not None:
        kw["piece_bytes"] = 1  # short reads need piece_bytes (whole-chunk readers give all)
    inline = _outcome(data, most, False, **kw)
    assert _outcome(data, most, True, **kw) == inline
    if not flips and cut is None:
        assert inline[0] == "ok"


def test_the_first_damaged_chunk_comes_before_a_later_cut() -> None:
    s = {"w": torch.arange(256.0)}
    shard = zckpt.shard_state(s, zckpt.plan_shards(s, zckpt.ZeroSpec(1, 1)), 0)
    blob = bytearray(encode_shard(shard, codec="raw", chunk_bytes=64))
    chunks = decode_header(bytes(blob)).fragments[0].chunks
    blob[chunks[2].offset + 5] ^= 1
    data = bytes(blob[: chunks[9].offset + 10])
    kind, text = _outcome(data, 50, True, piece_bytes=16, span_bytes=1 << 20)
    assert kind == "ChecksumError" and f"offset {chunks[2].offset}" in text


@pytest.mark.parametrize("behind", [False, True])
def test_a_bool_byte_that_is_neither_0_nor_1_is_refused_hashed_behind_too(behind: bool) -> None:
    """The bool check runs after the hashes, inline or behind (found in review: the hashing
    behind returned before it, so a forged bool byte with a matching checksum loaded)."""
    import xxhash
    from test_format import _chunk, base_blob, reseal

    from zckpt.errors import FormatError

    blob = base_blob("raw")
    flag = decode_header(blob).fragments[1].chunks[0]
    forged = bytearray(blob)
    forged[flag.offset : flag.offset + 5] = b"\x02\x01\x01\x01\x01"
    digest = xxhash.xxh3_64_intdigest(b"\x02\x01\x01\x01\x01")
    sealed = reseal(bytes(forged), lambda o: _chunk(o, 1).update(x=digest))
    h = decode_header(sealed)
    r = Reads(sealed, None)
    with pytest.raises(FormatError, match="bool byte"):
        decode_fragment(
            h, 1, r.read, read_into=r.read_into, span_bytes=1 << 20, threads=1, hash_behind=behind
        )
