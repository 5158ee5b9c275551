"""The msgpack index: its schema, packed by the encoder and validated field by field on read.

Parsing treats the index as untrusted even after its checksum matched (a checksum proves the
bytes are the ones written, not that the writer was sane): every type, range, offset and element
range is checked against the blob's size before a reader allocates anything from it.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

from zckpt.errors import AllocationError, FormatError, SpecError, TruncatedError
from zckpt.format._checksum import check
from zckpt.format._codecs import BYTEPLANE, MAX_EXPANSION, RAW, ZSTD
from zckpt.format._columns import leaf_columns, leaf_metas_from_columns, skeleton_digest_of
from zckpt.format._dtypes import ITEMSIZE, dtype_code
from zckpt.format._header import (
    ALIGN,
    PREAMBLE_SIZE,
    BlobHeader,
    ChunkEntry,
    FragmentEntry,
    align,
    as_bytes_view,
    parse_preamble,
    preamble_version,
)
from zckpt.format._skeleton import (
    check_plain,
    expect_int,
    expect_list,
    expect_map,
    field,
    parse_skeleton,
    parse_tensors,
    show,
    skeleton_to_wire,
)
from zckpt.format._skeleton import wire_node as wire_node
from zckpt.shard import Shard
from zckpt.spec import Fragment, ZeroSpec
from zckpt.tree import Skeleton, TensorMeta

__all__ = [
    "bind_skeleton",
    "decode_header",
    "index_object",
    "index_object_v2",
    "pack_index",
    "parse_index",
    "shard_index",
]

# Aliases for zckpt.store._manifest, which imports these from here. New code should use
# zckpt.format.skeleton_to_wire / skeleton_from_wire.
_skeleton = parse_skeleton
_tensors = parse_tensors


# ---------------------------------------------------------------------------------- writing


def _wire_fragments(fragments: list[tuple[Fragment, list[ChunkEntry]]]) -> list[dict[str, Any]]:
    return [
        {
            "leaf": f.leaf,
            "start": f.start,
            "stop": f.stop,
            "chunks": [_wire_chunk(c) for c in chunks],
        }
        for f, chunks in fragments
    ]


def index_object(
    rank: int,
    spec: ZeroSpec,
    skeleton: Skeleton,
    fragments: list[tuple[Fragment, list[ChunkEntry]]],
    extra: dict[str, Any],
    size: int,
) -> dict[str, Any]:
    """The version 1 index as a msgpack-able map: self-contained, the whole skeleton in it
    (key order is part of the deterministic output)."""
    return {
        "format": "zckpt",
        "version": 1,
        "rank": rank,
        "spec": spec.to_dict(),
        **skeleton_to_wire(skeleton),
        "fragments": _wire_fragments(fragments),
        "extra": extra,
        "size": size,
    }


def index_object_v2(
    rank: int,
    spec: ZeroSpec,
    metas: Sequence[TensorMeta],
    digest: int,
    fragments: list[tuple[Fragment, list[ChunkEntry]]],
    extra: dict[str, Any],
    size: int,
) -> dict[str, Any]:
    """The version 2 index: the skeleton's digest and the columns of only the leaves the
    fragments are of (``metas`` is the skeleton's tensor metas, indexed by leaf), so its size
    grows with the blob's own fragments (docs/format.md, "Blob version 2").

    Example:
        >>> import torch
        >>> from zckpt.spec import Fragment, ZeroSpec
        >>> metas = [TensorMeta(torch.float32, (4,)), TensorMeta(torch.int8, (2,))]
        >>> obj = index_object_v2(0, ZeroSpec(1, 1), metas, 7, [(Fragment(1, 0, 2), [])], {}, 64)
        >>> obj["skeleton_digest"], bytes(obj["leaves"]["leaf"]), "skeleton" in obj
        (7, b'\\x01\\x00\\x00\\x00', False)
    """
    leaves = sorted({f.leaf for f, _ in fragments})
    return {
        "format": "zckpt",
        "version": 2,
        "rank": rank,
        "spec": spec.to_dict(),
        "skeleton_digest": digest,
        "leaves": leaf_columns(metas, leaves),
        "fragments": _wire_fragments(fragments),
        "extra": extra,
        "size": size,
    }


def shard_index(
    shard: Shard,
    fragments: list[tuple[Fragment, list[ChunkEntry]]],
    extra: dict[str, Any],
    size: int,
    version: int,
) -> dict[str, Any]:
    """A shard's index of blob ``version`` (1 or 2; version 2 binds it to the digest of the
    shard's skeleton)."""
    if version == 1:
        return index_object(shard.rank, shard.spec, shard.skeleton, fragments, extra, size)
    digest = skeleton_digest_of(shard.skeleton)
    metas = shard.skeleton.tensors
    return index_object_v2(shard.rank, shard.spec, metas, digest, fragments, extra, size)


def _wire_chunk(c: ChunkEntry) -> dict[str, Any]:
    m: dict[str, Any] = {
        "a": c.start_elem,
        "b": c.stop_elem,
        "c": c.codec,
        "o": c.offset,
        "n": c.length,
        "r": c.raw_length,
        "x": c.checksum,
    }
    if c.codec == BYTEPLANE:
        m["p"] = [list(p) for p in c.planes]
    return m


def pack_index(obj: dict[str, Any]) -> bytes:
    """The index map packed as msgpack (str as str, bytes as bin, floats as float64)."""
    return bytes(msgpack.packb(obj, use_bin_type=True))


# ---------------------------------------------------------------------------------- reading


def _unpack(index: memoryview, end: int) -> Any:
    n = len(index)
    try:
        return msgpack.unpackb(
            index,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n,
            max_map_len=n,
            max_ext_len=n,
        )
    except MemoryError:
        raise AllocationError(
            f"index (bytes [{PREAMBLE_SIZE}, {end})): out of memory unpacking {n} bytes of msgpack"
        ) from None
    except Exception as e:  # any failure to parse untrusted bytes is a format error
        raise FormatError(
            f"index (bytes [{PREAMBLE_SIZE}, {end})): malformed msgpack ({type(e).__name__}: {e})"
        ) from None


def _chunk(
    v: Any, where: str, pos: int, numel: int, itemsize: int, lo: int, size: int
) -> ChunkEntry:
    m = expect_map(v, where)
    a = expect_int(field(m, "a", where), f"{where} 'a'")
    b = expect_int(field(m, "b", where), f"{where} 'b'", 0, numel)
    if a != pos or b <= a:
        raise FormatError(
            f"{where}: element range [{a}, {b}) does not continue the chunks before it at {pos}"
        )
    where = f"{where} (elements [{a}, {b}) of the fragment)"
    codec = expect_int(field(m, "c", where), f"{where} codec")
    if codec > BYTEPLANE:
        raise FormatError(f"{where}: unknown codec {codec} (this reader knows 0, 1 and 2)")
    off = expect_int(field(m, "o", where), f"{where} offset", lo, size)
    n = expect_int(field(m, "n", where), f"{where} length", 1, size - off)
    raw = expect_int(field(m, "r", where), f"{where} raw length")
    x = expect_int(field(m, "x", where), f"{where} checksum")
    if off % ALIGN:
        raise FormatError(f"{where}: frame offset {off} is not a multiple of {ALIGN}")
    if raw != (b - a) * itemsize:
        raise FormatError(f"{where}: raw length {raw} is not {b - a} elements of {itemsize} bytes")
    planes: tuple[tuple[int, int], ...] = ()
    if codec == RAW and n != raw:
        raise FormatError(f"{where}: raw frame of {n} bytes holds {raw} bytes")
    if codec == ZSTD and raw > n * MAX_EXPANSION:
        raise FormatError(f"{where}: {n} zstd bytes cannot expand to {raw}")
    if codec == BYTEPLANE:
        table = []
        for i, p in enumerate(expect_list(field(m, "p", where), f"{where} planes", itemsize)):
            pw = f"{where} plane {i}"
            c, ln = expect_list(p, pw, 2)
            c, ln = expect_int(c, f"{pw} codec", RAW, ZSTD), expect_int(ln, f"{pw} length", 1, n)
            if (c == RAW and ln != b - a) or (c == ZSTD and b - a > ln * MAX_EXPANSION):
                raise FormatError(f"{pw}: {ln} stored bytes cannot hold {b - a} bytes")
            table.append((c, ln))
        if sum(ln for _, ln in table) != n:
            raise FormatError(f"{where}: plane lengths do not add up to the frame's {n} bytes")
        planes = tuple(table)
    return ChunkEntry(a, b, codec, off, n, raw, x, planes)


def _fragment(
    v: Any,
    i: int,
    meta_of: Callable[[int, str], TensorMeta],
    name_of: Callable[[int], str],
    lo: int,
    size: int,
) -> FragmentEntry:
    where = f"index 'fragments'[{i}]"
    m = expect_map(v, where)
    leaf = expect_int(field(m, "leaf", where), f"{where} leaf")
    meta = meta_of(leaf, where)
    start = expect_int(field(m, "start", where), f"{where} start", 0, meta.numel)
    stop = expect_int(field(m, "stop", where), f"{where} stop", 0, meta.numel)
    where = f"{where} ({name_of(leaf)} elements [{start}, {stop}))"
    if start >= stop:
        raise FormatError(f"{where}: empty or inverted element range")
    numel, itemsize = stop - start, ITEMSIZE[dtype_code(meta.dtype_name)]
    chunks: list[ChunkEntry] = []
    pos = 0
    for j, c in enumerate(expect_list(field(m, "chunks", where), f"{where} chunks")):
        chunks.append(_chunk(c, f"{where} chunk {j}", pos, numel, itemsize, lo, size))
        pos = chunks[-1].stop_elem
    if pos != numel:
        raise FormatError(f"{where}: chunks cover elements [0, {pos}) of its {numel}")
    return FragmentEntry(Fragment(leaf, start, stop), tuple(chunks))


def _check_extra(v: Any) -> dict[str, Any]:
    extra = expect_map(v, "index 'extra'")
    # Iterative and depth-bounded: msgpack nests up to 1023 deep, past Python's recursion limit,
    # and the caller gets this value (repr, ==, copy and pickle all recurse).
    problem = check_plain(extra)
    if problem is not None:
        raise FormatError(f"index 'extra': {problem}")
    return extra


def _check_layout(h: BlobHeader, blob_size: int | None) -> None:
    frames = sorted(
        (c.offset, c.length, i, j)
        for i, e in enumerate(h.fragments)
        for j, c in enumerate(e.chunks)
    )
    for (o1, n1, i1, j1), (o2, _, i2, j2) in itertools.pairwise(frames):
        if o1 + n1 > o2:
            raise FormatError(f"{h.describe(i2, j2)}: frame overlaps {h.describe(i1, j1)}")
    if blob_size is not None and blob_size < h.size:
        cut = [(i, j) for o, n, i, j in frames if o + n > blob_size]
        what = f"; first damaged: {h.describe(*cut[0])}" if cut else ""
        raise TruncatedError(
            f"rank {h.rank}: blob is {blob_size} bytes but its index declares {h.size}{what}"
        )
    if blob_size is not None and blob_size > h.size:
        raise FormatError(
            f"rank {h.rank}: {blob_size - h.size} unexpected bytes after the blob's declared "
            f"end at byte offset {h.size}"
        )


def parse_index(
    index: memoryview,
    index_size: int,
    blob_size: int | None,
    version: int = 1,
    skeleton: Skeleton | None = None,
) -> BlobHeader:
    """Validate an unpacked index against the blob's geometry and build its header
    (``version``: the preamble's; ``skeleton``, for a version 2 index, names its tensors in
    messages: it is checked by :func:`bind_skeleton`)."""
    obj = expect_map(_unpack(index, index_size), "index")
    if obj.get("format") != "zckpt":
        raise FormatError(f"index: 'format' is {show(obj.get('format'))}, expected 'zckpt'")
    got = expect_int(field(obj, "version", "index"), "index 'version'")
    if got != version:
        raise FormatError(f"index: version {got} disagrees with the preamble's ({version})")
    try:
        spec = ZeroSpec.from_dict(field(obj, "spec", "index"))
    except SpecError as e:  # from_dict raises nothing else, whatever the value
        raise FormatError(f"index 'spec': {e}") from None
    rank = expect_int(field(obj, "rank", "index"), "index 'rank'", 0, spec.world_size - 1)
    skel: Skeleton | None = None
    digest: int | None = None
    metas: dict[int, TensorMeta] | None = None
    if version == 1:
        skel = parse_skeleton(
            field(obj, "skeleton", "index"), parse_tensors(field(obj, "tensors", "index"))
        )
        tensors, name_of = skel.tensors, skel.name

        def meta_of(leaf: int, where: str) -> TensorMeta:
            return tensors[expect_int(leaf, f"{where} leaf", 0, len(tensors) - 1)]
    else:
        digest = expect_int(field(obj, "skeleton_digest", "index"), "index 'skeleton_digest'")
        own = leaf_metas_from_columns(field(obj, "leaves", "index"), "index 'leaves'")
        metas = own

        def name_of(leaf: int) -> str:
            if skeleton is not None and leaf < len(skeleton.tensors):
                return skeleton.name(leaf)
            return f"tensor leaf {leaf}"

        def meta_of(leaf: int, where: str) -> TensorMeta:
            meta = own.get(leaf)
            if meta is None:
                raise FormatError(
                    f"{where}: names tensor leaf {leaf}, which the index's 'leaves' do not list"
                )
            return meta

    data_offset = align(index_size)
    size = expect_int(field(obj, "size", "index"), "index 'size'", index_size)
    frags = expect_list(field(obj, "fragments", "index"), "index 'fragments'")
    fragments = tuple(
        _fragment(f, i, meta_of, name_of, data_offset, size) for i, f in enumerate(frags)
    )
    if metas is not None:
        held = {e.fragment.leaf for e in fragments}
        idle = [leaf for leaf in metas if leaf not in held]
        if idle:
            raise FormatError(
                f"index 'leaves': lists tensor leaf {idle[0]}, of which the blob holds no fragment"
            )
    extra = _check_extra(obj.get("extra", {}))
    h = BlobHeader(
        rank, spec, skel, fragments, extra, index_size, data_offset, size, version, digest, metas
    )
    _check_layout(h, blob_size)
    return h


def bind_skeleton(h: BlobHeader, skeleton: Skeleton) -> BlobHeader:
    """A version 2 header with ``skeleton`` (its checkpoint manifest's) as its own, once the
    blob's digest and every leaf column agree with it; a version 1 header as it is (it carries
    its own skeleton).

    Raises:
        FormatError: another skeleton's digest, a leaf past the skeleton's, or a leaf whose
            dtype or shape differs from the skeleton's (naming the rank and the tensor).

    Example:
        >>> import torch, zckpt
        >>> from zckpt.format import decode_header, encode_shard
        >>> s = {"w": torch.ones(4)}
        >>> shard = zckpt.shard_state(s, zckpt.plan_shards(s, zckpt.ZeroSpec(1, 1)), 0)
        >>> h = decode_header(encode_shard(shard, version=2))
        >>> bind_skeleton(h, shard.skeleton).describe(0)
        'rank 0: w elements [0, 4)'
        >>> other = zckpt.tree.flatten({"v": torch.ones(4)})[0]
        >>> bind_skeleton(h, other)
        Traceback (most recent call last):
        ...
        zckpt.errors.FormatError: rank 0: the blob's skeleton digest ... is not ...
    """
    if h.version == 1 or h.leaf_metas is None:
        return h
    want = skeleton_digest_of(skeleton)
    if h.digest != want:
        raise FormatError(
            f"rank {h.rank}: the blob's skeleton digest {h.digest or 0:#018x} is not that of the "
            f"skeleton it is read with ({want:#018x}): it was written for another state"
        )
    tensors = skeleton.tensors
    last = max(h.leaf_metas, default=-1)
    if last >= len(tensors):
        raise FormatError(
            f"rank {h.rank}: the blob lists tensor leaf {last}, the skeleton has {len(tensors)}"
        )
    for leaf, meta in h.leaf_metas.items():
        if tensors[leaf] != meta:
            raise FormatError(
                f"rank {h.rank}: tensor {skeleton.name(leaf)} is {meta} in the blob but "
                f"{tensors[leaf]} in the skeleton (the manifest's)"
            )
    return dataclasses.replace(h, skeleton=skeleton)


def decode_header(
    buf: bytes | bytearray | memoryview,
    *,
    blob_size: int | None = None,
    skeleton: Skeleton | None = None,
) -> BlobHeader:
    """Parse and validate a blob's header from its first :func:`read_header_size` bytes.

    Every size, offset and element range in the index is checked (against ``blob_size`` when
    given) before anything is allocated from it.

    Args:
        buf: the blob, or at least its preamble and index.
        blob_size: the blob's total size, if known; needed for the end-of-blob checks.
        skeleton: for a version 2 blob, which does not carry its skeleton: its checkpoint
            manifest's (``zckpt.open_checkpoint(path).manifest.skeleton``), checked against the
            blob's digest and leaf columns (:func:`bind_skeleton`) and then the header's. A
            version 1 blob carries its own and ignores it. Without it a version 2 header has
            ``skeleton`` None and names tensors by leaf index.

    Raises:
        FormatError: malformed or inconsistent index (naming the field and the tensor), or a
            ``skeleton`` the blob was not written with; ``ChecksumError`` if the index bytes
            are damaged, ``TruncatedError`` if they are missing, ``VersionError`` for a newer
            format.

    Example:
        >>> import torch, zckpt
        >>> from zckpt.format import encode_shard
        >>> s = {"w": torch.ones(4), "step": 3}
        >>> blob = encode_shard(zckpt.shard_state(s, zckpt.plan_shards(s, zckpt.ZeroSpec(1, 1)), 0))
        >>> h = decode_header(blob, blob_size=len(blob))
        >>> zckpt.tree.unflatten(h.skeleton, [None])["step"], h.size == len(blob)
        (3, True)
    """
    mv = as_bytes_view(buf)
    n_index, checksum = parse_preamble(mv, blob_size)
    end = PREAMBLE_SIZE + n_index
    if len(mv) < end:
        raise TruncatedError(
            f"the buffer holds {len(mv)} bytes but the header needs {end} "
            f"(bytes [0, {end}): preamble and index)"
        )
    index = mv[PREAMBLE_SIZE:end]
    check(index, checksum, f"index (bytes [{PREAMBLE_SIZE}, {end}))")
    h = parse_index(index, end, blob_size, preamble_version(mv), skeleton)
    return h if skeleton is None else bind_skeleton(h, skeleton)
