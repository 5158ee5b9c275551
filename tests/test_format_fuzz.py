"""Fuzzing the decoder: arbitrary and mutated bytes end in a zckpt error, never anything else.

Three layers: raw bytes (stopped at the preamble), well-sealed msgpack indexes of arbitrary shape
(past the checksum, into the schema checks), and valid blobs mutated byte-wise or field-wise and
resealed with correct checksums (into the frame decoders). The mutated blobs are also decoded in
a child under a memory limit (tests/test_format_hostile.py's ``LimitedDecoder``), where byte-wise
damage must end in a zckpt error or decode to exactly the original.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import torch
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st
from test_format_hostile import LimitedDecoder

import zckpt
from zckpt.errors import ZckptError
from zckpt.format import (
    MAGIC,
    PREAMBLE_SIZE,
    decode_fragment,
    decode_header,
    decode_shard,
    encode_shard,
    iter_problems,
    read_header_size,
)


def _decoders() -> list[Callable[[bytes], Any]]:
    def fragments(b: bytes) -> None:
        h = decode_header(b, blob_size=len(b))
        for i in range(len(h.fragments)):
            decode_fragment(h, i, lambda o, n: b[o : o + n], start=0)

    return [decode_shard, decode_header, lambda b: list(iter_problems(b)), fragments]


def only_zckpt_errors(data: bytes) -> None:
    for decode in _decoders():
        with contextlib.suppress(ZckptError):
            decode(data)


def _blob(codec: str, chunk: int) -> bytes:
    w = (torch.randn(200, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    state = {
        "master": {"w": torch.arange(40.0) / 7},
        "module": {"w": w},
        "flags": torch.tensor([True, False, True]),
        "ids": torch.arange(9, dtype=torch.int16),
        "empty": torch.zeros(0, 2),
        "meta": [1, None, (2.5, "x", b"y")],
    }
    shard = zckpt.shard_state(state, zckpt.plan_shards(state, zckpt.ZeroSpec(1, 1)), 0)
    return encode_shard(shard, codec=codec, chunk_bytes=chunk)


BLOBS = [_blob(c, k) for c in ("raw", "zstd", "byteplane") for k in (32, 4096)]

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([0, 1, 2, 3, 4, 7, 63, 64, 65, 2**31, 2**63 - 1, 2**64 - 1, -1]),
    st.floats(),
    st.text(max_size=6),
    st.binary(max_size=6),
)
msgpack_values = st.recursive(
    _scalars,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=4), kids, max_size=4)
    ),
    max_leaves=20,
)


def seal(index: bytes, tail: bytes = b"") -> bytes:
    pre = struct.pack("<8sIIQQ", MAGIC, 1, 0, len(index), xxhash.xxh3_64_intdigest(index))
    return pre + index + tail


def reseal(blob: bytes, obj: Any) -> bytes:
    """Repack an index object in front of the blob's frames (moved only if it must grow)."""
    end = read_header_size(blob[:PREAMBLE_SIZE])
    old = -(-end // 64) * 64
    index = msgpack.packb(obj, use_bin_type=True)
    head = seal(index)
    return head + bytes(max(0, old - len(head))) + blob[old:]


@given(st.binary(max_size=400))
def test_arbitrary_bytes(data: bytes) -> None:
    only_zckpt_errors(data)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_after_a_valid_preamble_prefix(data: bytes) -> None:
    only_zckpt_errors(MAGIC + struct.pack("<I", 1) + data)


@given(msgpack_values, st.binary(max_size=100))
def test_sealed_arbitrary_index(obj: Any, tail: bytes) -> None:
    only_zckpt_errors(seal(msgpack.packb(obj, use_bin_type=True), tail))


@given(
    st.fixed_dictionaries(
        {"format": st.just("zckpt"), "version": st.just(1), "rank": st.just(0)},
        optional={
            "spec": st.one_of(st.just({"world_size": 1, "stage": 1}), msgpack_values),
            "tensors": st.one_of(st.just([[0, [4]]]), msgpack_values),
            "skeleton": st.one_of(st.just([3, 0]), msgpack_values),
            "fragments": msgpack_values,
            "size": st.integers(0, 2000),
            "extra": msgpack_values,
        },
    ),
    st.binary(max_size=200),
)
def test_sealed_index_shaped_like_ours(obj: dict[str, Any], tail: bytes) -> None:
    only_zckpt_errors(seal(msgpack.packb(obj, use_bin_type=True), tail))


EDITS = st.lists(
    st.tuples(st.sampled_from(["flip", "cut", "splice", "insert", "delete"]), st.data()),
    min_size=1,
    max_size=3,
)


@given(st.sampled_from(BLOBS), EDITS)
def test_mutated_blobs(blob: bytes, edits: list[tuple[str, st.DataObject]]) -> None:
    only_zckpt_errors(mutate(blob, edits))


def mutate(blob: bytes, edits: list[tuple[str, st.DataObject]]) -> bytes:
    b = bytearray(blob)
    for op, data in edits:
        n = len(b)
        i = data.draw(st.integers(0, max(0, n - 1)))
        if op == "flip" and n:
            b[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del b[i:]
        elif op == "splice":
            j = data.draw(st.integers(0, n))
            k = data.draw(st.integers(0, 64))
            b[i : i + k] = b[j : j + k]
        elif op == "insert":
            b[i:i] = data.draw(st.binary(min_size=1, max_size=16))
        else:
            del b[i : i + data.draw(st.integers(1, 64))]
    return bytes(b)


def _paths(x: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(x, dict):
        for k, v in x.items():
            out += _paths(v, (*path, k))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            out += _paths(v, (*path, i))
    return out


def _replace(x: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    x[path[0]] = _replace(x[path[0]], path[1:], new)
    return x


def _index(blob: bytes) -> Any:
    return msgpack.unpackb(blob[PREAMBLE_SIZE : read_header_size(blob[:PREAMBLE_SIZE])])


@given(st.sampled_from(BLOBS), st.data())
def test_mutated_index_fields(blob: bytes, data: st.DataObject) -> None:
    obj = _index(blob)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(obj)))
        old: Any = obj
        for k in path:
            old = old[k]
        if isinstance(old, int) and not isinstance(old, bool) and data.draw(st.booleans()):
            moves = [old + 1, old - 1, old * 2, old + 64, 0, 2**40, -old]
            new = data.draw(st.sampled_from([v for v in moves if -(2**63) <= v < 2**64]))
        else:
            new = data.draw(msgpack_values)
        obj = _replace(obj, path, new)
    only_zckpt_errors(reseal(blob, obj))


@pytest.mark.parametrize("blob", BLOBS[:3] + BLOBS[3:4])
@given(data=st.data())
def test_forged_frames_with_valid_checksums(blob: bytes, data: st.DataObject) -> None:
    """Damage a frame and fix its checksum: the codecs must still reject it cleanly."""
    obj = _index(blob)
    chunks = [c for f in obj["fragments"] for c in f["chunks"]]
    c = data.draw(st.sampled_from(chunks))
    b = bytearray(blob)
    frame = bytearray(b[c["o"] : c["o"] + c["n"]])
    for _ in range(data.draw(st.integers(1, 4))):
        frame[data.draw(st.integers(0, len(frame) - 1))] ^= data.draw(st.integers(1, 255))
    if data.draw(st.booleans()):
        frame = frame[: data.draw(st.integers(1, len(frame)))]
        c["n"] = len(frame)
        if c.get("p"):
            c["p"][-1][1] = max(1, len(frame) - sum(ln for _, ln in c["p"][:-1]))
    b[c["o"] : c["o"] + len(frame)] = frame
    c["x"] = xxhash.xxh3_64_intdigest(bytes(frame))
    only_zckpt_errors(reseal(bytes(b), obj))


# ---------------------------------------------------------------------------------- memory limit


@pytest.fixture(scope="module")
def limited() -> Any:
    child = LimitedDecoder()  # its size after imports + 1 GiB: a blob here declares < 400 MiB
    yield child
    child.close()


_ORIGINAL: dict[bytes, dict[str, list[Any]]] = {}


def _original(limited: LimitedDecoder, blob: bytes) -> dict[str, list[Any]]:
    if blob not in _ORIGINAL:
        _ORIGINAL[blob] = limited(blob)
        assert all(v[0] == "ok" for v in _ORIGINAL[blob].values()), _ORIGINAL[blob]
    return _ORIGINAL[blob]


@settings(max_examples=150)
@given(blob=st.sampled_from(BLOBS), edits=EDITS, threads=st.sampled_from([1, 4]))
def test_mutated_blobs_under_a_memory_limit_decode_exactly_or_fail_cleanly(
    limited: LimitedDecoder, blob: bytes, edits: list[tuple[str, st.DataObject]], threads: int
) -> None:
    """Byte-wise damage: every decoder ends in a zckpt error (never MemoryError, RecursionError,
    IndexError, OverflowError, a bare ValueError or torch's "can't allocate" RuntimeError), or
    gives exactly the original tensors; ``iter_problems`` finds something iff a byte changed."""
    b = mutate(blob, edits)
    got = limited(b, threads=threads)  # asserts that nothing but zckpt errors escaped
    want = _original(limited, blob)
    for name in ("shard", "fragments"):
        assert got[name][0] == "zckpt" or got[name][1] == want[name][1], (name, got[name])
    assert got["problems"][0] == "ok"
    assert (got["problems"][1] == []) == (b == blob), got["problems"]


@settings(max_examples=150)
@given(st.sampled_from(BLOBS), st.data())
def test_mutated_index_fields_under_a_memory_limit(
    limited: LimitedDecoder, blob: bytes, data: st.DataObject
) -> None:
    """Field-wise damage, resealed: the index may now say something else that is valid (then
    decoding succeeds), but nothing other than a zckpt error ever escapes."""
    obj = _index(blob)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(obj)))
        old: Any = obj
        for k in path:
            old = old[k]
        if isinstance(old, int) and not isinstance(old, bool) and data.draw(st.booleans()):
            moves = [old + 1, old - 1, old * 2, old + 64, 0, 2**40, -old, old * 32768]
            new = data.draw(st.sampled_from([v for v in moves if -(2**63) <= v < 2**64]))
        else:
            new = data.draw(msgpack_values)
        obj = _replace(obj, path, new)
    limited(reseal(blob, obj), threads=data.draw(st.sampled_from([1, 4])))
