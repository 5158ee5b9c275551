"""The blob header: fixed preamble, msgpack index, and the immutable :class:`BlobHeader` value.

Layout (docs/format.md): a 32-byte preamble (magic, version, flags, index length, index xxh3),
the msgpack index, zero padding to a 64-byte boundary, then the frames.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, NamedTuple

from zckpt.errors import FormatError, TruncatedError, VersionError
from zckpt.spec import Fragment, ZeroSpec
from zckpt.tree import Skeleton, TensorMeta

__all__ = [
    "ALIGN",
    "FORMAT_VERSION",
    "FORMAT_VERSIONS",
    "MAGIC",
    "PREAMBLE_SIZE",
    "BlobHeader",
    "ChunkEntry",
    "FragmentEntry",
    "align",
    "as_bytes_view",
    "pack_preamble",
    "parse_preamble",
    "read_header_size",
]

# PNG-style magic: a high-bit byte catches 7-bit channels, CR LF catches newline conversion
# either way, ^Z stops a DOS `type`, and the final LF catches LF -> CRLF.
MAGIC = b"\x89ZCK\r\n\x1a\n"
FORMAT_VERSION = 2  # the newest blob version this zckpt reads and writes
FORMAT_VERSIONS = (1, 2)  # every version it reads (version 1: the index carries the skeleton)
_PREAMBLE = struct.Struct("<8sIIQQ")
PREAMBLE_SIZE: int = _PREAMBLE.size
ALIGN = 64
KNOWN_FLAGS = 0  # no must-understand feature flags exist in versions 1 and 2
MAX_INDEX = 1 << 32  # an index past 4 GiB is corruption, not a checkpoint


def align(n: int) -> int:
    """``n`` rounded up to the frame alignment (64 bytes).

    Example:
        >>> align(32), align(64), align(65)
        (64, 64, 128)
    """
    return -(-n // ALIGN) * ALIGN


class ChunkEntry(NamedTuple):
    """One chunk of a fragment: elements ``[start_elem, stop_elem)`` relative to the fragment,
    stored as one frame of ``length`` bytes at absolute byte ``offset``.

    ``checksum`` is the xxh3_64 of the stored bytes; ``planes`` lists ``(codec, length)`` per
    byte plane for the byteplane codec (empty otherwise).

    Example:
        >>> c = ChunkEntry(0, 16, 0, 64, 64, 64, 0, ())
        >>> c.stop_elem - c.start_elem
        16
    """

    start_elem: int
    stop_elem: int
    codec: int
    offset: int
    length: int
    raw_length: int
    checksum: int
    planes: tuple[tuple[int, int], ...] = ()


class FragmentEntry(NamedTuple):
    """A fragment of a tensor leaf and the chunks that tile it, in element order.

    Example:
        >>> e = FragmentEntry(Fragment(0, 0, 16), (ChunkEntry(0, 16, 0, 64, 64, 64, 0),))
        >>> e.fragment.numel, len(e.chunks)
        (16, 1)
    """

    fragment: Fragment
    chunks: tuple[ChunkEntry, ...]


@dataclass(frozen=True)
class BlobHeader:
    """Everything a blob says about itself, without its tensor bytes.

    ``index_size`` is the number of leading bytes holding the preamble and index,
    ``data_offset`` where frames may start (``index_size`` rounded up to 64) and ``size`` the
    blob's total length.

    A version 1 blob carries its skeleton. A version 2 blob (what saves into large
    checkpoints write) carries only ``digest``, the columnar skeleton's digest, and
    ``leaf_metas``, the dtype and shape of each tensor leaf it holds fragments of; its
    ``skeleton`` is the one passed to :func:`~zckpt.format.decode_header` (checked against
    both), else None. :meth:`meta` and :meth:`name` work either way.

    Example:
        >>> import torch, zckpt
        >>> from zckpt.format import decode_header, encode_shard
        >>> s = {"master": {"w": torch.ones(8)}}
        >>> shard = zckpt.shard_state(s, zckpt.plan_shards(s, zckpt.ZeroSpec(2, 1)), 1)
        >>> h = decode_header(encode_shard(shard))
        >>> h.rank, h.fragments[0].fragment, h.describe(0)
        (1, Fragment(leaf=0, start=4, stop=8), 'rank 1: master/w elements [4, 8)')
        >>> h2 = decode_header(encode_shard(shard, version=2))
        >>> h2.skeleton is None, h2.meta(0), h2.describe(0)
        (True, TensorMeta(dtype=torch.float32, shape=(8,)), 'rank 1: tensor leaf 0 elements [4, 8)')
    """

    rank: int
    spec: ZeroSpec
    skeleton: Skeleton | None
    fragments: tuple[FragmentEntry, ...]
    extra: dict[str, Any]
    index_size: int
    data_offset: int
    size: int
    version: int = 1
    digest: int | None = None
    leaf_metas: dict[int, TensorMeta] | None = None

    def meta(self, leaf: int) -> TensorMeta:
        """The dtype and shape of tensor leaf ``leaf`` (of one the blob holds, for version 2).

        Example:
            >>> import torch, zckpt
            >>> from zckpt.format import decode_header, encode_shard
            >>> s = {"w": torch.ones(2, 3)}
            >>> shard = zckpt.shard_state(s, zckpt.plan_shards(s, zckpt.ZeroSpec(1, 1)), 0)
            >>> decode_header(encode_shard(shard, version=2)).meta(0).shape
            (2, 3)
        """
        if self.leaf_metas is not None:
            return self.leaf_metas[leaf]
        if self.skeleton is None:  # unreachable: the parser gives every header one of them
            raise KeyError(leaf)
        return self.skeleton.tensors[leaf]

    def name(self, leaf: int) -> str:
        """Tensor leaf ``leaf``'s path for messages (``tensor leaf N`` without a skeleton)."""
        return f"tensor leaf {leaf}" if self.skeleton is None else self.skeleton.name(leaf)

    def describe(self, index: int, chunk: int | None = None) -> str:
        """Name fragment ``index`` (and one of its chunks) for messages: tensor path, element
        range in tensor coordinates, and the frame's byte offset.

        Example:
            >>> import torch, zckpt
            >>> from zckpt.format import decode_header, encode_shard
            >>> s = {"m": torch.ones(8)}
            >>> shard = zckpt.shard_state(s, zckpt.plan_shards(s, zckpt.ZeroSpec(1, 3)), 0)
            >>> decode_header(encode_shard(shard, chunk_bytes=16)).describe(0, 1)
            'rank 0: m elements [4, 8) (chunk 1 of fragment 0, frame at byte offset ..., 16 bytes)'
        """
        f, chunks = self.fragments[index]
        name = self.name(f.leaf)
        if chunk is None:
            return f"rank {self.rank}: {name} elements [{f.start}, {f.stop})"
        c = chunks[chunk]
        return (
            f"rank {self.rank}: {name} elements [{f.start + c.start_elem}, {f.start + c.stop_elem})"
            f" (chunk {chunk} of fragment {index}, frame at byte offset {c.offset},"
            f" {c.length} bytes)"
        )


def as_bytes_view(data: Any) -> memoryview:
    """A flat byte view of any contiguous buffer (bytes, bytearray, memoryview, mmap, ndarray)."""
    try:
        mv = memoryview(data)
    except TypeError:
        raise TypeError(f"expected a bytes-like object, got {type(data).__name__}") from None
    if not mv.c_contiguous:
        raise TypeError("expected a contiguous buffer")
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


def pack_preamble(index: bytes, checksum: int, version: int = 1) -> bytes:
    """The 32-byte preamble for an index of these bytes and checksum."""
    return _PREAMBLE.pack(MAGIC, version, 0, len(index), checksum)


def _magic_hint(head: bytes) -> str:
    if head.startswith(b"\x89ZCK\n"):
        return " (CR LF became LF: copied in text mode?)"
    if head.startswith(b"\x89ZCK\r\r\n") or head.startswith(b"\x89ZCK\r\n\x1a\r\n"):
        return " (LF became CR LF: copied in text mode?)"
    if head[:1] == b"\x09" and head[1:4] == b"ZCK":
        return " (the high bit was stripped: copied over a 7-bit channel?)"
    return ""


def preamble_version(mv: memoryview) -> int:
    """The version field of a preamble already checked by :func:`parse_preamble`."""
    version: int = _PREAMBLE.unpack_from(mv, 0)[1]
    return version


def parse_preamble(mv: memoryview, blob_size: int | None) -> tuple[int, int]:
    """Validate the preamble; return (index length, index checksum)."""
    have = len(mv) if blob_size is None else min(len(mv), blob_size)
    if have < PREAMBLE_SIZE:
        raise TruncatedError(
            f"blob of {have} bytes is shorter than the {PREAMBLE_SIZE}-byte zckpt preamble"
        )
    magic, version, flags, n_index, checksum = _PREAMBLE.unpack_from(mv, 0)
    if magic != MAGIC:
        raise FormatError(
            f"byte offset 0: not a zckpt blob (magic {magic!r}, expected {MAGIC!r})"
            + _magic_hint(bytes(mv[:16]))
        )
    if version not in FORMAT_VERSIONS:
        raise VersionError(
            f"byte offset 8: format version {version} is not supported by this reader "
            f"(it reads versions {', '.join(map(str, FORMAT_VERSIONS))}); upgrade zckpt"
        )
    if flags & ~KNOWN_FLAGS:
        raise VersionError(
            f"byte offset 12: unknown must-understand flags {flags:#x}; upgrade zckpt"
        )
    if not 0 < n_index <= MAX_INDEX:
        raise FormatError(f"byte offset 16: index length {n_index} is out of range")
    if blob_size is not None and PREAMBLE_SIZE + n_index > blob_size:
        raise TruncatedError(
            f"byte offset 16: index length {n_index} runs past the end of the {blob_size}-byte "
            f"blob (the index would be bytes [{PREAMBLE_SIZE}, {PREAMBLE_SIZE + n_index}))"
        )
    return int(n_index), int(checksum)


def read_header_size(
    preamble: bytes | bytearray | memoryview, *, blob_size: int | None = None
) -> int:
    """How many leading bytes hold the preamble and index (what :func:`decode_header` needs).

    Pass ``blob_size`` whenever it is known: the index length is the blob's own claim (up to
    4 GiB), and it is checked against ``blob_size`` here, before a caller reads or allocates
    that many bytes.

    Args:
        preamble: at least the first :data:`PREAMBLE_SIZE` bytes of a blob.
        blob_size: the blob's total size, if known (a header running past it is truncated).

    Raises:
        FormatError: bad magic or index length; ``VersionError`` for a newer format;
            ``TruncatedError`` for fewer than :data:`PREAMBLE_SIZE` bytes, or an index that
            would end past ``blob_size`` (naming the index length field).

    Example:
        >>> import torch, zckpt
        >>> from zckpt.format import PREAMBLE_SIZE, decode_header, encode_shard
        >>> s = {"w": torch.ones(4)}
        >>> blob = encode_shard(zckpt.shard_state(s, zckpt.plan_shards(s, zckpt.ZeroSpec(1, 1)), 0))
        >>> n = read_header_size(blob[:PREAMBLE_SIZE], blob_size=len(blob))
        >>> decode_header(blob[:n]).fragments[0].fragment.numel
        4
        >>> read_header_size(blob[:PREAMBLE_SIZE], blob_size=100)
        Traceback (most recent call last):
        ...
        zckpt.errors.TruncatedError: byte offset 16: index length ... runs past the end of the ...
    """
    n_index, _ = parse_preamble(as_bytes_view(preamble), blob_size)
    return PREAMBLE_SIZE + n_index
