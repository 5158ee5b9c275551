"""The manifest: the file whose atomic appearance commits a tag.

Layout: 8-byte magic ``b"\\x89ZCKMAN\\n"``, u32 LE format version (1), u32 LE flags (0), u64 LE
body length, u64 LE xxh3_64 of the body, then the msgpack body (a map; see ``docs/layout.md``).
No pickle. A manifest that is missing, truncated or fails its checksum means the tag is not
committed.

A manifest is untrusted input (anyone can write a file with a valid checksum):
:func:`decode_manifest` checks it as a whole, in this one place, before anything uses it:
every field's type and range, file names of exactly the form zckpt writes (so nothing outside
the tag directory is ever opened), each record's rank and expert against its name and the spec,
every fragment against the skeleton, fragments that tile each tensor exactly once, and tensor
bytes that the recorded file sizes can hold.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from typing import Any

import msgpack
import xxhash

from zckpt.errors import FormatError, SpecError, VersionError
from zckpt.format import PREAMBLE_SIZE, skeleton_from_wire, skeleton_to_wire
from zckpt.format._codecs import MAX_EXPANSION
from zckpt.format._dtypes import ITEMSIZE, dtype_code
from zckpt.format._skeleton import U64, expect_int, expect_list, expect_map, field, show
from zckpt.spec import Fragment, ZeroSpec
from zckpt.store._layout import blob_name, client_name, expert_name
from zckpt.tree import Skeleton

__all__ = ["FileRecord", "Manifest", "decode_manifest", "encode_manifest"]


MAGIC = b"\x89ZCKMAN\n"
VERSION = 1
KNOWN_FLAGS = 0  # no must-understand flags exist in version 1
_PRE = struct.Struct("<8sIIQQ")
_MAX_BODY = 1 << 31
_NAME = re.compile(
    r"(?P<gen>[0-9a-f]{16})\.(?:rank(?P<rank>\d{5,8})-of-(?P<ws>\d{5,8})|expert(?P<e>\d{5,8})|client)\.zck"
)
_GEN = re.compile(r"[0-9a-f]{16}")


@dataclass(frozen=True)
class FileRecord:
    """One durable blob of a save: which rank wrote it, its size and checksums, what it holds.

    ``xxh3`` is the hash of the whole file (what ``zckpt verify`` recomputes); ``index_xxh3``
    the checksum of its index as its preamble records it, which binds the file to this
    manifest at the cost of reading the header: a file from another checkpoint, even with the
    same layout, has other chunk checksums and so another index checksum. None in manifests
    written before zckpt recorded it.

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
    index_xxh3: int | None = None

    def to_obj(self) -> dict[str, Any]:
        """msgpack form."""
        obj: dict[str, Any] = {
            "name": self.name,
            "rank": self.rank,
            "size": self.size,
            "xxh3": self.xxh3,
            "fragments": [list(f) for f in self.fragments],
            "expert": self.expert,
        }
        if self.index_xxh3 is not None:
            obj["index_xxh3"] = self.index_xxh3
        return obj

    @staticmethod
    def from_obj(d: Any, where: str = "file record") -> FileRecord:
        """Parse :meth:`to_obj` output, checking each field's type and range (not the
        cross-references, which :func:`decode_manifest` checks)."""
        m = expect_map(d, where)
        name = field(m, "name", where)
        if type(name) is not str:
            raise FormatError(f"{where}: 'name' must be a string, got {show(name)}")
        where = f"{where} {name!r}"
        frags = []
        for i, f in enumerate(expect_list(field(m, "fragments", where), f"{where} fragments")):
            a, b, c = expect_list(f, f"{where} fragment {i}", 3)
            fw = f"{where} fragment {i}"
            frags.append(Fragment(expect_int(a, fw), expect_int(b, fw), expect_int(c, fw)))
        ix = m.get("index_xxh3")
        return FileRecord(
            name,
            expect_int(field(m, "rank", where), f"{where} rank", -1, 1 << 24),
            expect_int(field(m, "size", where), f"{where} size", 0, 1 << 62),
            expect_int(field(m, "xxh3", where), f"{where} xxh3", 0, U64),
            tuple(frags),
            expect_int(m.get("expert", -1), f"{where} expert", -1, 1 << 24),
            None if ix is None else expect_int(ix, f"{where} index_xxh3", 0, U64),
        )


@dataclass(frozen=True)
class Manifest:
    """What a committed tag holds.

    Example:
        >>> import torch, zckpt
        >>> skel, _ = zckpt.tree.flatten({"w": torch.zeros(2)})
        >>> m = Manifest("t", "0" * 16, 1.0, ZeroSpec(1, 1), skel, (), None, (), False, "0.1.0")
        >>> decode_manifest(encode_manifest(m), check=False).tag
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


def _string(v: Any, where: str, limit: int = 4096) -> str:
    if type(v) is not str or len(v) > limit:
        raise FormatError(
            f"{where}: expected a string of at most {limit} characters, got {show(v)}"
        )
    return v


def _unpack(body: bytes, where: str) -> dict[str, Any]:
    n = len(body)
    try:
        d = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=False,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n,
            max_map_len=n,
            max_ext_len=n,
        )
    except Exception as e:  # any failure to parse untrusted bytes is a format error
        raise FormatError(f"{where}: malformed manifest body ({type(e).__name__}: {e})") from None
    return expect_map(d, f"{where}: body")


def _check_name(rec: FileRecord, m: Manifest, where: str, client: bool) -> None:
    """The record's name is exactly the one zckpt writes for it in this generation."""
    got = _NAME.fullmatch(rec.name)
    if got is None or got.group("gen") != m.generation:
        raise FormatError(
            f"{where}: file name {rec.name!r} is not a zckpt blob name of generation "
            f"{m.generation} (only such names inside the tag directory are ever opened)"
        )
    ws = m.spec.world_size
    if client:
        expected = client_name(m.generation)
        if rec.rank != -1 or rec.expert != -1:
            raise FormatError(f"{where}: the client file has rank {rec.rank}")
    elif not 0 <= rec.rank < ws:
        raise FormatError(f"{where}: rank {rec.rank} is outside world size {ws}")
    elif rec.expert == -1:
        expected = blob_name(m.generation, rec.rank, ws)
    elif not m.spec.experts:
        raise FormatError(f"{where}: an expert file, but the spec declares no experts")
    else:
        expected = expert_name(m.generation, rec.expert)
    if rec.name != expected:
        raise FormatError(
            f"{where}: file name {rec.name!r} does not match its record (rank {rec.rank} of "
            f"{ws}, expert {rec.expert}): zckpt names it {expected!r}"
        )


def _check_fragments(rec: FileRecord, skel: Skeleton, where: str) -> int:
    """Each fragment lies inside its tensor; the file's size can hold their bytes. Returns
    the bytes they declare."""
    nbytes = 0
    for f in rec.fragments:
        if f.leaf >= len(skel.tensors):
            raise FormatError(
                f"{where}: fragment {list(f)} names tensor leaf {f.leaf}, the skeleton has "
                f"{len(skel.tensors)}"
            )
        meta = skel.tensors[f.leaf]
        if not f.start < f.stop <= meta.numel:
            raise FormatError(
                f"{where}: fragment [{f.start}, {f.stop}) of {skel.name(f.leaf)} is empty or "
                f"outside its {meta.numel} elements"
            )
        nbytes += (f.stop - f.start) * ITEMSIZE[dtype_code(meta.dtype)]
    if rec.size < PREAMBLE_SIZE + 1:
        raise FormatError(f"{where}: size {rec.size} is too small for a zckpt blob")
    if nbytes > rec.size * MAX_EXPANSION:
        raise FormatError(
            f"{where}: its fragments declare {nbytes} tensor bytes, more than a {rec.size}-byte "
            "file can hold"
        )
    return nbytes


def _check_tiling(m: Manifest, where: str) -> None:
    """Every tensor's saved fragments tile its elements exactly once (a zckpt save writes each
    element once; excluded frozen parameters are not in the skeleton)."""
    by_leaf: dict[int, list[tuple[int, int, str]]] = {}
    for rec in m.files:
        for f in rec.fragments:
            by_leaf.setdefault(f.leaf, []).append((f.start, f.stop, rec.name))
    skel = m.skeleton
    for leaf, meta in enumerate(skel.tensors):
        pos = 0
        for a, b, name in sorted(by_leaf.get(leaf, ())):
            if a != pos:
                what = "overlap" if a < pos else "leave a gap"
                raise FormatError(
                    f"{where}: the saved fragments of {skel.name(leaf)} {what} at element "
                    f"{min(a, pos)} (in {name})"
                )
            pos = b
        if pos != meta.numel:
            raise FormatError(
                f"{where}: {skel.name(leaf)} has {meta.numel} elements, the files hold [0, {pos})"
            )


def decode_manifest(data: bytes, where: str = "manifest", *, check: bool = True) -> Manifest:
    """Parse and validate manifest bytes; any defect is a :class:`FormatError` naming ``where``.

    ``check=False`` skips the checks that need the files (tiling of every tensor), for
    manifests built by hand in tests and examples.
    """
    if len(data) < _PRE.size:
        raise FormatError(f"{where}: {len(data)} bytes is too short for a manifest")
    magic, version, flags, n, digest = _PRE.unpack_from(data)
    if magic != MAGIC:
        raise FormatError(f"{where}: not a zckpt manifest (bad magic at byte 0)")
    if version > VERSION:
        raise VersionError(
            f"{where}: manifest format {version} is newer than this zckpt ({VERSION}); "
            "upgrade zckpt"
        )
    if version != VERSION:
        raise FormatError(f"{where}: byte 8: manifest format {version} does not exist")
    if flags & ~KNOWN_FLAGS:
        raise VersionError(f"{where}: byte 12: unknown must-understand flags {flags:#x}")
    body = data[_PRE.size :]
    if n > _MAX_BODY or len(body) != n:
        raise FormatError(f"{where}: body is {len(body)} bytes, the preamble says {n}")
    if xxhash.xxh3_64_intdigest(body) != digest:
        raise FormatError(f"{where}: checksum mismatch in the body (byte {_PRE.size} on)")
    d = _unpack(body, where)
    fmt = field(d, "format", where)
    if fmt != VERSION or type(fmt) is not int:
        raise FormatError(f"{where}: 'format' is {show(fmt)}, the preamble says {VERSION}")
    try:
        spec = ZeroSpec.from_dict(field(d, "spec", where))
    except SpecError as e:
        raise FormatError(f"{where}: 'spec': {e}") from None
    except FormatError:
        raise
    except Exception as e:  # from_dict of untrusted input
        raise FormatError(f"{where}: 'spec' is malformed ({type(e).__name__}: {e})") from None
    try:
        skeleton = skeleton_from_wire(field(d, "skeleton", where))
    except FormatError as e:
        raise FormatError(f"{where}: 'skeleton': {e}") from None
    committed_at = field(d, "committed_at", where)
    if type(committed_at) not in (int, float) or not math.isfinite(committed_at):
        raise FormatError(f"{where}: 'committed_at' is {show(committed_at)}, not a time")
    generation = _string(field(d, "generation", where), f"{where} 'generation'")
    if not _GEN.fullmatch(generation):
        raise FormatError(f"{where}: 'generation' {show(generation)} is not 16 hex digits")
    frozen = tuple(
        _string(x, f"{where} 'frozen'")
        for x in expect_list(d.get("frozen", []), f"{where} 'frozen'")
    )
    excluded = d.get("excluded_frozen", False)
    if type(excluded) is not bool:
        raise FormatError(f"{where}: 'excluded_frozen' is {show(excluded)}, not a bool")
    files = tuple(
        FileRecord.from_obj(f, f"{where} file {i}")
        for i, f in enumerate(expect_list(field(d, "files", where), f"{where} 'files'"))
    )
    client_obj = field(d, "client", where)
    m = Manifest(
        tag=_string(field(d, "tag", where), f"{where} 'tag'"),
        generation=generation,
        committed_at=float(committed_at),
        spec=spec,
        skeleton=skeleton,
        files=files,
        client=None if client_obj is None else FileRecord.from_obj(client_obj, f"{where} client"),
        frozen=frozen,
        excluded_frozen=excluded,
        zckpt_version=_string(d.get("zckpt_version", "?"), f"{where} 'zckpt_version'"),
    )
    names: set[str] = set()
    for rec in m.files:
        if rec.name in names:
            raise FormatError(f"{where}: file {rec.name!r} is listed twice")
        names.add(rec.name)
        _check_name(rec, m, f"{where} file {rec.name!r}", client=False)
        _check_fragments(rec, skeleton, f"{where} file {rec.name!r}")
    if m.client is not None:
        _check_name(m.client, m, f"{where} client", client=True)
        if m.client.fragments and m.client.size < PREAMBLE_SIZE + 1:
            raise FormatError(f"{where}: client file of {m.client.size} bytes")
    if check:
        _check_tiling(m, where)
    return m
