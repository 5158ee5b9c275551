"""The manifest: the file whose atomic appearance commits a tag.

Layout: 8-byte magic ``b"\\x89ZCKMAN\\n"``, u32 LE format version (1), u32 LE flags (0), u64 LE
body length, u64 LE xxh3_64 of the body, then the msgpack body (a map; see ``docs/layout.md``).
No pickle. A manifest that is missing, truncated or fails its checksum means the tag is not
committed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack
import xxhash

from zckpt.errors import FormatError, VersionError
from zckpt.format import skeleton_from_wire, skeleton_to_wire
from zckpt.spec import Fragment, ZeroSpec
from zckpt.tree import Skeleton

__all__ = ["FileRecord", "Manifest", "decode_manifest", "encode_manifest"]


MAGIC = b"\x89ZCKMAN\n"
VERSION = 1
_PRE = struct.Struct("<8sIIQQ")
_MAX_BODY = 1 << 31


@dataclass(frozen=True)
class FileRecord:
    """One durable blob of a save: which rank wrote it, its size and checksum, what it holds.

    Example:
        >>> FileRecord("g.rank00000-of-00001.zck", 0, 100, 7, (Fragment(0, 0, 4),)).rank
        0
    """

    name: str
    rank: int
    size: int
    xxh3: int
    fragments: tuple[Fragment, ...]
    expert: int = -1

    def to_obj(self) -> dict[str, Any]:
        """msgpack form."""
        return {
            "name": self.name,
            "rank": self.rank,
            "size": self.size,
            "xxh3": self.xxh3,
            "fragments": [list(f) for f in self.fragments],
            "expert": self.expert,
        }

    @staticmethod
    def from_obj(d: Any) -> FileRecord:
        """Parse :meth:`to_obj` output."""
        return FileRecord(
            str(d["name"]),
            int(d["rank"]),
            int(d["size"]),
            int(d["xxh3"]),
            tuple(Fragment(int(a), int(b), int(c)) for a, b, c in d["fragments"]),
            int(d.get("expert", -1)),
        )


@dataclass(frozen=True)
class Manifest:
    """What a committed tag holds.

    Example:
        >>> import torch, zckpt
        >>> skel, _ = zckpt.tree.flatten({"w": torch.zeros(2)})
        >>> m = Manifest("t", "0" * 16, 1.0, ZeroSpec(1, 1), skel, (), None, (), False, "0.1.0")
        >>> decode_manifest(encode_manifest(m)).tag
        't'
    """

    tag: str
    generation: str
    committed_at: float
    spec: ZeroSpec
    skeleton: Skeleton
    files: tuple[FileRecord, ...]
    client: FileRecord | None
    frozen: tuple[str, ...]
    excluded_frozen: bool
    zckpt_version: str


def encode_manifest(m: Manifest) -> bytes:
    """Manifest bytes: preamble + msgpack body."""
    body: bytes = msgpack.packb(
        {
            "format": VERSION,
            "zckpt_version": m.zckpt_version,
            "tag": m.tag,
            "generation": m.generation,
            "committed_at": m.committed_at,
            "spec": m.spec.to_dict(),
            "skeleton": skeleton_to_wire(m.skeleton),
            "files": [f.to_obj() for f in m.files],
            "client": None if m.client is None else m.client.to_obj(),
            "frozen": list(m.frozen),
            "excluded_frozen": m.excluded_frozen,
        },
        use_bin_type=True,
    )
    return _PRE.pack(MAGIC, VERSION, 0, len(body), xxhash.xxh3_64_intdigest(body)) + body


def decode_manifest(data: bytes, where: str = "manifest") -> Manifest:
    """Parse and verify manifest bytes; any defect is a :class:`FormatError` naming ``where``."""
    if len(data) < _PRE.size:
        raise FormatError(f"{where}: {len(data)} bytes is too short for a manifest")
    magic, version, _flags, n, digest = _PRE.unpack_from(data)
    if magic != MAGIC:
        raise FormatError(f"{where}: not a zckpt manifest (bad magic at byte 0)")
    if version > VERSION:
        raise VersionError(
            f"{where}: manifest format {version} is newer than this zckpt ({VERSION})"
        )
    body = data[_PRE.size :]
    if n > _MAX_BODY or len(body) != n:
        raise FormatError(f"{where}: body is {len(body)} bytes, the preamble says {n}")
    if xxhash.xxh3_64_intdigest(body) != digest:
        raise FormatError(f"{where}: checksum mismatch in the body (byte {_PRE.size} on)")
    try:
        d = msgpack.unpackb(body, raw=False, strict_map_key=False)
        return Manifest(
            tag=str(d["tag"]),
            generation=str(d["generation"]),
            committed_at=float(d["committed_at"]),
            spec=ZeroSpec.from_dict(d["spec"]),
            skeleton=skeleton_from_wire(d["skeleton"]),
            files=tuple(FileRecord.from_obj(f) for f in d["files"]),
            client=None if d["client"] is None else FileRecord.from_obj(d["client"]),
            frozen=tuple(str(x) for x in d.get("frozen", ())),
            excluded_frozen=bool(d.get("excluded_frozen", False)),
            zckpt_version=str(d.get("zckpt_version", "?")),
        )
    except FormatError:
        raise
    except (KeyError, TypeError, ValueError, msgpack.UnpackException) as e:
        raise FormatError(f"{where}: malformed manifest body: {e!r}") from None
