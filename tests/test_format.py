"""The blob format: round trips, ranged reads, zero-copy parts, layout rules, and errors."""

from __future__ import annotations

import itertools
import math
import struct
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
import xxhash
from hypothesis import given
from hypothesis import strategies as st

import zckpt
from zckpt.assemble import consolidate
from zckpt.errors import (
    ChecksumError,
    FormatError,
    StateError,
    TruncatedError,
    VersionError,
    ZckptError,
)
from zckpt.format import (
    MAGIC,
    PREAMBLE_SIZE,
    decode_fragment,
    decode_header,
    decode_shard,
    encode_shard,
    encode_shard_parts,
    encode_shard_stream,
    iter_problems,
    read_header_size,
    verify_blob,
)
from zckpt.format import _stream as stream_module
from zckpt.format._codecs import BYTEPLANE, RAW, ZSTD
from zckpt.format._dtypes import DTYPE_OF, TABLE
from zckpt.testing import assert_states_equal, specs, states, tensors_bitwise_equal
from zckpt.tree import unflatten

CODECS = ("raw", "zstd", "byteplane")


def shard_of(state: Any, world_size: int = 1, rank: int = 0, stage: int = 1) -> zckpt.Shard:
    plan = zckpt.plan_shards(state, zckpt.ZeroSpec(world_size, stage))
    return zckpt.shard_state(state, plan, rank)


def assert_shards_equal(a: zckpt.Shard, b: zckpt.Shard) -> None:
    assert (a.rank, a.spec, a.fragments) == (b.rank, b.spec, b.fragments)
    assert a.skeleton.tensors == b.skeleton.tensors
    assert a.skeleton.paths == b.skeleton.paths
    marks = [torch.tensor(i) for i in range(len(a.skeleton.tensors))]
    assert_states_equal(unflatten(a.skeleton, marks), unflatten(b.skeleton, marks))
    for x, y in zip(a.data, b.data, strict=True):
        assert tensors_bitwise_equal(x, y)


def random_tensor(dtype: torch.dtype, n: int, seed: int = 0) -> torch.Tensor:
    """Arbitrary bit patterns of any dtype (bools are 0/1)."""
    g = np.random.default_rng(seed)
    size = torch.empty((), dtype=dtype).element_size()
    raw = g.integers(0, 256, n * size, dtype=np.uint8)
    if dtype == torch.bool:
        raw &= 1
    return torch.from_numpy(raw).view(dtype).clone()


def weights(n: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 0.02).to(dtype)


# ------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("code_name", [(c, n) for c, n, _, _ in TABLE if hasattr(torch, n)])
def test_every_dtype_round_trips_bitwise(codec: str, code_name: tuple[int, str]) -> None:
    dtype = DTYPE_OF[code_name[0]]
    with warnings.catch_warnings():  # torch warns that complex32 is experimental
        warnings.simplefilter("ignore", UserWarning)
        t = random_tensor(dtype, 301, seed=code_name[0])
        state = {"t": t, "scalar": t[:1].reshape(()).clone(), "empty": t[:0].reshape(0, 3)}
        shard = shard_of(state)
        back = decode_shard(encode_shard(shard, codec=codec, chunk_bytes=100))
    assert_shards_equal(back, shard)
    assert [m.shape for m in back.skeleton.tensors] == [(301,), (), (0, 3)]
    assert len(back.fragments) == 2  # the empty tensor has no fragment


@given(state=states(), spec=specs(), codec=st.sampled_from(CODECS), chunk=st.integers(1, 40))
def test_encode_decode_consolidate_is_identity(
    state: Any, spec: zckpt.ZeroSpec, codec: str, chunk: int
) -> None:
    plan = zckpt.plan_shards(state, spec)
    shards = [zckpt.shard_state(state, plan, r) for r in range(spec.world_size)]
    back = [decode_shard(encode_shard(s, codec=codec, chunk_bytes=chunk)) for s in shards]
    for a, b in zip(back, shards, strict=True):
        assert_shards_equal(a, b)
    assert_states_equal(consolidate(back), state)


@given(
    state=states(),
    spec=specs(),
    codec=st.sampled_from(CODECS),
    chunk=st.integers(1, 40),
    threads=st.sampled_from([1, 3]),
    extra=st.dictionaries(st.text(max_size=3), st.integers(-(2**63), 2**64 - 1), max_size=2),
)
def test_streamed_blobs_decode_like_whole_ones(
    state: Any, spec: zckpt.ZeroSpec, codec: str, chunk: int, threads: int, extra: Any
) -> None:
    """Frames first, head last into the room reserved for it: a valid blob whose index differs
    from encode_shard's only in the frame offsets (more padding before the first frame)."""
    plan = zckpt.plan_shards(state, spec)
    for r in range(spec.world_size):
        shard = zckpt.shard_state(state, plan, r)
        stream = encode_shard_stream(
            shard, codec=codec, chunk_bytes=chunk, threads=threads, extra=extra
        )
        body = b"".join(stream.frames())
        head = stream.head()
        blob = head + body
        assert len(head) == stream.data_offset and len(blob) == stream.size
        assert list(iter_problems(blob)) == []
        whole = encode_shard(shard, codec=codec, chunk_bytes=chunk, extra=extra)
        assert_shards_equal(decode_shard(blob), decode_shard(whole))
        hs, hw = decode_header(blob), decode_header(whole)
        assert hs.extra == hw.extra
        for es, ew in zip(hs.fragments, hw.fragments, strict=True):
            for cs, cw in zip(es.chunks, ew.chunks, strict=True):  # the same frames, moved
                assert cs._replace(offset=0) == cw._replace(offset=0)
                assert (
                    blob[cs.offset : cs.offset + cs.length]
                    == whole[cw.offset : cw.offset + cw.length]
                )


def test_stream_encodes_a_bounded_number_of_frames_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    shard = shard_of({"w": weights(1 << 18)})  # 1 MiB: enough work for the thread pool
    encoded = {"n": 0}
    real = stream_module._encode

    def counting(*args: Any) -> Any:
        encoded["n"] += 1
        return real(*args)

    monkeypatch.setattr(stream_module, "_encode", counting)
    stream = encode_shard_stream(shard, codec="byteplane", chunk_bytes=16 << 10, threads=2)
    frames = 0
    for piece in stream.frames():
        frames += isinstance(piece, bytes) or len(piece) > 64  # pieces, not padding
        assert encoded["n"] <= frames + 2 * 2 + 1
        time.sleep(0.001)  # a slow writer: an unbounded pool would run far ahead of it
    assert encoded["n"] == 64
    with pytest.raises(zckpt.ZckptError, match="once"):
        next(iter(stream.frames()))
    fresh = encode_shard_stream(shard, codec="zstd", chunk_bytes=16 << 10)
    with pytest.raises(zckpt.ZckptError, match="not all been produced"):
        fresh.head()


def test_many_chunks_and_their_layout() -> None:
    shard = shard_of({"w": weights(1000), "b": weights(37, torch.bfloat16)})
    for codec in CODECS:
        blob = encode_shard(shard, codec=codec, chunk_bytes=256)
        h = decode_header(blob, blob_size=len(blob))
        assert [len(e.chunks) for e in h.fragments] == [16, 1]
        frames = sorted(c for e in h.fragments for c in e.chunks for c in [(c.offset, c.length)])
        assert frames[0][0] == h.data_offset == -(-h.index_size // 64) * 64
        for (o1, n1), (o2, _) in itertools.pairwise(frames):
            assert o2 == -(-(o1 + n1) // 64) * 64  # each frame at the next 64-byte boundary
        assert h.size == len(blob) == frames[-1][0] + frames[-1][1]
        assert_shards_equal(decode_shard(blob), shard)


def test_special_floats_bitwise() -> None:
    f32 = [0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7FA00001, 0xFFC12345,
           0x00000001, 0x807FFFFF, 0x7F7FFFFF, 0x00800000]  # fmt: skip
    h16 = [0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0x7D01, 0xFE55, 0x0001, 0x83FF, 0x7F80, 0xFF81]
    state = {
        "f32": torch.tensor(f32 * 50, dtype=torch.int64).to(torch.int32).view(torch.float32),
        "bf16": torch.tensor(h16 * 50, dtype=torch.int32).to(torch.int16).view(torch.bfloat16),
        "f16": torch.tensor(h16 * 50, dtype=torch.int32).to(torch.int16).view(torch.float16),
        "f64": torch.tensor([-0.0, math.inf, -math.inf, 5e-324, math.nan] * 40),
        "value": -0.0,
    }
    shard = shard_of(state)
    for codec in CODECS:
        back = decode_shard(encode_shard(shard, codec=codec, chunk_bytes=64))
        assert_shards_equal(back, shard)
        assert_states_equal(consolidate([back]), state)


def test_nested_state_values_ties_and_extra() -> None:
    w = torch.arange(6.0)
    state = {
        "a": w,
        "b": w,  # tied: stored once when the tree sees the alias
        "n": [1, None, True, 2.5, "s", b"\x00\xff", 2**64 - 1, -(2**63)],
        7: (torch.tensor(3), {"deep": [[[torch.zeros(2, 0)]]]}),
    }
    shard = shard_of(state)
    blob = encode_shard(shard, extra={"tag": "x", "n": [1, 2], "m": {"k": b"v"}})
    back = decode_shard(blob)
    assert_shards_equal(back, shard)
    assert_states_equal(consolidate([back]), state)
    assert decode_header(blob).extra == {"tag": "x", "n": [1, 2], "m": {"k": b"v"}}


def test_shard_without_fragments() -> None:
    state = {"empty": torch.zeros(0, 5), "n": [1, "two"]}
    shard = shard_of(state)
    assert shard.fragments == ()
    blob = encode_shard(shard, codec="byteplane")
    h = decode_header(blob, blob_size=len(blob))
    assert h.size == len(blob) == h.data_offset
    verify_blob(blob)
    assert_states_equal(consolidate([decode_shard(blob)]), state)


def test_decoded_tensors_own_their_memory() -> None:
    blob = bytearray(encode_shard(shard_of({"w": torch.arange(64.0)})))
    back = decode_shard(blob)
    lo = np.frombuffer(blob, np.uint8).ctypes.data
    assert not lo <= back.data[0].data_ptr() < lo + len(blob)
    blob[-4:] = b"\xff\xff\xff\xff"
    assert back.data[0][-1].item() == 63.0


def test_decode_accepts_any_buffer() -> None:
    blob = encode_shard(shard_of({"w": torch.arange(10.0)}), codec="zstd")
    for buf in (blob, bytearray(blob), memoryview(blob), np.frombuffer(blob, np.uint8)):
        assert decode_shard(buf).data[0].tolist() == list(map(float, range(10)))
    with pytest.raises(TypeError):
        decode_shard("not bytes")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- codecs


def test_byteplane_compresses_exponent_plane_only() -> None:
    for dtype, ratio in ((torch.float32, 1.15), (torch.bfloat16, 1.4)):
        shard = shard_of({"w": weights(1 << 17, dtype)})
        blob = encode_shard(shard, codec="byteplane", chunk_bytes=1 << 20)
        (entry,) = decode_header(blob).fragments
        for c in entry.chunks:
            assert c.codec == BYTEPLANE
            assert [p[0] for p in c.planes][-1] == ZSTD
            assert all(p[0] == RAW for p in c.planes[:-1])
        assert shard.nbytes / len(blob) > ratio


def test_byteplane_on_ints_and_bytes_falls_back_to_zstd() -> None:
    shard = shard_of({"i": torch.arange(4096) % 7, "u": torch.zeros(4096, dtype=torch.uint8)})
    h = decode_header(encode_shard(shard, codec="byteplane"))
    assert [c.codec for e in h.fragments for c in e.chunks] == [ZSTD, ZSTD]


@pytest.mark.parametrize("codec", CODECS)
def test_frames_are_never_larger_than_raw(codec: str) -> None:
    state = {"f": random_tensor(torch.float32, 5000), "b": random_tensor(torch.bfloat16, 999)}
    state["u"] = random_tensor(torch.uint8, 3000)
    shard = shard_of(state)
    blob = encode_shard(shard, codec=codec, chunk_bytes=1000)
    h = decode_header(blob)
    for e in h.fragments:
        for c in e.chunks:
            assert c.length <= c.raw_length
            assert c.codec == RAW  # random bytes never pay
    assert len(blob) <= shard.nbytes + h.index_size + 64 * sum(len(e.chunks) for e in h.fragments)


def test_bad_arguments() -> None:
    shard = shard_of({"w": torch.ones(3)})
    for kw in (
        {"codec": "lz4"},
        {"level": 20},
        {"level": 1.5},
        {"chunk_bytes": 0},
        {"threads": 0},
    ):
        with pytest.raises(ValueError, match=r"codec|level|chunk_bytes|threads"):
            encode_shard(shard, **kw)
    with pytest.raises(StateError, match="extra"):
        encode_shard(shard, extra={"x": object()})
    with pytest.raises(StateError, match="extra"):
        encode_shard(shard, extra={1: 2})  # type: ignore[dict-item]


def test_too_deep_state_is_refused_at_encode() -> None:
    state: Any = torch.ones(1)
    for _ in range(130):
        state = [state]
    with pytest.raises(StateError, match="deeper than 128"):
        encode_shard(shard_of(state))


# ------------------------------------------------------------------------------- parts


def test_parts_join_to_the_blob_and_raw_frames_are_zero_copy() -> None:
    w = torch.arange(4096, dtype=torch.float32)
    shard = shard_of({"w": w, "step": torch.tensor(5)})
    parts = encode_shard_parts(shard, chunk_bytes=4096)
    assert b"".join(parts.buffers) == encode_shard(shard, chunk_bytes=4096)
    assert parts.nbytes == sum(len(b) for b in parts.buffers) == parts.header.size
    addresses = {np.frombuffer(b, np.uint8).ctypes.data for b in parts.buffers if len(b) >= 4096}
    assert addresses == {w.data_ptr() + k * 4096 for k in range(4)}


def test_output_is_deterministic() -> None:
    # Over 1 MiB, so that the threaded path runs.
    shard = shard_of({"w": weights(300_000), "v": weights(70_000, torch.bfloat16) ** 2})
    for codec in CODECS:
        one = encode_shard(shard, codec=codec, chunk_bytes=65536, threads=1)
        assert one == encode_shard(shard, codec=codec, chunk_bytes=65536, threads=4)
        assert one == encode_shard(shard, codec=codec, chunk_bytes=65536)
        assert decode_shard(one, threads=4).data[0].equal(shard.data[0])


def test_non_contiguous_and_grad_tensors() -> None:
    base = torch.arange(20.0, requires_grad=True)
    shard = zckpt.Shard(
        0,
        zckpt.ZeroSpec(1, 1),
        zckpt.tree.flatten({"w": torch.zeros(10)})[0],
        (zckpt.Fragment(0, 0, 10),),
        (base[::2],),
    )
    back = decode_shard(encode_shard(shard))
    assert back.data[0].tolist() == [float(i) for i in range(0, 20, 2)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_copied_to_cpu() -> None:
    w = weights(10000).cuda()
    shard = shard_of({"w": w})
    back = decode_shard(encode_shard(shard, codec="byteplane"))
    assert torch.equal(back.data[0], w.cpu())
    h = decode_header(encode_shard(shard))
    out = torch.empty(10000, device="cuda")
    blob = encode_shard(shard)
    decode_fragment(h, 0, lambda o, n: blob[o : o + n], out=out)
    assert torch.equal(out, w)


# ------------------------------------------------------------------------------- ranged reads


class Reader:
    def __init__(self, blob: bytes) -> None:
        self.blob, self.calls = blob, []  # type: ignore[var-annotated]

    def __call__(self, offset: int, length: int) -> bytes:
        self.calls.append((offset, length))
        return self.blob[offset : offset + length]


@pytest.mark.parametrize("codec", CODECS)
@given(data=st.data())
def test_decode_fragment_reads_only_overlapping_chunks(codec: str, data: st.DataObject) -> None:
    w = weights(300)
    shard = shard_of({"pad": torch.ones(5), "w": w}, world_size=2, rank=0, stage=3)
    blob = encode_shard(shard, codec=codec, chunk_bytes=64)  # 16 elements per chunk
    h = decode_header(blob[: read_header_size(blob[:PREAMBLE_SIZE])])
    index = [e.fragment.leaf for e in h.fragments].index(1)
    entry = h.fragments[index]
    start = data.draw(st.integers(0, entry.fragment.numel))
    stop = data.draw(st.integers(start, entry.fragment.numel))
    read = Reader(blob)
    got = decode_fragment(h, index, read, start=start, stop=stop)
    assert tensors_bitwise_equal(got, w[entry.fragment.start + start : entry.fragment.start + stop])
    want = [
        (c.offset, c.length)
        for c in entry.chunks
        if c.start_elem < stop and c.stop_elem > start and start < stop
    ]
    assert read.calls == want
    assert len(want) <= -(-(stop - start) // 16) + 1


def test_decode_fragment_into_out() -> None:
    w = weights(1000, torch.bfloat16)
    blob = encode_shard(shard_of({"w": w}), codec="byteplane", chunk_bytes=512)
    h = decode_header(blob)
    out = torch.full((300,), 7.0, dtype=torch.bfloat16)
    got = decode_fragment(h, 0, Reader(blob), start=100, stop=400, out=out)
    assert got is out
    assert torch.equal(out, w[100:400])
    strided = torch.zeros(600, dtype=torch.bfloat16)[::2]
    decode_fragment(h, 0, Reader(blob), start=500, stop=800, out=strided)
    assert torch.equal(strided, w[500:800])
    assert decode_fragment(h, 0, Reader(blob), start=5, stop=5).numel() == 0
    with pytest.raises(ValueError, match="out must be"):
        decode_fragment(h, 0, Reader(blob), out=torch.empty(1000))
    with pytest.raises(ValueError, match="bad range"):
        decode_fragment(h, 0, Reader(blob), start=10, stop=2000)
    with pytest.raises(IndexError):
        decode_fragment(h, 1, Reader(blob))


def test_decode_fragment_short_read_and_damage_are_reported() -> None:
    blob = encode_shard(shard_of({"m": {"w": torch.arange(64.0)}}), chunk_bytes=64)
    h = decode_header(blob)
    c = h.fragments[0].chunks[2]
    with pytest.raises(TruncatedError, match=rf"m/w elements \[32, 48\).*offset {c.offset}"):
        decode_fragment(h, 0, lambda o, n: blob[o : o + n - (o == c.offset)])
    bad = bytearray(blob)
    bad[c.offset + 3] ^= 0x10
    with pytest.raises(ChecksumError, match=rf"m/w elements \[32, 48\).*offset {c.offset}"):
        decode_fragment(h, 0, Reader(bytes(bad)), start=30, stop=40)
    assert decode_fragment(h, 0, Reader(bytes(bad)), start=0, stop=32).tolist() == list(
        map(float, range(32))
    )


class ReaderInto(Reader):
    """``read`` and ``read_into`` over one blob, recording which was used for which offset."""

    def __init__(self, blob: bytes, short_at: int = -1) -> None:
        super().__init__(blob)
        self.into: list[tuple[int, int]] = []
        self.lock, self.short_at = threading.Lock(), short_at

    def read_into(self, offset: int, out: memoryview) -> int:
        data = self.blob[offset : offset + out.nbytes - (offset == self.short_at)]
        out[: len(data)] = data
        with self.lock:
            self.into.append((offset, len(data)))
        return len(data)


@pytest.mark.parametrize("codec", CODECS)
@given(data=st.data())
def test_read_into_fills_whole_raw_chunks_in_place(codec: str, data: st.DataObject) -> None:
    w = weights(300)
    shard = shard_of({"pad": torch.ones(5), "w": w}, world_size=2, rank=0, stage=3)
    blob = encode_shard(shard, codec=codec, chunk_bytes=64)
    h = decode_header(blob)
    index = [e.fragment.leaf for e in h.fragments].index(1)
    entry = h.fragments[index]
    start = data.draw(st.integers(0, entry.fragment.numel))
    stop = data.draw(st.integers(start, entry.fragment.numel))
    threads = data.draw(st.sampled_from([1, 4]))
    r = ReaderInto(blob)
    out = torch.full((stop - start,), float("nan"))
    got = decode_fragment(
        h, index, r, start=start, stop=stop, out=out, read_into=r.read_into, threads=threads
    )
    assert got is out
    assert tensors_bitwise_equal(out, w[entry.fragment.start + start : entry.fragment.start + stop])
    touched = [c for c in entry.chunks if c.start_elem < stop and c.stop_elem > start < stop]
    inside = {
        c.offset
        for c in touched
        if c.codec == RAW and start <= c.start_elem and c.stop_elem <= stop
    }
    assert sorted(o for o, _ in r.into) == sorted(inside)  # raw and whole: straight into out
    rest = [c.offset for c in touched if c.offset not in inside]
    assert sorted(o for o, _ in r.calls) == sorted(rest)


def test_read_into_damage_and_short_reads_are_reported() -> None:
    blob = encode_shard(shard_of({"m": {"w": torch.arange(64.0)}}), chunk_bytes=64)
    h = decode_header(blob)
    c = h.fragments[0].chunks[2]
    r = ReaderInto(blob, short_at=c.offset)
    with pytest.raises(TruncatedError, match=rf"m/w elements \[32, 48\).*offset {c.offset}"):
        decode_fragment(h, 0, r, read_into=r.read_into)
    bad = bytearray(blob)
    bad[c.offset + 3] ^= 0x10
    r = ReaderInto(bytes(bad))
    with pytest.raises(ChecksumError, match=rf"m/w elements \[32, 48\).*offset {c.offset}"):
        decode_fragment(h, 0, r, read_into=r.read_into, out=torch.empty(64))
    # A raw bool chunk whose bytes are not 0/1, with a matching checksum.
    blob = base_blob("raw")
    flag = decode_header(blob).fragments[1].chunks[0]
    forged = bytearray(blob)
    forged[flag.offset : flag.offset + 5] = b"\x02\x01\x01\x01\x01"
    sealed = reseal(bytes(forged), lambda o: _chunk(o, 1).update(x=xxhash.xxh3_64_intdigest(
        b"\x02\x01\x01\x01\x01")))  # fmt: skip
    r = ReaderInto(sealed)
    with pytest.raises(FormatError, match="bool byte"):
        decode_fragment(decode_header(sealed), 1, r, read_into=r.read_into)
    assert r.into  # the check ran on the read_into path
    with pytest.raises(FormatError, match="bool byte"):  # part of a raw chunk: checked too
        decode_fragment(decode_header(sealed), 1, r, start=0, stop=2, read_into=r.read_into)
    assert decode_fragment(decode_header(sealed), 1, r, start=1, stop=3).tolist() == [True] * 2


class ReaderSome(ReaderInto):
    """A ``read_into`` that returns at most ``most`` bytes a call (a page-cache-only read)."""

    def __init__(self, blob: bytes, most: int) -> None:
        super().__init__(blob)
        self.most = most

    def read_into(self, offset: int, out: memoryview) -> int:
        return super().read_into(offset, out[: self.most])


@pytest.mark.parametrize(("most", "piece"), [(7, 3), (16, 64), (1000, 5), (64, 1)])
def test_piecewise_reads_fill_and_check_every_byte(most: int, piece: int) -> None:
    """With ``piece_bytes``, short reads are continued and every byte is still checked."""
    blob = encode_shard(shard_of({"m": {"w": torch.arange(64.0)}}), chunk_bytes=64)
    h = decode_header(blob)
    r = ReaderSome(blob, most)
    out = torch.full((64,), float("nan"))
    decode_fragment(h, 0, r, out=out, read_into=r.read_into, piece_bytes=piece, threads=2)
    assert out.tolist() == list(map(float, range(64)))
    assert max(n for _, n in r.into) <= most
    c = h.fragments[0].chunks[2]
    for at in (c.offset, c.offset + 37, c.offset + c.length - 1):  # first, middle, last piece
        bad = bytearray(blob)
        bad[at] ^= 0x10
        r = ReaderSome(bytes(bad), most)
        with pytest.raises(ChecksumError, match=rf"m/w elements \[32, 48\).*offset {c.offset}"):
            decode_fragment(h, 0, r, read_into=r.read_into, piece_bytes=piece)
    r = ReaderSome(blob[: c.offset + 40], most)  # the file ends inside chunk 2
    with pytest.raises(TruncatedError, match=rf"offset {c.offset}, 64 bytes\): read 40 of its 64"):
        decode_fragment(h, 0, r, read_into=r.read_into, piece_bytes=piece)
    with pytest.raises(ValueError, match="piece_bytes"):
        decode_fragment(h, 0, r, read_into=r.read_into, piece_bytes=0)


def test_decoding_threads_are_kept_between_fragments() -> None:
    """One worker pool serves every fragment of a load (no threads started per fragment)."""
    blob = encode_shard(
        shard_of({"w": torch.arange(1 << 19, dtype=torch.float32)}), chunk_bytes=1 << 16
    )
    h = decode_header(blob)
    r = ReaderInto(blob)
    decode_fragment(h, 0, r, read_into=r.read_into, threads=2)
    before = {t.ident for t in threading.enumerate() if t.name.startswith("zckpt-codec")}
    for _ in range(3):
        decode_fragment(h, 0, r, read_into=r.read_into, threads=2)
    after = {t.ident for t in threading.enumerate() if t.name.startswith("zckpt-codec")}
    assert before and after == before


# ------------------------------------------------------------------------------- corruption


def base_blob(codec: str = "raw", pad: int = 300) -> bytes:
    """A small blob whose index has room to grow under :func:`reseal` (the ``pad`` string)."""
    state = {"master": {"w": torch.arange(64.0)}, "flag": torch.ones(5, dtype=torch.bool)}
    return encode_shard(shard_of(state), codec=codec, chunk_bytes=64, extra={"pad": "x" * pad})


def reseal(blob: bytes, mutate: Callable[[dict[str, Any]], Any]) -> bytes:
    """Apply ``mutate`` to the index, then repack it with a valid checksum, frames unmoved."""
    end = read_header_size(blob[:PREAMBLE_SIZE])
    data_offset = -(-end // 64) * 64
    obj = msgpack.unpackb(blob[PREAMBLE_SIZE:end], strict_map_key=False)
    mutate(obj)
    index = msgpack.packb(obj, use_bin_type=True)
    excess = PREAMBLE_SIZE + len(index) - data_offset
    if excess > 0 and isinstance(obj.get("extra"), dict) and "pad" in obj["extra"]:
        obj["extra"]["pad"] = "x" * max(0, len(obj["extra"]["pad"]) - excess - 8)
        index = msgpack.packb(obj, use_bin_type=True)
    assert PREAMBLE_SIZE + len(index) <= data_offset, "mutation grew the index too much"
    pre = struct.pack("<8sIIQQ", MAGIC, 1, 0, len(index), xxhash.xxh3_64_intdigest(index))
    head = pre + index
    return head + bytes(data_offset - len(head)) + blob[data_offset:]


def test_reseal_without_change_is_valid() -> None:
    blob = base_blob()
    assert reseal(blob, lambda o: None) == blob


def test_wrong_magic_and_text_mode_mangling() -> None:
    blob = base_blob()
    with pytest.raises(FormatError, match="not a zckpt blob") as e:
        decode_shard(b"PK\x03\x04" + blob[4:])
    assert type(e.value) is FormatError
    with pytest.raises(FormatError, match="text mode"):
        decode_shard(blob.replace(b"\r\n", b"\n", 1))
    with pytest.raises(TruncatedError):
        decode_shard(b"not a checkpoint")


def test_version_and_flags() -> None:
    blob = bytearray(base_blob())
    blob[8:12] = struct.pack("<I", 3)  # versions 1 and 2 exist
    with pytest.raises(VersionError, match="format version 3"):
        decode_shard(blob)
    blob[8:12] = struct.pack("<I", 2)  # a version 1 index under a version 2 preamble
    with pytest.raises(FormatError, match="version 1 disagrees with the preamble's"):
        decode_shard(blob)
    blob[8:12] = struct.pack("<I", 1)
    blob[12:16] = struct.pack("<I", 4)
    with pytest.raises(VersionError, match="flags 0x4"):
        decode_shard(blob)


def test_truncation_names_tensor_and_offset() -> None:
    blob = base_blob()
    h = decode_header(blob)
    last = h.fragments[0].chunks[-1]
    with pytest.raises(TruncatedError, match=rf"master/w elements \[48, 64\).*{last.offset}"):
        decode_shard(blob[: last.offset + 10])
    with pytest.raises(TruncatedError, match="index"):
        decode_shard(blob[:100])
    with pytest.raises(TruncatedError, match="preamble"):
        decode_shard(blob[:20])
    with pytest.raises(TruncatedError, match="header needs"):
        decode_header(blob[:100])
    with pytest.raises(FormatError, match="unexpected bytes after"):
        decode_shard(blob + b"\0")


@pytest.mark.parametrize("codec", CODECS)
def test_flipped_bits_are_checksum_errors(codec: str) -> None:
    blob = base_blob(codec)
    h = decode_header(blob)
    for fi, e in enumerate(h.fragments):
        for ci, c in enumerate(e.chunks):
            bad = bytearray(blob)
            bad[c.offset + c.length // 2] ^= 0x04
            with pytest.raises(ChecksumError, match=rf"offset {c.offset}") as err:
                decode_shard(bad)
            assert h.describe(fi, ci) in str(err.value)
    bad = bytearray(blob)
    bad[PREAMBLE_SIZE + 5] ^= 1
    with pytest.raises(ChecksumError, match="index"):
        decode_shard(bad)


def _chunk(o: dict[str, Any], f: int = 0, c: int = 0) -> dict[str, Any]:
    chunk: dict[str, Any] = o["fragments"][f]["chunks"][c]
    return chunk


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda o: _chunk(o).update(o=_chunk(o)["o"] + 1), "not a multiple of 64"),
        (lambda o: _chunk(o).update(o=2**40), "offset"),
        (lambda o: _chunk(o, 0, 1).update(o=_chunk(o)["o"]), "overlaps"),
        (lambda o: _chunk(o, 0, 1).update(a=17), "does not continue"),
        (lambda o: o["fragments"][0]["chunks"].pop(), "cover elements"),
        (lambda o: _chunk(o).update(r=10**12), "raw length"),
        (lambda o: _chunk(o).update(c=1, r=_chunk(o)["n"] * 40000), "raw length"),
        (lambda o: _chunk(o).update(c=9), "codec"),
        (lambda o: o["tensors"][0].__setitem__(0, 99), "unknown dtype code 99"),
        (lambda o: o["tensors"][0].__setitem__(1, [2**62, 2**62]), "absurd shape"),
        (lambda o: o["tensors"][0].__setitem__(1, [-1]), "shape"),
        (lambda o: o.update(rank="0"), "'rank'"),
        (lambda o: o.update(rank=5), "'rank'"),
        (lambda o: o.update(spec={"world_size": 0, "stage": 1}), "'spec'"),
        (lambda o: o.update(skeleton=[5, None]), "unknown node tag"),
        (lambda o: o.update(skeleton=[0, [["a", [3, 0]], ["a", [3, 1]]]]), "duplicate"),
        (lambda o: o.update(skeleton=[1, [[3, 1], [3, 0]]]), "tensor leaf"),
        (lambda o: o.update(skeleton=[1, [[3, 0]]]), "tensor leaves"),
        (lambda o: o.update(skeleton=[4, [1, 2]]), "not a storable value"),
        (lambda o: o.update(fragments={}), "'fragments'"),
        (lambda o: o["fragments"][0].update(leaf=7), "leaf"),
        (lambda o: o["fragments"][0].update(stop=65), "stop"),
        (lambda o: o["fragments"][0].update(start=64), "empty or inverted"),
        (lambda o: o.pop("size"), "missing field 'size'"),
        (lambda o: o.update(size=10), "'size'"),
        (lambda o: o.update(version=2), "disagrees"),
        (lambda o: o.update(format="zip"), "'format'"),
        (lambda o: o.update(extra=[1]), "'extra'"),
    ],
)
def test_bad_index_is_a_format_error(mutate: Callable[[dict[str, Any]], Any], message: str) -> None:
    bad = reseal(base_blob(), mutate)
    with pytest.raises(FormatError, match=message):
        decode_shard(bad)
    problems = list(iter_problems(bad))
    assert len(problems) == 1
    assert isinstance(problems[0], FormatError)


def test_deep_nesting_and_malformed_msgpack() -> None:
    deep: Any = [3, 0]
    for _ in range(200):
        deep = [1, [deep]]
    with pytest.raises(FormatError, match="deeper than 128"):
        decode_shard(reseal(base_blob(pad=2000), lambda o: o.update(skeleton=deep)))
    blob = base_blob()
    end = read_header_size(blob[:PREAMBLE_SIZE])
    for index in (b"\x91" * 2000 + b"\xc0", b"\xdd\xff\xff\xff\xff", b"\xc1", b"\x92\x01"):
        pre = struct.pack("<8sIIQQ", MAGIC, 1, 0, len(index), xxhash.xxh3_64_intdigest(index))
        with pytest.raises(FormatError, match="malformed msgpack"):
            decode_header(pre + index)
    assert end > PREAMBLE_SIZE


def test_frame_contents_are_checked_after_the_checksum() -> None:
    blob = base_blob("zstd")
    h = decode_header(blob)
    flag = h.fragments[1].chunks[0]
    # A bool chunk whose bytes are not 0/1, with a matching checksum.
    forged = bytearray(blob)
    forged[flag.offset : flag.offset + 5] = b"\x02\x01\x01\x01\x01"
    sealed = reseal(bytes(forged), lambda o: _chunk(o, 1).update(x=xxhash.xxh3_64_intdigest(
        b"\x02\x01\x01\x01\x01")))  # fmt: skip
    with pytest.raises(FormatError, match="bool byte"):
        decode_shard(sealed)
    # A zstd chunk that decodes to fewer bytes than declared.
    c0 = h.fragments[0].chunks[0]
    small = bytes(__import__("zstandard").ZstdCompressor().compress(b"\0" * 8))
    forged = bytearray(blob)
    forged[c0.offset : c0.offset + len(small)] = small

    def shrink(o: dict[str, Any]) -> None:
        _chunk(o).update(c=1, n=len(small), x=xxhash.xxh3_64_intdigest(small))

    with pytest.raises(FormatError, match=r"fewer than the 64 bytes.*master/w|master/w.*fewer"):
        decode_shard(reseal(bytes(forged), shrink))


# ------------------------------------------------------------------------------- verify


def test_verify_and_iter_problems() -> None:
    blob = base_blob("byteplane")
    verify_blob(blob)
    assert list(iter_problems(blob)) == []
    h = decode_header(blob)
    bad = bytearray(blob)
    c1, c3 = h.fragments[0].chunks[1], h.fragments[0].chunks[3]
    bad[c1.offset] ^= 1
    bad[c3.offset + c3.length - 1] ^= 1
    bad[h.index_size] = 1  # padding after the index
    problems = list(iter_problems(bad))
    assert [type(p) for p in problems] == [FormatError, ChecksumError, ChecksumError]
    assert "padding" in str(problems[0])
    assert f"offset {c1.offset}" in str(problems[1])
    assert f"offset {c3.offset}" in str(problems[2])
    with pytest.raises(FormatError, match="padding"):
        verify_blob(bad)
    assert [type(p) for p in iter_problems(blob[:-3])] == [TruncatedError]


def test_header_only_reads() -> None:
    blob = base_blob("zstd")
    n = read_header_size(blob[:PREAMBLE_SIZE], blob_size=len(blob))
    h = decode_header(blob[:n])
    assert h.index_size == n
    assert h.size == len(blob)
    assert decode_header(blob[:n]) == decode_header(blob, blob_size=len(blob))
    with pytest.raises(TruncatedError):
        read_header_size(blob[:PREAMBLE_SIZE], blob_size=n - 1)
    assert issubclass(TruncatedError, ZckptError)


def test_decoding_threads_are_shared_among_the_local_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """With LOCAL_WORLD_SIZE processes on the machine, each decodes with its share of the
    cores: as many ranks as cores read in the calling thread, no pool."""
    import zckpt.format._decode as decode_mod
    import zckpt.format._encode as encode_mod

    monkeypatch.setattr(encode_mod, "default_threads", lambda: 4)
    for local, want in (("", 4), ("1", 4), ("2", 2), ("3", 1), ("8", 1), ("0", 4), ("x", 4)):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
        assert decode_mod.decode_threads() == want, local
    blob = encode_shard(
        shard_of({"w": torch.arange(1 << 19, dtype=torch.float32)}), chunk_bytes=1 << 16
    )
    h = decode_header(blob)
    seen: set[str] = set()

    class Where(ReaderInto):
        def read_into(self, offset: int, out: memoryview) -> int:
            seen.add(threading.current_thread().name)
            return super().read_into(offset, out)

    r = Where(blob)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert decode_fragment(h, 0, r, read_into=r.read_into).equal(
        torch.arange(1 << 19, dtype=torch.float32)
    )
    assert seen == {threading.current_thread().name}
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    decode_fragment(h, 0, r, read_into=r.read_into)
    assert any(n.startswith("zckpt-codec") for n in seen)


@pytest.mark.parametrize(("most", "piece", "threads"), [(None, None, 1), (5000, 64, 2), (7, 3, 1)])
def test_span_reads_take_adjacent_chunks_together_and_check_each(
    most: int | None, piece: int | None, threads: int
) -> None:
    """With ``span_bytes``, adjacent raw chunks are asked for in one ``read_into`` call per
    span (about one span per thread); each chunk is still checked on its own, and a damaged or
    cut chunk is named, whichever place of its span it has."""
    blob = encode_shard(shard_of({"m": {"w": torch.arange(256.0)}}), chunk_bytes=64)
    h = decode_header(blob)
    chunks = h.fragments[0].chunks
    assert len(chunks) == 16
    kw: dict[str, Any] = dict(piece_bytes=piece, span_bytes=1 << 20, threads=threads)

    def reader(data: bytes) -> ReaderInto:
        return ReaderInto(data) if most is None else ReaderSome(data, most)

    r = reader(blob)
    out = torch.full((256,), float("nan"))
    decode_fragment(h, 0, r, out=out, read_into=r.read_into, **kw)
    assert out.tolist() == list(map(float, range(256)))
    if most is None:  # one call per span: the whole fragment for one thread
        assert r.into == [(chunks[0].offset, 1024)]
    else:  # a fragment this small is one span even for two threads; read piece by piece
        assert r.into[0][0] == chunks[0].offset and max(n for _, n in r.into) <= most
        assert sum(n for _, n in r.into) == 1024
    for ci in (0, 7, 15):  # first, middle and last chunk of the span
        c = chunks[ci]
        bad = bytearray(blob)
        bad[c.offset + c.length - 1] ^= 0x01
        r = reader(bytes(bad))
        elems = rf"m/w elements \[{16 * ci}, {16 * ci + 16}\).*offset {c.offset}"
        with pytest.raises(ChecksumError, match=elems):
            decode_fragment(h, 0, r, read_into=r.read_into, **kw)
    c = chunks[9]
    r = reader(blob[: c.offset + 40])  # the file ends inside chunk 9
    with pytest.raises(TruncatedError, match=rf"offset {c.offset}, 64 bytes\): read 40 of its 64"):
        decode_fragment(h, 0, r, read_into=r.read_into, **kw)
    with pytest.raises(ValueError, match="span_bytes"):
        decode_fragment(h, 0, r, read_into=r.read_into, span_bytes=0)


def test_spans_cut_runs_at_gaps_and_at_the_cap() -> None:
    """A span holds consecutive chunks whose frames follow each other in the file."""
    from types import SimpleNamespace

    from zckpt.format._span import spans_of as _spans

    cs = [SimpleNamespace(offset=o, length=10) for o in (0, 10, 20, 40, 50, 60, 70)]
    assert _spans(cs, [0, 1, 2, 3, 4, 5, 6], 1, 1000) == [(0, 1, 2), (3, 4, 5, 6)]
    assert _spans(cs, [0, 1, 2, 3, 4, 5, 6], 2, 1000) == [(0, 1), (2,), (3, 4), (5, 6)]
    assert _spans(cs, [0, 2, 3, 4, 5, 6], 1, 20) == [(0,), (2,), (3, 4), (5, 6)]
