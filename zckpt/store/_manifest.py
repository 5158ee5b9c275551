"""The manifest: the file whose atomic appearance commits a tag.

Layout: 8-byte magic ``b"\\x89ZCKMAN\\n"``, u32 LE format version (1 or 2), u32 LE flags (0),
u64 LE body length, u64 LE xxh3_64 of the body, then the msgpack body (a map; see
``docs/layout.md`` and ``docs/format.md``, "Manifest v2"). No pickle. A manifest that is missing,
truncated or fails its checksum means the tag is not committed.

Version 2 grows with ranks plus tensors: the skeleton in the columnar form, per rank file only
its size and hashes (packed arrays; names and fragments follow from the spec's plan), per expert
file the same, and explicit fragment lists only for files whose fragments are not the plan's.
Version 1 (every file's every fragment, one map per skeleton node) is still read, and still
written for small checkpoints (fewer than :data:`V2_MIN_FRAGMENTS` rank-tensor pairs), which
older zckpt releases can then read.

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
from typing import TYPE_CHECKING, Any

import msgpack
import xxhash

from zckpt._lazy import lazy_module
from zckpt.errors import FormatError, SpecError, VersionError
from zckpt.format import PREAMBLE_SIZE, skeleton_from_wire, skeleton_to_wire
from zckpt.format._codecs import MAX_EXPANSION
from zckpt.format._columns import skeleton_from_columns, skeleton_to_columns
from zckpt.format._dtypes import ITEMSIZE, dtype_code
from zckpt.format._skeleton import expect_list, expect_map, field, show
from zckpt.spec import Fragment, ShardPlan, ZeroSpec, plan_shards
from zckpt.store._layout import blob_name, client_name, expert_name
from zckpt.store._records import (
    DerivedFragments,
    FileRecord,
    Manifest,
    derived_fragments,
    file_report,
)
from zckpt.tree import Skeleton, _gc_paused

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")  # version 2 manifests only: reading a v1 one needs none

__all__ = [
    "DerivedFragments",
    "FileRecord",
    "Manifest",
    "check_tiling",
    "decode_manifest",
    "derived_fragments",
    "encode_manifest",
    "file_report",
    "writes_v2",
]


MAGIC = b"\x89ZCKMAN\n"
VERSION = 2  # the newest this zckpt reads and writes
KNOWN_FLAGS = 0  # no must-understand flags exist in versions 1 and 2
# A manifest is written as version 2 when world size x tensors reaches this (a v1 manifest lists
# about that many fragments at stage 3); smaller ones stay version 1, readable by older zckpt.
V2_MIN_FRAGMENTS = 1 << 16
_PRE = struct.Struct("<8sIIQQ")
_MAX_BODY = 1 << 31
_NAME = re.compile(
    r"(?P<gen>[0-9a-f]{16})\.(?:rank(?P<rank>\d{5,8})-of-(?P<ws>\d{5,8})|expert(?P<e>\d{5,8})|client)\.zck"
)
_GEN = re.compile(r"[0-9a-f]{16}")


def writes_v2(spec: ZeroSpec, skeleton: Skeleton) -> bool:
    """Whether a save of ``skeleton`` under ``spec`` writes format version 2: the manifest
    (:func:`encode_manifest`) and its rank and expert blobs (``save_checkpoint``), decided
    here once for both. True when world size x tensors reaches :data:`V2_MIN_FRAGMENTS`.

    Example:
        >>> import torch, zckpt
        >>> skel = zckpt.tree.flatten({"w": torch.zeros(4)})[0]
        >>> writes_v2(ZeroSpec(2, 3), skel), writes_v2(ZeroSpec(1 << 16, 3), skel)
        (False, True)
    """
    return spec.world_size * max(1, len(skeleton.tensors)) >= V2_MIN_FRAGMENTS


def encode_manifest(m: Manifest, version: int | None = None) -> bytes:
    """Manifest bytes: preamble + msgpack body.

    ``version`` 1 or 2; default: 2 when world size x tensors is at least
    :data:`V2_MIN_FRAGMENTS`, else 1.
    """
    if version is None:
        version = 2 if writes_v2(m.spec, m.skeleton) and _fits_v2(m) else 1
    if version == 2:
        return _encode_v2(m)
    if version != 1:
        raise ValueError(f"manifest version {version} does not exist")
    body: bytes = msgpack.packb(
        {
            "format": 1,
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
    return _PRE.pack(MAGIC, 1, 0, len(body), xxhash.xxh3_64_intdigest(body)) + body


def _fits_v2(m: Manifest) -> bool:
    """Whether version 2 can record these files: one blob per rank, with its index checksum,
    and exactly the plan's expert files (other layouts are written as version 1)."""
    ranks = [f.rank for f in m.files if f.expert < 0]
    if ranks != list(range(m.spec.world_size)) or any(f.index_xxh3 is None for f in m.files):
        return False
    experts = [f for f in m.files if f.expert >= 0]
    if not experts or all(f.derived for f in experts):
        # A derived expert record was checked against the plan by its writer (its owner and
        # fragments), and a save writes every expert's file: the plan's table, exactly.
        return True
    plan = m.plan()
    want = [e for e in range(plan.num_experts) if plan.expert_leaves(e)]
    got = sorted(experts, key=lambda f: f.expert)
    return [f.expert for f in got] == want and all(
        f.rank == plan.placements[plan.expert_leaves(f.expert)[0]].owner for f in got
    )


def _u8(values: list[int]) -> bytes:
    return np.array(values, dtype="<u8").tobytes()


def _encode_v2(m: Manifest) -> bytes:
    ws = m.spec.world_size
    ranks = [f for f in m.files if f.expert < 0]
    experts = sorted((f for f in m.files if f.expert >= 0), key=lambda f: f.expert)
    if [f.rank for f in ranks] != list(range(ws)):
        raise ValueError("a version 2 manifest records one blob per rank, in rank order")
    explicit = {
        f.name: _u8([x for frag in f.fragments for x in frag]) for f in m.files if not f.derived
    }

    def hashes(files: list[FileRecord]) -> dict[str, bytes]:
        return {
            "size": _u8([f.size for f in files]),
            "xxh3": _u8([f.xxh3 for f in files]),
            "index_xxh3": _u8([f.index_xxh3 or 0 for f in files]),
        }

    body: bytes = msgpack.packb(
        {
            "format": 2,
            "zckpt_version": m.zckpt_version,
            "tag": m.tag,
            "generation": m.generation,
            "committed_at": m.committed_at,
            "spec": m.spec.to_dict(),
            "skeleton": skeleton_to_columns(m.skeleton),
            "ranks": hashes(ranks),
            "experts": {
                "expert": np.array([f.expert for f in experts], dtype="<u4").tobytes(),
                "rank": np.array([f.rank for f in experts], dtype="<u4").tobytes(),
                **hashes(experts),
            },
            "explicit": explicit,
            "client": None if m.client is None else m.client.to_obj(),
            "frozen": list(m.frozen),
            "excluded_frozen": m.excluded_frozen,
        },
        use_bin_type=True,
    )
    return _PRE.pack(MAGIC, 2, 0, len(body), xxhash.xxh3_64_intdigest(body)) + body


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
        nbytes += (f.stop - f.start) * ITEMSIZE[dtype_code(meta.dtype_name)]
    if rec.size < PREAMBLE_SIZE + 1:
        raise FormatError(f"{where}: size {rec.size} is too small for a zckpt blob")
    if nbytes > rec.size * MAX_EXPANSION:
        raise FormatError(
            f"{where}: its fragments declare {nbytes} tensor bytes, more than a {rec.size}-byte "
            "file can hold"
        )
    return nbytes


def check_tiling(m: Manifest, where: str) -> None:
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
    # A MoE manifest is a few million small objects: without the pause, the collections their
    # allocation triggers rescan them again and again (half of a loading rank's planning CPU).
    with _gc_paused():
        return _decode_manifest(data, where, check)


def _decode_manifest(data: bytes, where: str, check: bool) -> Manifest:
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
    if version not in (1, 2):
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
    if fmt != version or type(fmt) is not int:
        raise FormatError(f"{where}: 'format' is {show(fmt)}, the preamble says {version}")
    try:
        spec = ZeroSpec.from_dict(field(d, "spec", where))
    except SpecError as e:
        raise FormatError(f"{where}: 'spec': {e}") from None
    except FormatError:
        raise
    except Exception as e:  # from_dict of untrusted input
        raise FormatError(f"{where}: 'spec' is malformed ({type(e).__name__}: {e})") from None
    try:
        if version == 1:
            skeleton = skeleton_from_wire(field(d, "skeleton", where))
        else:
            skeleton = skeleton_from_columns(field(d, "skeleton", where))
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
    plan = None
    if version == 1:
        files = tuple(
            FileRecord.from_obj(f, f"{where} file {i}")
            for i, f in enumerate(expect_list(field(d, "files", where), f"{where} 'files'"))
        )
    else:
        files, plan = _files_v2(d, spec, skeleton, generation, where)
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
    if plan is not None:
        object.__setattr__(m, "_plan", plan)
    names: set[str] = set()
    for rec in m.files:
        if rec.name in names:
            raise FormatError(f"{where}: file {rec.name!r} is listed twice")
        names.add(rec.name)
        if version == 1:  # version 2's names are built from the generation and the table
            _check_name(rec, m, f"{where} file {rec.name!r}", client=False)
        if rec.derived:  # the plan's own fragments: inside their tensors, tiling them once
            if rec.size < PREAMBLE_SIZE + 1:
                raise FormatError(f"{where} file {rec.name!r}: size {rec.size} is too small")
            continue
        _check_fragments(rec, skeleton, f"{where} file {rec.name!r}")
    if m.client is not None:
        _check_name(m.client, m, f"{where} client", client=True)
        if m.client.fragments and m.client.size < PREAMBLE_SIZE + 1:
            raise FormatError(f"{where}: client file of {m.client.size} bytes")
    if check and not m.derived:
        check_tiling(m, where)  # explicit lists (all, or mixed with derived ones): O(fragments)
    return m


def _column(m: dict[str, Any], key: str, dtype: str, n: int, where: str) -> list[int]:
    v = m.get(key)
    size = np.dtype(dtype).itemsize
    if type(v) is not bytes or len(v) != n * size:
        raise FormatError(
            f"{where}: {key!r} must be {n} packed {dtype} values ({n * size} bytes), got {show(v)}"
        )
    out: list[int] = np.frombuffer(v, dtype=dtype).tolist()
    return out


def _files_v2(
    d: dict[str, Any], spec: ZeroSpec, skeleton: Skeleton, gen: str, where: str
) -> tuple[tuple[FileRecord, ...], ShardPlan | None]:
    """The rank and expert records of a version 2 body, every field checked; the expert files
    must be exactly the plan's (one per expert, written by the expert's writer)."""
    ws = spec.world_size
    ranks = expect_map(field(d, "ranks", where), f"{where} 'ranks'")
    experts = expect_map(field(d, "experts", where), f"{where} 'experts'")
    explicit = expect_map(d.get("explicit", {}), f"{where} 'explicit'")

    def hashes(m: dict[str, Any], n: int, w: str) -> tuple[list[int], list[int], list[int]]:
        sizes = _column(m, "size", "<u8", n, w)
        for i, size in enumerate(sizes):
            if not PREAMBLE_SIZE < size <= 1 << 62:
                raise FormatError(f"{w}: file {i}'s size {size} is out of range")
        return sizes, _column(m, "xxh3", "<u8", n, w), _column(m, "index_xxh3", "<u8", n, w)

    sizes, xs, ixs = hashes(ranks, ws, f"{where} 'ranks'")
    ew = f"{where} 'experts'"
    raw_ids = experts.get("expert")
    n_exp = len(raw_ids) // 4 if type(raw_ids) is bytes else -1
    ids = _column(experts, "expert", "<u4", max(n_exp, 0), ew)
    owners = _column(experts, "rank", "<u4", len(ids), ew)
    esizes, exs, eixs = hashes(experts, len(ids), ew)
    plan = None
    if ids or spec.experts:
        try:
            plan = plan_shards(skeleton, spec)
        except SpecError as err:
            raise FormatError(f"{where}: the spec cannot plan the skeleton: {err}") from None
        want = [e for e in range(plan.num_experts) if plan.expert_leaves(e)]
        if ids != want:
            raise FormatError(
                f"{ew}: files for experts {show(ids)}, the plan has experts {show(want)}"
            )
        for ex, r in zip(ids, owners):
            owner = plan.placements[plan.expert_leaves(ex)[0]].owner
            if r != owner:
                raise FormatError(
                    f"{ew}: expert {ex}'s file is from rank {r}, its writer is {owner}"
                )
    names = [blob_name(gen, r, ws) for r in range(ws)] + [expert_name(gen, e) for e in ids]
    lists: dict[str, tuple[Fragment, ...]] = {}
    for name, v in explicit.items():
        fw = f"{where} 'explicit' {show(name)}"
        if type(v) is not bytes or len(v) % 24:
            raise FormatError(f"{fw}: expected packed (leaf, start, stop) u64 triples")
        flat = np.frombuffer(v, dtype="<u8").tolist()
        lists[name] = tuple(map(Fragment, flat[0::3], flat[1::3], flat[2::3]))
    unknown = set(lists) - set(names)
    if unknown:
        raise FormatError(f"{where}: 'explicit' names {show(sorted(unknown))}, not files of it")
    if len(lists) < ws + len(ids) and plan is None:
        try:
            plan = plan_shards(skeleton, spec)
        except SpecError as err:
            raise FormatError(f"{where}: the spec cannot plan the skeleton: {err}") from None

    def record(name: str, rank: int, size: int, xxh3: int, expert: int, ix: int) -> FileRecord:
        listed = lists.get(name)
        if listed is not None:
            return FileRecord(name, rank, size, xxh3, listed, expert, ix)
        frags = DerivedFragments(plan, rank, expert)  # type: ignore[arg-type]
        return FileRecord(name, rank, size, xxh3, frags, expert, ix, True)

    records = list(map(record, names[:ws], range(ws), sizes, xs, [-1] * ws, ixs))
    records += map(record, names[ws:], owners, esizes, exs, ids, eixs)
    return tuple(records), plan
