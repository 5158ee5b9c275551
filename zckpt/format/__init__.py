"""The on-disk blob (pure): one rank's shard as bytes, and back. Specified in docs/format.md.

A blob is a 32-byte preamble (magic, version, flags, index length and checksum), a msgpack index
(skeleton, spec, fragments, and for every chunk its codec, offset, lengths and xxh3 checksum) and
64-byte aligned frames holding the tensor bytes, raw, zstd-compressed or split into byte planes.
A version 2 index (written by saves into large checkpoints) replaces the skeleton by its digest
and the dtypes and shapes of the blob's own tensors; the skeleton is in the manifest.
No pickle: decoding an untrusted blob can only raise a :class:`~zckpt.FormatError`.

Example:
    >>> import torch, zckpt
    >>> from zckpt.format import decode_shard, encode_shard
    >>> state = {"master": {"w": torch.randn(100)}, "step": 3}
    >>> shard = zckpt.shard_state(state, zckpt.plan_shards(state, zckpt.ZeroSpec(2, 2)), 1)
    >>> back = decode_shard(encode_shard(shard, codec="byteplane"))
    >>> back.fragments == shard.fragments, torch.equal(back.data[0], shard.data[0])
    (True, True)
"""

from typing import TYPE_CHECKING

from zckpt._lazy import attach

if TYPE_CHECKING:
    from zckpt.format._decode import decode_fragment, decode_shard, iter_problems, verify_blob
    from zckpt.format._encode import EncodedShard, encode_shard, encode_shard_parts
    from zckpt.format._header import (
        FORMAT_VERSION,
        FORMAT_VERSIONS,
        MAGIC,
        PREAMBLE_SIZE,
        BlobHeader,
        ChunkEntry,
        FragmentEntry,
        read_header_size,
    )
    from zckpt.format._index import decode_header
    from zckpt.format._skeleton import skeleton_from_wire, skeleton_to_wire
    from zckpt.format._stream import BlobStream, encode_shard_stream

__getattr__, __dir__ = attach(
    __name__,
    {
        "zckpt.format._decode": (
            "decode_fragment",
            "decode_shard",
            "iter_problems",
            "verify_blob",
        ),
        "zckpt.format._encode": (
            "EncodedShard",
            "encode_shard",
            "encode_shard_parts",
        ),
        "zckpt.format._header": (
            "FORMAT_VERSION",
            "FORMAT_VERSIONS",
            "MAGIC",
            "PREAMBLE_SIZE",
            "BlobHeader",
            "ChunkEntry",
            "FragmentEntry",
            "read_header_size",
        ),
        "zckpt.format._index": ("decode_header",),
        "zckpt.format._skeleton": (
            "skeleton_from_wire",
            "skeleton_to_wire",
        ),
        "zckpt.format._stream": (
            "BlobStream",
            "encode_shard_stream",
        ),
    },
)

__all__ = [
    "FORMAT_VERSION",
    "FORMAT_VERSIONS",
    "MAGIC",
    "PREAMBLE_SIZE",
    "BlobHeader",
    "BlobStream",
    "ChunkEntry",
    "EncodedShard",
    "FragmentEntry",
    "decode_fragment",
    "decode_header",
    "decode_shard",
    "encode_shard",
    "encode_shard_parts",
    "encode_shard_stream",
    "iter_problems",
    "read_header_size",
    "skeleton_from_wire",
    "skeleton_to_wire",
    "verify_blob",
]
