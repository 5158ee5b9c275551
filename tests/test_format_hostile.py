"""Hostile blobs: every size a blob claims is bounded by the blob before anything is allocated,
nothing nests deeper than the format allows, and skeletons are checked whole at parse time.

Decoding runs in a child process under an address-space limit (``RLIMIT_AS``: its size after
importing torch, plus a headroom), so an allocation a blob talks the decoder into shows up as
an error here instead of passing on a large machine; the invariant is that every decoder ends
in a zckpt error (``AllocationError`` when a blob declares more than memory holds) or decodes.
:class:`LimitedDecoder` is shared with tests/test_format_fuzz.py.
"""

from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
import xxhash
import zstandard

import zckpt
from zckpt.errors import FormatError, StateError, TruncatedError
from zckpt.format import (
    MAGIC,
    PREAMBLE_SIZE,
    decode_header,
    encode_shard,
    read_header_size,
    skeleton_from_wire,
    skeleton_to_wire,
)
from zckpt.format._codecs import MAX_EXPANSION
from zckpt.format._skeleton import MAX_DEPTH

GiB = 1 << 30

# ---------------------------------------------------------------------------------- the child

_CHILD = r"""
import hashlib, json, resource, struct, sys, traceback
import torch, zckpt
from zckpt.errors import ZckptError
from zckpt.format import (decode_fragment, decode_header, decode_shard, iter_problems,
                          skeleton_to_wire)

def vm_size():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise KeyError("VmSize")

limit = vm_size() + int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

def digest(rank, spec, skeleton, fragments, tensors):
    h = hashlib.sha256(repr((rank, spec, tuple(fragments))).encode())
    h.update(repr(skeleton_to_wire(skeleton)).encode())
    for t in tensors:
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

def shard(blob, threads):
    s = decode_shard(blob, threads=threads)
    return digest(s.rank, s.spec, s.skeleton, s.fragments, s.data)

def fragments(blob, threads):
    h = decode_header(blob, blob_size=len(blob))
    data = [decode_fragment(h, i, lambda o, n: blob[o : o + n], threads=threads)
            for i in range(len(h.fragments))]
    return digest(h.rank, h.spec, h.skeleton, [e.fragment for e in h.fragments], data)

def middle(blob, threads):  # a range inside each fragment: partial chunks at both ends
    h = decode_header(blob, blob_size=len(blob))
    for i, e in enumerate(h.fragments):
        n = e.fragment.numel
        decode_fragment(h, i, lambda o, k: blob[o : o + k], start=n // 3, stop=n - n // 3,
                        threads=threads)

DECODERS = {
    "header": lambda b, t: decode_header(b, blob_size=len(b)).size,
    "shard": shard,
    "fragments": fragments,
    "middle": middle,
    "problems": lambda b, t: [type(p).__name__ for p in iter_problems(b)],
}

inp, out = sys.stdin.buffer, sys.stdout.buffer
while True:
    head = inp.read(8)
    if len(head) < 8:
        break
    req = json.loads(inp.read(struct.unpack("<Q", head)[0]))
    blob = inp.read(struct.unpack("<Q", inp.read(8))[0])
    result = {}
    for name in req["decoders"]:
        try:
            result[name] = ["ok", DECODERS[name](blob, req["threads"])]
        except ZckptError as e:
            result[name] = ["zckpt", type(e).__name__, str(e)[:300]]
        except BaseException as e:
            result[name] = ["crash", type(e).__name__, traceback.format_exc()[-3000:]]
    out.write(json.dumps(result).encode() + b"\n")
    out.flush()
"""

ALL_DECODERS = ("header", "shard", "fragments", "middle", "problems")


class LimitedDecoder:
    """A child process that decodes blobs under ``RLIMIT_AS`` = its size + ``headroom``."""

    def __init__(self, headroom: int = GiB, timeout: float = 120.0) -> None:
        self.timeout = timeout
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(headroom)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )

    def __call__(
        self, blob: bytes, decoders: tuple[str, ...] = ALL_DECODERS, threads: int = 2
    ) -> dict[str, list[Any]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        req = json.dumps({"decoders": list(decoders), "threads": threads}).encode()
        self.proc.stdin.write(struct.pack("<Q", len(req)) + req)
        self.proc.stdin.write(struct.pack("<Q", len(blob)) + blob)
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        if not ready:
            self.proc.kill()
            raise AssertionError(f"the decoders took more than {self.timeout} s (a hang?)")
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            raise AssertionError(f"the decoding child died (rc {self.proc.wait()}): {err[-3000:]}")
        result: dict[str, list[Any]] = json.loads(line)
        crashes = {k: v for k, v in result.items() if v[0] == "crash"}
        assert not crashes, "a decoder raised a non-zckpt error:\n" + "\n".join(
            f"{k}: {v[1]}\n{v[2]}" for k, v in crashes.items()
        )
        return result

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


@pytest.fixture(scope="module")
def limited() -> Iterator[LimitedDecoder]:
    child = LimitedDecoder()
    yield child
    child.close()


# ---------------------------------------------------------------------------------- forging


def _align(n: int) -> int:
    return -(-n // 64) * 64


def seal(index: bytes) -> bytes:
    return struct.pack("<8sIIQQ", MAGIC, 1, 0, len(index), xxhash.xxh3_64_intdigest(index))


Chunk = tuple[int, int, int, bytes, int, list[list[int]]]  # a, b, codec, stored, raw, planes


def forge(
    tensors: list[Any],
    fragments: list[tuple[int, int, int, list[Chunk]]],
    **fields: Any,
) -> bytes:
    """A blob with these tensors (``[code, shape]``, one skeleton leaf each) and fragments
    (``(leaf, start, stop, chunks)``), frames laid out after the index with valid checksums;
    ``fields`` override index fields."""
    skeleton = fields.pop("skeleton", [0, [[f"t{i}", [3, i]] for i in range(len(tensors))]])
    data = 64
    while True:
        pos, frames, frags = data, [], []
        for leaf, start, stop, chunks in fragments:
            wire = []
            for a, b, codec, stored, raw, planes in chunks:
                c = {"a": a, "b": b, "c": codec, "o": pos, "n": len(stored), "r": raw,
                     "x": xxhash.xxh3_64_intdigest(stored)}  # fmt: skip
                if planes:
                    c["p"] = planes
                wire.append(c)
                frames.append((pos, stored))
                pos = _align(pos + len(stored))
            frags.append({"leaf": leaf, "start": start, "stop": stop, "chunks": wire})
        size = frames[-1][0] + len(frames[-1][1]) if frames else data
        obj = {"format": "zckpt", "version": 1, "rank": 0, "spec": {"world_size": 1, "stage": 1},
               "tensors": tensors, "skeleton": skeleton, "fragments": frags, "extra": {},
               "size": size, **fields}  # fmt: skip
        index = msgpack.packb(obj, use_bin_type=True)
        if _align(PREAMBLE_SIZE + len(index)) <= data:
            break
        data = _align(PREAMBLE_SIZE + len(index))
    out = bytearray(size)
    out[: PREAMBLE_SIZE + len(index)] = seal(index) + index
    for o, stored in frames:
        out[o : o + len(stored)] = stored
    return bytes(out)


def with_index(blob: bytes, **fields: Any) -> bytes:
    """``blob`` with index fields replaced (resealed; frames moved if the index grows)."""
    end = read_header_size(blob[:PREAMBLE_SIZE])
    obj = msgpack.unpackb(blob[PREAMBLE_SIZE:end])
    obj.update(fields)
    index = msgpack.packb(obj, use_bin_type=True)
    old, new = _align(end), _align(PREAMBLE_SIZE + len(index))
    if new > old and "fragments" not in fields and "size" not in fields:
        shift = new - old  # frames move: shift their offsets and the size
        for f in obj["fragments"]:
            for c in f["chunks"]:
                c["o"] += shift
        obj["size"] += shift
        index = msgpack.packb(obj, use_bin_type=True)
    head = seal(index) + index
    return head + bytes(max(old, new) - len(head)) + blob[old:]


def small_blob(codec: str = "raw") -> bytes:
    s = {"w": torch.arange(64.0), "n": [1, None]}
    shard = zckpt.shard_state(s, zckpt.plan_shards(s, zckpt.ZeroSpec(1, 1)), 0)
    return encode_shard(shard, codec=codec, chunk_bytes=64)


def nested(depth: int, leaf: Any = 0) -> Any:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


def _zeros_frame(nbytes: int) -> bytes:
    """A zstd frame of ``nbytes`` zeros, compressed in 64 MiB pieces (never held whole)."""
    c = zstandard.ZstdCompressor(level=1).compressobj()
    zeros = bytes(64 << 20)
    out = [c.compress(zeros) for _ in range(nbytes // len(zeros))]
    return b"".join([*out, c.flush()])


# ---------------------------------------------------------------------------------- sizes


def test_read_header_size_bounds_the_claimed_index_by_the_blob() -> None:
    """A preamble claiming a 4 GiB index on a small file: refused before anyone reads 4 GiB."""
    blob = small_blob()
    pre = bytearray(blob[:PREAMBLE_SIZE])
    struct.pack_into("<Q", pre, 16, 1 << 32)
    assert read_header_size(bytes(pre)) == PREAMBLE_SIZE + (1 << 32)  # no size: only the range
    with pytest.raises(TruncatedError, match=r"byte offset 16: index length 4294967296 runs past"):
        read_header_size(bytes(pre), blob_size=len(blob))
    with pytest.raises(TruncatedError, match="index length"):
        decode_header(bytes(pre) + blob[PREAMBLE_SIZE:], blob_size=len(blob))
    struct.pack_into("<Q", pre, 16, (1 << 32) + 1)
    with pytest.raises(FormatError, match=r"byte offset 16: index length \d+ is out of range"):
        read_header_size(bytes(pre))


def _huge_claim(garbage: bool = True) -> bytes:
    """~2 MiB of 64-byte zstd frames declaring a 64 GiB float32 tensor: each frame claims the
    format's maximum expansion (32768x), so the index itself is within every bound."""
    n_chunks, per = 1 << 15, 1 << 19  # elements of 4 bytes: 2 MiB raw per 64-byte frame
    rng = np.random.default_rng(0)
    chunks: list[Chunk] = [
        (i * per, (i + 1) * per, 1, rng.bytes(64) if garbage else bytes(64), per * 4, [])
        for i in range(n_chunks)
    ]
    return forge([[0, [n_chunks * per]]], [(0, 0, n_chunks * per, chunks)])


def test_a_blob_declaring_64_gib_ends_in_zckpt_errors(limited: LimitedDecoder) -> None:
    """decode_shard used to allocate every declared tensor up front with torch.empty, whose
    failure is a RuntimeError; now the allocation is an AllocationError naming the tensor."""
    blob = _huge_claim()
    assert len(blob) < 4 << 20
    h = decode_header(blob, blob_size=len(blob))  # the header is within every bound
    assert h.skeleton.tensors[0].nbytes == 64 * GiB
    got = limited(blob, ("header", "shard", "fragments", "middle"))
    assert got["shard"][:2] == ["zckpt", "AllocationError"], got["shard"]
    assert "t0" in got["shard"][2] and str(64 * GiB) in got["shard"][2]
    assert got["fragments"][:2] == ["zckpt", "AllocationError"]
    assert got["middle"][:2] == ["zckpt", "AllocationError"]  # a third of it: still too much


def test_a_bad_chunk_stops_the_allocations_after_it(limited: LimitedDecoder) -> None:
    """Fragment 0 is damaged, fragment 1 declares 64 GiB: the damage is what is reported."""
    n_chunks, per = 1 << 15, 1 << 19  # as in _huge_claim: 64 GiB of float32 in 64-byte frames
    bad: Chunk = (0, 16, 0, bytes(64), 64, [])
    frag1: list[Chunk] = [
        (i * per, (i + 1) * per, 1, bytes(64), per * 4, []) for i in range(n_chunks)
    ]
    huge = n_chunks * per
    blob = bytearray(forge([[0, [16]], [0, [huge]]], [(0, 0, 16, [bad]), (1, 0, huge, frag1)]))
    h = decode_header(bytes(blob), blob_size=len(blob))
    blob[h.fragments[0].chunks[0].offset] ^= 1
    for threads in (1, 4):
        got = limited(bytes(blob), ("shard",), threads=threads)
        assert got["shard"][:2] == ["zckpt", "ChecksumError"], (threads, got)


@pytest.mark.parametrize("plane", [False, True])
def test_a_zstd_frame_expanding_past_its_declared_size_stops_there(
    limited: LimitedDecoder, plane: bool
) -> None:
    """A 2 GiB zstd frame (64 KiB stored) in a chunk declaring 4096 bytes: rejected after
    decoding 4097 bytes, in well under a second, under a 1 GiB memory headroom."""
    frame = _zeros_frame(2 * GiB)
    # The best-compressing input there is sits just under the reader's bound: 32768x is zstd's
    # real limit (a 128 KiB RLE block in 4 bytes), not a guess.
    assert len(frame) * MAX_EXPANSION >= 2 * GiB > len(frame) * MAX_EXPANSION * 0.999
    if plane:  # bfloat16: the frame is byte plane 1 of 4096 elements
        raw_plane = bytes(4096)
        chunk: Chunk = (0, 4096, 2, raw_plane + frame, 8192, [[0, 4096], [1, len(frame)]])
        blob = forge([[2, [4096]]], [(0, 0, 4096, [chunk])])
    else:
        blob = forge([[8, [4096]]], [(0, 0, 4096, [(0, 4096, 1, frame, 4096, [])])])
    t0 = time.perf_counter()
    got = limited(blob)
    assert time.perf_counter() - t0 < 10
    for name in ("shard", "fragments", "middle"):
        assert got[name][:2] == ["zckpt", "FormatError"], got[name]
        assert "more than the 4096 bytes declared" in got[name][2]
    assert got["problems"][0] == "ok" and got["problems"][1] == ["FormatError"]


@pytest.mark.parametrize(
    ("chunk", "match"),
    [
        ((0, 16, 0, bytes(60), 64, []), "raw frame of 60 bytes holds 64"),
        ((0, 16, 0, bytes(64), 65, []), "raw length 65 is not 16 elements of 4 bytes"),
        ((0, 1 << 20, 1, bytes(127), 4 << 20, []), "127 zstd bytes cannot expand to 4194304"),
        ((0, 1 << 20, 2, bytes(128), 4 << 20, [[1, 32], [1, 32], [1, 32], [1, 31]]), "plane 3"),
        ((0, 1 << 20, 2, bytes(128), 4 << 20, [[1, 32], [1, 32], [1, 32], [1, 33]]), "add up"),
        ((0, 1 << 20, 2, bytes(64), 4 << 20, [[0, 64], [1, 0], [1, 0], [1, 0]]), "plane 0"),
    ],
)
def test_each_declared_size_is_bounded_by_the_stored_bytes(chunk: Chunk, match: str) -> None:
    """Refused by decode_header, before anything is allocated for the chunk."""
    numel = chunk[1]
    blob = forge([[0, [numel]]], [(0, 0, numel, [chunk])])
    with pytest.raises(FormatError, match=match):
        decode_header(blob, blob_size=len(blob))


# ---------------------------------------------------------------------------------- nesting


@pytest.mark.parametrize(
    "field", ["spec", "tensors", "skeleton", "fragments", "extra", "rank", "size", "unknown"]
)
def test_values_nested_a_thousand_deep_are_format_errors(field: str) -> None:
    """msgpack nests up to ~1000 levels, past Python's recursion limit for repr: every field
    that can hold one ends in a FormatError (showing the value used to be a RecursionError)."""
    value = {"x": nested(1000)} if field == "extra" else nested(1000)
    blob = with_index(small_blob(), **{field: value})
    if field == "unknown":  # unknown keys are ignored, whatever they hold
        assert decode_header(blob, blob_size=len(blob)).rank == 0
        return
    with pytest.raises(FormatError) as e:
        decode_header(blob, blob_size=len(blob))
    assert len(str(e.value)) < 400


def test_extra_is_bounded_at_max_depth_on_read_and_on_write() -> None:
    s = {"w": torch.ones(2)}
    shard = zckpt.shard_state(s, zckpt.plan_shards(s, zckpt.ZeroSpec(1, 1)), 0)
    ok = {"k": nested(MAX_DEPTH - 2, {})}  # MAX_DEPTH containers, the map itself included
    assert decode_header(encode_shard(shard, extra=ok)).extra == ok
    deep = {"k": nested(MAX_DEPTH - 1, {})}
    with pytest.raises(StateError, match=f"nested deeper than {MAX_DEPTH} levels"):
        encode_shard(shard, extra=deep)
    blob = with_index(encode_shard(shard), extra=deep)
    with pytest.raises(
        FormatError, match=f"index 'extra': containers nested deeper than {MAX_DEPTH}"
    ):
        decode_header(blob)


# ---------------------------------------------------------------------------------- skeletons

T = [[0, [2]], [7, []]]  # a float32 [2] and an int64 scalar


def _deep_node(depth: int) -> Any:
    node: Any = [3, 0]
    for _ in range(depth):
        node = [1, [node]]
    return node


@pytest.mark.parametrize(
    ("skeleton", "tensors", "match"),
    [
        ([0, [["a", [3, 1]]]], T, "tensor leaf"),  # leaf 1 before leaf 0
        ([0, [["a", [3, 0]], ["b", [3, 2]]]], T, "tensor leaf"),  # beyond the list
        ([0, [["a", [3, 0]]]], T, "1 tensor leaves but 'tensors' lists 2"),  # leaf 1 unnamed
        ([0, [["a", [3, 0]], ["b", [3, 1]], ["c", [3, 2]]]], T, "tensor leaf"),
        ([0, [["a", [3, 0]], ["b", [3, True]]]], T, "tensor leaf"),  # bool index
        ([0, [["a", [3, 0]], ["b", [3, 1.0]]]], T, "tensor leaf"),
        ([True, [[3, 0], [3, 1]]], T, "node tag True is not an integer"),  # True == LIST
        ([1, [[3.0, 0], [3, 1]]], T, "node tag 3.0 is not an integer"),  # 3.0 == TENSOR
        ([1, [[3, 0], [3, 1], [5, 0]]], T, "unknown node tag 5"),
        ([1, [[3, 0], [3, 1], [4, [1]]]], T, "list is not a storable value"),
        ([1, [[3, 0], [3, 1], [4, 2**64]]], T, "does not fit in 64 bits"),
        ([0, [[2**64, [3, 0]], ["b", [3, 1]]]], T, "is not a str or a 64-bit int"),
        ([0, [[True, [3, 0]], ["b", [3, 1]]]], T, "is not a str or a 64-bit int"),
        ([0, [["a", [3, 0]], ["a", [3, 1]]]], T, "duplicate dict key"),
        ([1, [[3, 0], [3, 1]]], [[22, [2]], [7, []]], "unknown dtype code 22"),
        ([1, [[3, 0], [3, 1]]], [[True, [2]], [7, []]], "dtype code"),
        ([1, [[3, 0], [3, 1]]], [[0, [-1]], [7, []]], "shape"),
        ([1, [[3, 0], [3, 1]]], [[0, [2.0]], [7, []]], "shape"),
        ([1, [[3, 0], [3, 1]]], [[0, [False]], [7, []]], "shape"),
        ([1, [[3, 0], [3, 1]]], [[0, [2**63]], [7, []]], "shape"),
        ([1, [[3, 0], [3, 1]]], [[0, [2**31, 2**31]], [7, []]], "absurd shape"),  # 2**64 bytes
        ([1, [[3, 0], [3, 1]]], [[0, [0, 2**62, 2**62]], [7, []]], "absurd shape"),  # strides
        ([1, [[3, 0], [3, 1]]], [[0, [2**61]], [7, []]], "absurd shape"),  # 2**63 bytes
        ([1, [[3, 0], [3, 1]]], [[0, 2], [7, []]], "shape"),
        ([1, [[3, 0], [3, 1]]], [[0, [2], 3], [7, []]], "tensors"),
        (_deep_node(MAX_DEPTH + 1), T[:1], "nested deeper than 128"),
    ],
)
def test_skeleton_cross_references_fail_at_parse_time(
    skeleton: Any, tensors: Any, match: str
) -> None:
    with pytest.raises(FormatError, match=match):
        skeleton_from_wire({"skeleton": skeleton, "tensors": tensors})
    try:
        blob = with_index(small_blob(), skeleton=skeleton, tensors=tensors, fragments=[])
    except OverflowError:  # 2**64 has no msgpack encoding: only other sources can give it
        return
    with pytest.raises(FormatError, match=match):
        decode_header(blob)


def test_wire_skeletons_that_parse_are_usable_everywhere() -> None:
    """What parses builds tensors, unflattens and round-trips (nothing fails later)."""
    wire = {"tensors": [[0, [0, 2**60]], [3, [2**20, 2**20]], [9, []]],
            "skeleton": [0, [["a", [3, 0]], [-(2**63), [3, 1]], ["c", [2, [[3, 2], [3, 1]]]],
                             ["v", [4, 2**64 - 1]]]]}  # fmt: skip
    skel = skeleton_from_wire(wire)
    assert skeleton_to_wire(skel) == wire
    assert torch.empty(skel.tensors[0].shape, device="meta").numel() == 0
    assert skel.tensors[1].nbytes == 8 << 40
    state = zckpt.tree.unflatten(skel, ["A", "B", "C"])
    assert state == {"a": "A", -(2**63): "B", "c": ("C", "B"), "v": 2**64 - 1}
    plan = zckpt.plan_shards(skel, zckpt.ZeroSpec(3, 3))
    assert sum(f.numel for w in plan.writes for f in w) == 2**40 + 1
