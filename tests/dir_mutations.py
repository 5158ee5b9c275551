"""Directory-level mutations of committed checkpoints, and a fork server that runs every public
reader on a mutated directory under a timeout and an address-space limit.

Used by ``tests/test_dir_fuzz.py``. A *scratch* directory holds three trees::

    scratch/ckpt/      the checkpoint under test (tags step1, step2; latest -> step2)
    scratch/other/     a second checkpoint with the SAME layout (same spec, tags, shapes, client
                       structure) and different tensor values: the source of swapped files
    scratch/outside/   files and directories outside the save_dir (symlink targets)

Mutations are plain tuples (so hypothesis prints and shrinks them) applied by :func:`apply`.
The readers run in a child forked from a long-lived server process (``python dir_mutations.py
--serve``, started once per test module), one child per mutated directory, with every op
reporting as it finishes: an op that does not report within its timeout is a hang (the child is
killed and the next op runs in a fresh child), a child that dies is a crash, and the child's
address space is capped (``RLIMIT_AS``: its size after the fork plus ``HEADROOM``), so an
attempt to allocate gigabytes for a small file surfaces as a non-zckpt error.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import xxhash

TAGS = ("step1", "step2")
# Keys that make the "catastrophic regex" expert patterns backtrack exponentially.
REGEX_KEY_A = "a" * 30 + "!"  # r"(a+)+$"
REGEX_KEY_X = "x" * 30  # r"(x+x+)+y"
HEADROOM = 1536 << 20  # address space a child may add beyond what it inherits
OP_TIMEOUT = 3.0

MANIFEST_MAGIC = b"\x89ZCKMAN\n"
BLOB_MAGIC = b"\x89ZCK\r\n\x1a\n"
PRE = struct.Struct("<8sIIQQ")


# ---------------------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class Params:
    """What a fixture checkpoint looks like."""

    ws: int
    stage: int
    codec: str
    chunk: int = 128
    v2: bool = False  # format version 2: the manifest, and blobs without the skeleton

    @property
    def name(self) -> str:
        return f"ws{self.ws}-z{self.stage}-{self.codec}-c{self.chunk}" + ("-v2" if self.v2 else "")


def fixture_state(seed: int, step: int) -> dict[str, Any]:
    """A small training state: bf16 module weights (one tied), an fp16 weight without a master,
    fp32 masters, int64 buffers, optimizer state, nested containers of plain values."""
    import torch

    g = torch.Generator().manual_seed(seed)
    shapes = {"embed.weight": (13, 7), "fc.weight": (9, 7), "fc.bias": (9,)}
    master = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    module: dict[str, Any] = {n: t.bfloat16() for n, t in master.items()}
    module["head.weight"] = module["embed.weight"]  # tied
    module["half.weight"] = torch.randn(4, 3, generator=g).half()
    module["num_batches"] = torch.tensor(seed * 1000 + step, dtype=torch.int64)
    opt = {
        n: {"exp_avg": torch.randn(s, generator=g), "step": torch.tensor(float(step))}
        for n, s in shapes.items()
    }
    return {
        "module": module,
        "master": master,
        "optimizer": {"state": opt, "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999)}]},
        "misc": {
            "ids": torch.randint(0, 1 << 40, (17,), generator=g, dtype=torch.int64),
            "nested": {"deep": [{"v": torch.randn(5, generator=g)}, (1, 2.5, "s", None, b"b")]},
            REGEX_KEY_A: torch.randn(3, generator=g),
            REGEX_KEY_X: torch.randn(2, generator=g).half(),
        },
        "global_steps": step,
    }


def fixture_client(seed: int, step: int) -> dict[str, Any]:
    """A client_state with a tensor and nested dicts."""
    import torch

    g = torch.Generator().manual_seed(seed + 7)
    return {
        "epoch": step,
        "rng": torch.randint(0, 1 << 60, (6,), generator=g, dtype=torch.int64),
        "nested": {"a": [1, 2.5, "s"], "w": torch.randn(3, 2, generator=g), "d": {"x": None}},
    }


SEEDS = {"ckpt": 0, "other": 100}


def build_fixture(root: Path, p: Params) -> None:
    """Write ``root/ckpt`` and ``root/other`` (same layout, different values) and ``outside``;
    ``p.v2`` forces format version 2 (what zckpt writes from world size x tensors >= 65536)."""
    import zckpt
    import zckpt.store._manifest as manifest_mod

    threshold = manifest_mod.V2_MIN_FRAGMENTS
    if p.v2:
        manifest_mod.V2_MIN_FRAGMENTS = 0
    try:
        for name, base in SEEDS.items():
            for i, tag in enumerate(TAGS):
                step = i + 1
                zckpt.save_checkpoint(
                    root / name,
                    fixture_state(base + step, step),
                    zckpt.ZeroSpec(p.ws, p.stage),
                    tag=tag,
                    client_state=fixture_client(base + step, step),
                    codec=p.codec,
                    chunk_bytes=p.chunk,
                )
    finally:
        manifest_mod.V2_MIN_FRAGMENTS = threshold
    (root / "outside").mkdir()
    (root / "outside" / "note.txt").write_text("outside the save_dir")


# ---------------------------------------------------------------------------------- formats


def manifest_unpack(data: bytes) -> tuple[int, int, Any]:
    """(version, flags, body object) of manifest bytes."""
    _, version, flags, _, _ = PRE.unpack_from(data)
    return version, flags, msgpack.unpackb(data[PRE.size :], raw=False, strict_map_key=False)


def seal(magic: bytes, body: bytes, version: int = 1, flags: int = 0) -> bytes:
    """Preamble with a correct length and checksum, then ``body``."""
    return PRE.pack(magic, version, flags, len(body), xxhash.xxh3_64_intdigest(body)) + body


DEEP = "\x00__zckpt_deep__\x00"


def deep_bytes(levels: int) -> bytes:
    """msgpack bytes of ``levels`` nested one-element arrays around nil (no recursion limit)."""
    return b"\x91" * levels + b"\xc0"


def pack_body(obj: Any, deep: int = 1000) -> bytes:
    """msgpack of ``obj``; every string equal to :data:`DEEP` becomes a ``deep``-level nesting
    (msgpack's packer refuses more than 511 levels itself)."""
    body = msgpack.packb(obj, use_bin_type=True)
    return body.replace(msgpack.packb(DEEP, use_bin_type=True), deep_bytes(deep))


def manifest_pack(obj: Any, version: int = 1, flags: int = 0, deep: int = 1000) -> bytes:
    return seal(MANIFEST_MAGIC, pack_body(obj, deep), version, flags)


def blob_split(blob: bytes) -> tuple[dict[str, Any], int]:
    """(index object, offset of the first frame or the end of the header) of a blob."""
    _, _, _, n, _ = PRE.unpack_from(blob)
    index = msgpack.unpackb(blob[PRE.size : PRE.size + n], raw=False, strict_map_key=False)
    offsets = [c["o"] for f in index["fragments"] for c in f["chunks"]]
    first = min(offsets) if offsets else -(-(PRE.size + n) // 64) * 64
    return index, first


def blob_repack(index: dict[str, Any], frames: bytes, base: int) -> bytes:
    """A blob of ``index`` (chunk offsets absolute, frames ``frames`` starting at ``base``),
    with a correct index hash; frames (and every chunk offset and ``size``) move down by a
    multiple of 64 if the new index does not fit before them."""
    shift = 0
    version = index.get("version") if index.get("version") in (1, 2) else 1  # the preamble's
    while True:
        body = msgpack.packb(index, use_bin_type=True)
        head = seal(BLOB_MAGIC, body, version)
        if len(head) <= base + shift:
            break
        grow = -(-(len(head) - base - shift) // 64) * 64
        shift += grow
        for f in index["fragments"]:
            for c in f["chunks"]:
                c["o"] += grow
        if isinstance(index.get("size"), int):
            index["size"] += grow
    return head + bytes(base + shift - len(head)) + frames


# ---------------------------------------------------------------------------------- scratch


def role(rel: str) -> tuple[Any, ...]:
    """What a file is, independent of its generation: ('latest',), (tag, 'manifest'),
    (tag, 'client'), (tag, 'rank', r), (tag, 'dir')."""
    parts = rel.split("/")
    if parts == ["latest"]:
        return ("latest",)
    if len(parts) == 1:
        return (parts[0], "dir")
    tag, name = parts[0], parts[1]
    if name == "manifest.zckm":
        return (tag, "manifest")
    if name.endswith(".client.zck"):
        return (tag, "client")
    if ".rank" in name:
        return (tag, "rank", int(name.split(".rank")[1][:5]))
    return (tag, "other", name)


class Scratch:
    """A mutable copy of a fixture."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ckpt = root / "ckpt"
        self.other = root / "other"
        self.outside = root / "outside"

    def files(self) -> list[str]:
        """Relative paths of the checkpoint's original files (latest, manifests, blobs)."""
        out = []
        for tag in TAGS:
            d = self.ckpt / tag
            if d.is_dir() and not d.is_symlink():
                out += [f"{tag}/{n}" for n in sorted(os.listdir(d))]
        return ["latest", *out]

    def find(self, tree: Path, r: tuple[Any, ...]) -> Path | None:
        """The file of role ``r`` in ``tree`` (ckpt or other)."""
        if r == ("latest",):
            return tree / "latest"
        d = tree / r[0]
        if not d.is_dir():
            return None
        for n in sorted(os.listdir(d)):
            if role(f"{r[0]}/{n}") == r:
                return d / n
        return None

    def pick(self, target: int | str) -> tuple[str, Path]:
        """A file by index into :meth:`files`, or by role: ``"latest"``, ``"step2/manifest"``,
        ``"step2/client"``, ``"step2/rank1"``."""
        if isinstance(target, int):
            files = self.files()
            rel = files[target % len(files)]
            return rel, self.ckpt / rel
        if target == "latest":
            return "latest", self.ckpt / "latest"
        tag, what = target.split("/")
        r: tuple[Any, ...] = (
            (tag, "rank", int(what[4:])) if what.startswith("rank") else (tag, what)
        )
        p = self.find(self.ckpt, r) or self.ckpt / tag / what
        return str(p.relative_to(self.ckpt)), p


def regular(p: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(p).st_mode)
    except OSError:  # missing, or under a path whose tag directory a mutation made a FIFO
        return False


def _replace_file(p: Path, data: bytes) -> None:
    if os.path.lexists(p) and not regular(p):
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.unlink(p)
    p.write_bytes(data)


def rebind(s: Scratch, tag: str, name: str, fragments: list[Any] | None = None) -> str:
    """Make ``tag``'s manifest record for ``name`` match the file as it is now (size, xxh3 and,
    when given, fragments), re-checksummed: the crafted file then passes the manifest binding."""
    mpath = s.ckpt / tag / "manifest.zckm"
    fpath = s.ckpt / tag / name
    if not regular(mpath) or not regular(fpath):
        return "(manifest not rebound: not a regular file)"
    try:
        version, flags, d = manifest_unpack(mpath.read_bytes())
    except Exception:
        return "(manifest not rebound: undecodable)"
    data = fpath.read_bytes()
    if version == 2 and isinstance(d, dict) and ".client." not in name:
        how = _rebind_v2(d, name, data, fragments)
        mpath.write_bytes(manifest_pack(d, version, flags))
        return how
    recs = [r for r in [*d.get("files", []), d.get("client")] if isinstance(r, dict)]
    for r in recs:
        if r.get("name") == name:
            r["size"], r["xxh3"] = len(data), xxhash.xxh3_64_intdigest(data)
            if fragments is not None:
                r["fragments"] = fragments
    mpath.write_bytes(manifest_pack(d, version, flags))
    return "(manifest rebound)"


def _u8s(v: Any) -> list[int]:
    import numpy as np

    out: list[int] = np.frombuffer(v, dtype="<u8").tolist()
    return out


def _pack_u8s(values: list[int]) -> bytes:
    import numpy as np

    return np.array(values, dtype="<u8").tobytes()


def _rebind_v2(d: dict[str, Any], name: str, data: bytes, fragments: list[Any] | None) -> str:
    """:func:`rebind` for a version 2 manifest: the file's entry in the packed ``ranks`` or
    ``experts`` columns gets its size, xxh3 and index checksum (so the crafted index itself is
    what a reader meets), and ``fragments`` become an explicit list."""
    import numpy as np

    try:
        if ".rank" in name:
            cols, at = d["ranks"], int(name.split(".rank")[1][:5])
        else:
            cols = d["experts"]
            ids = np.frombuffer(cols["expert"], dtype="<u4").tolist()
            at = ids.index(int(name.split(".expert")[1][:5]))
        index_xxh3 = PRE.unpack_from(data)[4] if len(data) >= PRE.size else 0
        for key, value in (
            ("size", len(data)),
            ("xxh3", xxhash.xxh3_64_intdigest(data)),
            ("index_xxh3", index_xxh3),
        ):
            col = _u8s(cols[key])
            col[at] = value
            cols[key] = _pack_u8s(col)
        if fragments is not None:
            d.setdefault("explicit", {})[name] = _pack_u8s([x for f in fragments for x in f])
    except Exception as e:  # a manifest already mutated out of shape: leave it
        return f"(manifest not rebound: {type(e).__name__})"
    return "(manifest rebound, index checksum too)"


# ---------------------------------------------------------------------------------- mutations

MANIFEST_KINDS = (
    "name_dotdot_other_tag",
    "name_abs_other_ckpt",
    "name_abs_same_file",
    "name_nul",
    "name_other_file",
    "name_manifest",
    "name_empty",
    "name_int",
    "size_0",
    "size_neg",
    "size_huge",
    "size_float",
    "size_inf",
    "size_nan",
    "size_str",
    "xxh3_wrong",
    "frag_leaf_beyond",
    "frag_start_gt_stop",
    "frag_negative",
    "frag_float",
    "frag_huge",
    "skel_dtype_same_size",
    "skel_dtype_other_size",
    "skel_shape_permuted",
    "skel_shape_huge",
    "skel_value_changed",
    "skel_key_renamed",
    "version_0",
    "version_99",
    "format_99",
    "flags_1",
    "deep_tag",
    "deep_frozen",
    "deep_skeleton",
    "deep_skeleton_500",
    "deep_client",
    "deep_spec",
    "experts_a_plus",
    "experts_x_plus",
    "ws_0",
    "ws_huge",
    "stage_9",
    "files_dropped",
    "files_duplicated",
    "client_is_rank_file",
    "generation_dotdot",
    "committed_at_nan",
    "committed_at_str",
    "spec_not_map",
    "body_not_map",
)

BLOB_KINDS = (
    "index_len_4g",
    "index_len_2_63",
    "tensor_shape_huge",
    "tensor_dtype_same_size",
    "zstd_overexpand",
    "zstd_overexpand_no_content_size",
    "zstd_bomb_1g",
    "raw_len_huge",
    "chunk_offset_misaligned",
    "chunk_past_end",
    "frag_stop_beyond",
    "fragments_empty",
    # version 2 indexes only (skipped on version 1 blobs)
    "skeleton_digest_flip",
    "leaf_unlisted",
    "leaf_extra",
)

TYPE_KINDS = (
    "fifo",
    "directory",
    "symlink_other_ckpt",
    "symlink_same_outside",
    "symlink_dev_zero",
    "symlink_dangling",
    "symlink_loop",
)

TAGDIR_KINDS = ("tagdir_symlink_other_ckpt", "tagdir_symlink_same_outside", "tagdir_fifo")

SWAP_KINDS = (
    "rank_from_other_ckpt",
    "client_from_other_ckpt",
    "rank_from_other_tag",
    "client_from_other_tag",
    "manifest_from_other_ckpt",
    "manifest_from_other_tag",
    "exchange_ranks",
    "latest_from_other_ckpt",
)

LATEST_KINDS = (
    "latest_dotdot",
    "latest_abs",
    "latest_nul",
    "latest_empty",
    "latest_newline",
    "latest_long",
    "latest_other_tag",
    "latest_invalid_utf8",
    "latest_huge",
)

_ZSTD_BOMB: list[bytes] = []


def _zstd(data: bytes, content_size: bool = True) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=3, write_content_size=content_size).compress(data)


def zstd_bomb() -> bytes:
    """One zstd frame that expands to 1 GiB of zeros (computed once)."""
    if not _ZSTD_BOMB:
        import zstandard

        c = zstandard.ZstdCompressor(level=1, write_content_size=False)
        out = io.BytesIO()
        with c.stream_writer(out, closefd=False) as w:
            block = bytes(64 << 20)
            for _ in range(16):
                w.write(block)
        _ZSTD_BOMB.append(out.getvalue())
    return _ZSTD_BOMB[0]


def _columns(c: dict[str, Any]) -> tuple[list[int], bytearray, list[list[int]]]:
    """(leaf ids or dtype positions, dtype codes, shapes) of packed leaf columns."""
    import numpy as np

    ndims = list(c["ndims"])
    dims = _u8s(c["dims"])
    shapes, at = [], 0
    for n in ndims:
        shapes.append(dims[at : at + n])
        at += n
    ids = np.frombuffer(c["leaf"], dtype="<u4").tolist() if "leaf" in c else []
    return ids, bytearray(c["dtypes"]), shapes


def _set_columns(c: dict[str, Any], ids: list[int], codes: bytearray, shapes: list[Any]) -> None:
    import numpy as np

    if "leaf" in c:
        c["leaf"] = np.array(ids, dtype="<u4").tobytes()
    c["dtypes"], c["ndims"] = bytes(codes), bytes(len(sh) for sh in shapes)
    c["dims"] = _pack_u8s([x for sh in shapes for x in sh])


def _edit_leaf(c: dict[str, Any], leaf: int, kind: str) -> None:
    """``tensor_shape_huge`` / ``tensor_dtype_same_size`` on a version 2 index's columns."""
    ids, codes, shapes = _columns(c)
    at = ids.index(leaf)
    if kind == "tensor_shape_huge":
        shapes[at] = [2**34]
    else:
        codes[at] = {0: 6, 1: 5, 2: 5, 7: 3, 6: 0}.get(codes[at], codes[at])
    _set_columns(c, ids, codes, shapes)


def _drop_leaf(c: dict[str, Any], leaf: int) -> None:
    ids, codes, shapes = _columns(c)
    at = ids.index(leaf)
    del ids[at], codes[at], shapes[at]
    _set_columns(c, ids, codes, shapes)


def _add_leaf(c: dict[str, Any]) -> None:
    ids, codes, shapes = _columns(c)
    _set_columns(c, [*ids, max(ids, default=-1) + 1], codes + b"\x00", [*shapes, [3]])


def _tensor_leaf(skel: dict[str, Any], codes: tuple[int, ...]) -> int | None:
    for j, (code, _shape) in enumerate(skel["tensors"]):
        if code in codes:
            return j
    return None


def craft_manifest(s: Scratch, kind: str, tag: str, i: int) -> str:
    """Apply a crafted change to ``tag``'s manifest body (or preamble), re-checksummed."""
    mpath = s.ckpt / tag / "manifest.zckm"
    if not regular(mpath):
        return f"{tag}/manifest.zckm: not a regular file, {kind} skipped"
    try:
        version, flags, d = manifest_unpack(mpath.read_bytes())
        if version == 2 and isinstance(d, dict) and kind in V2_FILE_KINDS:
            what = craft_manifest_v2(d, kind, i)
            mpath.write_bytes(manifest_pack(d, version, flags))
            return f"{tag}/manifest.zckm: {kind} ({what}, version 2), re-checksummed"
        files = d["files"] if version == 1 else []
        rec = files[i % len(files)] if files else {}
    except Exception:
        return f"{tag}/manifest.zckm: undecodable, {kind} skipped"
    r = rec.get("rank", 0)
    other_tag = TAGS[1 - TAGS.index(tag)]
    deep = 1000
    what = f"file record {rec.get('name')}"
    if kind == "name_dotdot_other_tag":
        twin = s.find(s.ckpt, (other_tag, "rank", r))
        rec["name"] = f"../{other_tag}/{twin.name if twin else 'x'}"
    elif kind == "name_abs_other_ckpt":
        twin = s.find(s.other, (tag, "rank", r))
        rec["name"] = str(twin)
    elif kind == "name_abs_same_file":
        rec["name"] = str(s.ckpt / tag / rec["name"])
    elif kind == "name_nul":
        rec["name"] = rec["name"] + "\x00"
    elif kind == "name_other_file":
        alt = files[(i + 1) % len(files)]["name"] if len(files) > 1 else None
        rec["name"] = alt or (d["client"] or {}).get("name", "x")
    elif kind == "name_manifest":
        rec["name"] = "manifest.zckm"
    elif kind == "name_empty":
        rec["name"] = ""
    elif kind == "name_int":
        rec["name"] = 12345
    elif kind.startswith("size_"):
        if not isinstance(rec["size"], int) or isinstance(rec["size"], bool):
            return f"{tag}: {what}'s size is already mutated, {kind} skipped"
        rec["size"] = {
            "size_0": 0,
            "size_neg": -1,
            "size_huge": 2**63,
            "size_float": rec["size"] + 0.5,
            "size_inf": float("inf"),
            "size_nan": float("nan"),
            "size_str": str(rec["size"]),
        }[kind]
    elif kind == "xxh3_wrong":
        rec["xxh3"] ^= 1
    elif kind.startswith("frag_"):
        if not rec["fragments"]:
            return f"{tag}: {what} has no fragment, {kind} skipped"
        leaf, a, b = rec["fragments"][0]
        rec["fragments"][0] = {
            "frag_leaf_beyond": [len(d["skeleton"]["tensors"]) + 3, a, b],
            "frag_start_gt_stop": [leaf, b, a],
            "frag_negative": [leaf, -1, b],
            "frag_float": [leaf, a + 0.5, b],
            "frag_huge": [leaf, a, 2**62],
        }[kind]
    elif kind.startswith("skel_"):
        skel = d["skeleton"]
        what = "skeleton"
        if kind == "skel_dtype_same_size":
            j = _tensor_leaf(skel, (0, 2))
            skel["tensors"][j][0] = {0: 6, 2: 1}[skel["tensors"][j][0]]  # fp32->int32, bf16->fp16
            what = f"skeleton tensor {j} dtype"
        elif kind == "skel_dtype_other_size":
            j = _tensor_leaf(skel, (2,))
            skel["tensors"][j][0] = 0  # bf16 -> fp32
            what = f"skeleton tensor {j} dtype"
        elif kind == "skel_shape_permuted":
            j = next(k for k, (_, sh) in enumerate(skel["tensors"]) if len(sh) == 2)
            skel["tensors"][j][1] = skel["tensors"][j][1][::-1]
            what = f"skeleton tensor {j} shape"
        elif kind == "skel_shape_huge":
            j = next(k for k, (_, sh) in enumerate(skel["tensors"]) if len(sh) == 1)
            skel["tensors"][j][1] = [2**34]
            what = f"skeleton tensor {j} shape"
        elif kind == "skel_value_changed":
            for pair in skel["skeleton"][1]:
                if pair[0] == "global_steps":
                    pair[1] = [4, 99]
        elif kind == "skel_key_renamed":
            for pair in skel["skeleton"][1]:
                if pair[0] == "misc":
                    pair[0] = "misd"
    elif kind == "version_0":
        version = 0
        what = "preamble version"
    elif kind == "version_99":
        version = 99
        what = "preamble version"
    elif kind == "format_99":
        d["format"] = 99
        what = "body format"
    elif kind == "flags_1":
        flags = 1
        what = "preamble flags"
    elif kind.startswith("deep_"):
        deep = 500 if kind == "deep_skeleton_500" else 1000
        if kind == "deep_tag":
            d["tag"] = DEEP
        elif kind == "deep_frozen":
            d["frozen"] = [DEEP]
        elif kind.startswith("deep_skeleton"):
            d["skeleton"]["skeleton"] = [1, [DEEP]]
        elif kind == "deep_client":
            d["client"] = DEEP
        elif kind == "deep_spec":
            d["spec"]["param_groups"] = [DEEP]
        what = f"{kind[5:]} ({deep} levels)"
    elif kind.startswith("experts_"):
        d["spec"]["experts"] = [r"(a+)+$" if kind == "experts_a_plus" else r"(x+x+)+y"]
        d["spec"]["expert_parallel_size"] = 1
        what = f"spec experts {d['spec']['experts']}"
    elif kind == "ws_0":
        d["spec"]["world_size"] = 0
        what = "spec world_size"
    elif kind == "ws_huge":
        d["spec"]["world_size"] = 10**9
        what = "spec world_size"
    elif kind == "stage_9":
        d["spec"]["stage"] = 9
        what = "spec stage"
    elif kind == "files_dropped":
        d["files"] = files[:-1]
        what = "files"
    elif kind == "files_duplicated":
        d["files"] = [*files, dict(files[0])]
        what = "files"
    elif kind == "client_is_rank_file":
        d["client"] = dict(files[0], rank=-1)
        what = "client record"
    elif kind == "generation_dotdot":
        d["generation"] = "../" + d["generation"]
        what = "generation"
    elif kind == "committed_at_nan":
        d["committed_at"] = float("nan")
        what = "committed_at"
    elif kind == "committed_at_str":
        d["committed_at"] = "yesterday"
        what = "committed_at"
    elif kind == "spec_not_map":
        d["spec"] = [2, 2]
        what = "spec"
    elif kind == "body_not_map":
        d = [d]
        what = "body"
    else:
        raise ValueError(kind)
    mpath.write_bytes(manifest_pack(d, version, flags, deep))
    return f"{tag}/manifest.zckm: {kind} ({what}), re-checksummed"


# Kinds that edit file records or the skeleton: a version 2 manifest has them in other shapes.
V2_FILE_KINDS = tuple(
    k
    for k in MANIFEST_KINDS
    if k.startswith(("name_", "size_", "frag_", "skel_", "files_", "deep_skeleton"))
    or k in ("xxh3_wrong", "client_is_rank_file")
)


def craft_manifest_v2(d: dict[str, Any], kind: str, i: int) -> str:
    """The file-record and skeleton kinds of :func:`craft_manifest` on a version 2 body: packed
    ``ranks`` columns, ``explicit`` fragment lists, the columnar skeleton."""
    ranks = d["ranks"]
    ws = len(ranks["size"]) // 8
    r = i % max(ws, 1)
    gen = d["generation"]
    own = f"{gen}.rank{r:05d}-of-{ws:05d}.zck"
    skel = d["skeleton"]
    if kind.startswith("name_"):
        bad: Any = {
            "name_dotdot_other_tag": f"../step1/{own}",
            "name_abs_other_ckpt": "/etc/passwd",
            "name_abs_same_file": f"/{own}",
            "name_nul": own + "\x00",
            "name_other_file": f"{gen}.rank{ws + 3:05d}-of-{ws:05d}.zck",
            "name_manifest": "manifest.zckm",
            "name_empty": "",
            "name_int": 12345,
        }[kind]
        d.setdefault("explicit", {})[bad] = _pack_u8s([0, 0, 1])
        return f"explicit list for {bad!r}"
    if kind.startswith("size_") or kind == "xxh3_wrong":
        key = "xxh3" if kind == "xxh3_wrong" else "size"
        col = _u8s(ranks[key])
        if kind in ("size_0", "size_huge", "xxh3_wrong"):
            col[r] = {"size_0": 0, "size_huge": 2**63, "xxh3_wrong": col[r] ^ 1}[kind]
            ranks[key] = _pack_u8s(col)
        else:  # a value packed columns cannot hold: the column itself of the wrong type
            ranks[key] = {
                "size_neg": -1,
                "size_float": 0.5,
                "size_inf": float("inf"),
                "size_nan": float("nan"),
                "size_str": "12",
            }[kind]
        return f"ranks {key} of rank {r}"
    if kind.startswith("frag_"):
        n_leaves = len(skel["dtypes"])
        value: Any = {
            "frag_leaf_beyond": _pack_u8s([n_leaves + 3, 0, 1]),
            "frag_start_gt_stop": _pack_u8s([0, 5, 2]),
            "frag_negative": b"\xff" * 23,
            "frag_float": [0.5, 1, 2],
            "frag_huge": _pack_u8s([0, 0, 2**62]),
        }[kind]
        d.setdefault("explicit", {})[own] = value
        return f"explicit fragments of {own}"
    if kind.startswith("skel_"):
        _, codes, shapes = _columns(skel)
        if kind in ("skel_dtype_same_size", "skel_dtype_other_size"):
            want = (0, 2) if kind == "skel_dtype_same_size" else (2,)
            j = next(k for k, c in enumerate(codes) if c in want)
            codes[j] = {0: 6, 2: 1}[codes[j]] if kind == "skel_dtype_same_size" else 0
        elif kind == "skel_shape_permuted":
            j = next(k for k, sh in enumerate(shapes) if len(sh) == 2 and sh[0] != sh[1])
            shapes[j] = shapes[j][::-1]
        elif kind == "skel_shape_huge":
            j = next(k for k, sh in enumerate(shapes) if len(sh) == 1)
            shapes[j] = [2**34]
        elif kind == "skel_value_changed":
            j = next(k for k, v in enumerate(skel["values"]) if type(v) is int)
            skel["values"][j] += 1000
            return f"skeleton value {j}"
        elif kind == "skel_key_renamed":
            skel["keys"] = ["misd" if k == "misc" else k for k in skel["keys"]]
            return "skeleton key misc"
        _set_columns(skel, [], codes, shapes)
        return f"skeleton tensor {j}"
    if kind.startswith("deep_skeleton"):
        skel["values"] = [DEEP]
        return "skeleton values"
    if kind == "files_dropped":
        for key in ("size", "xxh3", "index_xxh3"):
            ranks[key] = ranks[key][:-8]
        return "last rank entry"
    if kind == "files_duplicated":
        for key in ("size", "xxh3", "index_xxh3"):
            ranks[key] = ranks[key] + ranks[key][:8]
        return "rank 0 entry repeated"
    if kind == "client_is_rank_file":
        size, xxh = _u8s(ranks["size"])[0], _u8s(ranks["xxh3"])[0]
        own0 = f"{gen}.rank00000-of-{ws:05d}.zck"
        d["client"] = {"name": own0, "rank": -1, "size": size, "xxh3": xxh, "fragments": []}
        return "client record"
    raise ValueError(kind)


def craft_blob(s: Scratch, kind: str, tag: str, i: int) -> str:
    """Apply a crafted change to one blob of ``tag`` (index re-checksummed), then rebind the
    manifest's record (size, xxh3, fragments) to the new file."""
    blobs = [n for n in sorted(os.listdir(s.ckpt / tag)) if n.endswith(".zck")]
    if not blobs:
        return f"{tag}: no blob, {kind} skipped"
    name = blobs[i % len(blobs)]
    path = s.ckpt / tag / name
    if not regular(path):
        return f"{tag}/{name}: not a regular file, {kind} skipped"
    blob = path.read_bytes()
    try:
        index, first = blob_split(blob)
    except Exception:
        return f"{tag}/{name}: undecodable, {kind} skipped"
    frames = blob[first:]
    new_frags = None
    chunks = [c for f in index["fragments"] for c in f["chunks"]]
    if kind in ("index_len_4g", "index_len_2_63"):
        n = 2**32 if kind == "index_len_4g" else 2**63
        data = blob[:16] + struct.pack("<Q", n) + blob[24:]
    elif kind in ("tensor_shape_huge", "tensor_dtype_same_size"):
        if not index["fragments"]:
            return f"{tag}/{name}: no fragment, {kind} skipped"
        leaf = index["fragments"][0]["leaf"]
        if "tensors" in index:
            t = index["tensors"][leaf]
            if kind == "tensor_shape_huge":
                t[1] = [2**34]
            else:
                t[0] = {0: 6, 1: 5, 2: 5, 7: 3, 6: 0}.get(t[0], t[0])
        else:  # version 2: the blob's own leaf columns
            _edit_leaf(index["leaves"], leaf, kind)
        data = blob_repack(index, frames, first)
    elif kind.startswith("zstd_") or kind == "raw_len_huge":
        if not chunks:
            return f"{tag}/{name}: no chunk, {kind} skipped"
        c = chunks[0]
        c.pop("p", None)
        if kind == "raw_len_huge":
            c["c"], c["r"] = 1, 2**40
        else:
            if kind == "zstd_bomb_1g":
                frame = zstd_bomb()
            else:
                frame = _zstd(bytes(c["r"] * 64 + 4096), kind == "zstd_overexpand")
            end = first + len(frames)
            at = -(-end // 64) * 64
            frames = frames + bytes(at - end) + frame
            c["c"], c["o"], c["n"], c["x"] = 1, at, len(frame), xxhash.xxh3_64_intdigest(frame)
            index["size"] = at + len(frame)
        data = blob_repack(index, frames, first)
    elif kind == "chunk_offset_misaligned":
        if not chunks:
            return f"{tag}/{name}: no chunk, {kind} skipped"
        chunks[0]["o"] += 1
        data = blob_repack(index, frames, first)
    elif kind == "chunk_past_end":
        if not chunks:
            return f"{tag}/{name}: no chunk, {kind} skipped"
        chunks[-1]["n"] += 4096
        data = blob_repack(index, frames, first)
    elif kind == "frag_stop_beyond":
        if not index["fragments"]:
            return f"{tag}/{name}: no fragment, {kind} skipped"
        f0 = index["fragments"][0]
        f0["stop"] = 2**40
        data = blob_repack(index, frames, first)
        new_frags = [[f["leaf"], f["start"], f["stop"]] for f in index["fragments"]]
    elif kind == "fragments_empty":
        index["fragments"] = []
        data = blob_repack(index, b"", first)
        new_frags = []
    elif kind in ("skeleton_digest_flip", "leaf_unlisted", "leaf_extra"):
        if not isinstance(index.get("leaves"), dict):
            return f"{tag}/{name}: a version 1 index, {kind} skipped"
        if kind == "skeleton_digest_flip":
            index["skeleton_digest"] ^= 1
        elif not index["fragments"]:
            return f"{tag}/{name}: no fragment, {kind} skipped"
        elif kind == "leaf_unlisted":
            _drop_leaf(index["leaves"], index["fragments"][0]["leaf"])
        else:
            _add_leaf(index["leaves"])
        data = blob_repack(index, frames, first)
    else:
        raise ValueError(kind)
    path.write_bytes(data)
    how = rebind(s, tag, name, new_frags if ".client." not in name else None)
    return f"{tag}/{name}: {kind}, index re-checksummed {how}"


def file_type(s: Scratch, kind: str, i: int) -> str:
    rel, p = s.pick(i)
    if not os.path.lexists(p):
        return f"{rel}: gone, {kind} skipped"
    twin = s.find(s.other, role(rel))
    if kind == "symlink_same_outside":
        if not regular(p):
            return f"{rel}: not a regular file, {kind} skipped"
        dest = s.outside / rel.replace("/", "__")
        shutil.move(p, dest)
        os.symlink(dest, p)
        return f"{rel}: moved outside the save_dir, symlinked from its place (same bytes)"
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p)
    else:
        os.unlink(p)
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "directory":
        os.mkdir(p)
        (p / "inner").write_bytes(b"x")
    elif kind == "symlink_other_ckpt":
        os.symlink(twin if twin else s.other / "latest", p)
    elif kind == "symlink_dev_zero":
        os.symlink("/dev/zero", p)
    elif kind == "symlink_dangling":
        os.symlink(s.outside / "no-such-file", p)
    elif kind == "symlink_loop":
        os.symlink(p.name, p)
    else:
        raise ValueError(kind)
    return f"{rel}: replaced by {kind}" + (f" -> {twin}" if kind == "symlink_other_ckpt" else "")


def tag_dir(s: Scratch, kind: str, tag: str) -> str:
    p = s.ckpt / tag
    if not os.path.isdir(p) or os.path.islink(p):
        return f"{tag}/: not a plain directory, {kind} skipped"
    if kind == "tagdir_symlink_other_ckpt":
        dest = s.outside / f"other-{tag}"
        shutil.copytree(s.other / tag, dest)
        shutil.rmtree(p)
        os.symlink(dest, p)
        return f"{tag}/: replaced by a symlink to a copy of the other checkpoint's {tag}/"
    if kind == "tagdir_symlink_same_outside":
        dest = s.outside / f"moved-{tag}"
        shutil.move(p, dest)
        os.symlink(dest, p)
        return f"{tag}/: moved outside the save_dir and symlinked (same bytes)"
    if kind == "tagdir_fifo":
        shutil.rmtree(p)
        os.mkfifo(p)
        return f"{tag}/: replaced by a FIFO"
    raise ValueError(kind)


def swap(s: Scratch, kind: str, tag: str, r: int) -> str:
    other_tag = TAGS[1 - TAGS.index(tag)]
    if kind in ("rank_from_other_ckpt", "rank_from_other_tag"):
        src_tree, src_tag = (
            (s.other, tag) if kind == "rank_from_other_ckpt" else (s.ckpt, other_tag)
        )
        ws = len([n for n in os.listdir(s.ckpt / tag) if ".rank" in n]) or 1
        dst = s.find(s.ckpt, (tag, "rank", r % ws))
        src = s.find(src_tree, (src_tag, "rank", r % ws))
    elif kind in ("client_from_other_ckpt", "client_from_other_tag"):
        src_tree, src_tag = (
            (s.other, tag) if kind == "client_from_other_ckpt" else (s.ckpt, other_tag)
        )
        dst = s.find(s.ckpt, (tag, "client"))
        src = s.find(src_tree, (src_tag, "client"))
    elif kind == "manifest_from_other_ckpt":
        dst, src = s.find(s.ckpt, (tag, "manifest")), s.find(s.other, (tag, "manifest"))
    elif kind == "manifest_from_other_tag":
        dst, src = s.find(s.ckpt, (tag, "manifest")), s.find(s.ckpt, (other_tag, "manifest"))
    elif kind == "latest_from_other_ckpt":
        dst, src = s.ckpt / "latest", s.other / "latest"
    elif kind == "exchange_ranks":
        a, b = s.find(s.ckpt, (tag, "rank", 0)), s.find(s.ckpt, (tag, "rank", 1))
        if a is None or b is None or not (regular(a) and regular(b)):
            return f"{tag}: exchange_ranks skipped"
        da, db = a.read_bytes(), b.read_bytes()
        a.write_bytes(db)
        b.write_bytes(da)
        return f"{tag}: files of rank 0 and rank 1 exchanged (names kept)"
    else:
        raise ValueError(kind)
    if dst is None or src is None or not regular(src) or not os.path.lexists(dst):
        return f"{kind} on {tag}: source or destination missing, skipped"
    _replace_file(dst, src.read_bytes())
    return f"{dst.relative_to(s.root)}: replaced by the bytes of {src.relative_to(s.root)}"


def latest(s: Scratch, kind: str) -> str:
    p = s.ckpt / "latest"
    data = {
        "latest_dotdot": b"../outside",
        "latest_abs": str(s.other / "step2").encode(),
        "latest_nul": b"step2\x00",
        "latest_empty": b"",
        "latest_newline": b"step2\n",
        "latest_long": b"s" * 5000,
        "latest_other_tag": b"step1",
        "latest_invalid_utf8": b"step\xff",
        "latest_huge": b"step2" + b" " * (8 << 20),
    }[kind]
    _replace_file(p, data)
    return f"latest: contents set to {data[:40]!r}" + ("..." if len(data) > 40 else "")


def byte_mutation(s: Scratch, m: tuple[Any, ...]) -> str:
    kind, i = m[0], m[1]
    rel, p = s.pick(i)
    if not regular(p):
        return f"{rel}: not a regular file, {kind} skipped"
    data = bytearray(p.read_bytes())
    n = len(data)
    if kind == "bitflip":
        if not n:
            return f"{rel}: empty, bitflip skipped"
        pos = m[2] % n
        data[pos] ^= 1 << m[3]
        desc = f"bit {m[3]} of byte {pos} flipped"
    elif kind == "overwrite":
        if not n:
            return f"{rel}: empty, overwrite skipped"
        pos = m[2] % n
        data[pos : pos + len(m[3])] = m[3]
        desc = f"bytes {pos}..{pos + len(m[3])} overwritten with {bytes(m[3])!r}"
    elif kind == "truncate":
        keep = m[2] % max(n, 1)
        del data[keep:]
        desc = f"truncated from {n} to {keep} bytes"
    elif kind == "extend":
        data += m[2]
        desc = f"extended by {len(m[2])} bytes"
    else:
        raise ValueError(kind)
    p.write_bytes(bytes(data))
    return f"{rel}: {desc}"


def apply(s: Scratch, m: tuple[Any, ...]) -> str:
    """Apply one mutation tuple; return a readable description of what it did."""
    kind = m[0]
    if kind in ("bitflip", "overwrite", "truncate", "extend"):
        return byte_mutation(s, m)
    if kind == "manifest":
        return craft_manifest(s, m[1], TAGS[m[2] % 2], m[3])
    if kind == "blob":
        return craft_blob(s, m[1], TAGS[m[2] % 2], m[3])
    if kind == "type":
        return file_type(s, m[1], m[2])
    if kind == "tagdir":
        return tag_dir(s, m[1], TAGS[m[2] % 2])
    if kind == "swap":
        return swap(s, m[1], TAGS[m[2] % 2], m[3])
    if kind == "latest":
        return latest(s, m[1])
    raise ValueError(m)


# ---------------------------------------------------------------------------------- ops

# (op, tag): tag None means "resolve through latest".
LOADLIKE = ("load", "reshard", "fp32", "lazy", "client", "inspect")


def standard_ops(tags: tuple[str, ...] = TAGS) -> list[list[Any]]:
    ops: list[list[Any]] = []
    for t in tags:
        ops += [[op, t] for op in (*LOADLIKE, "verify")]
    ops += [["load", None], ["fp32", None], ["inspect", None], ["verify", None]]
    ops += [["list_tags", None], ["clean", None]]
    return ops


class DiffersError(AssertionError):
    """An op returned data other than what was committed."""


@dataclass
class Ctx:
    root: str
    k: int  # world size to reshard-load at
    golden: dict[str, Any]

    @property
    def save_dir(self) -> str:
        return os.path.join(self.root, "ckpt")


def _cli(argv: list[str]) -> tuple[int, str]:
    from zckpt.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main([*argv, "--debug"])
    return rc, out.getvalue()


def _tag_args(tag: str | None) -> list[str]:
    return [] if tag is None else ["--tag", tag]


def _state_eq(actual: Any, expected: Any, what: str) -> None:
    from zckpt.testing import assert_states_equal

    try:
        assert_states_equal(actual, expected)
    except AssertionError as e:
        raise DiffersError(f"{what}: {e}") from None


def _match_any(ctx: Ctx, key: str, value: Any, what: str) -> str:
    """The committed tag whose golden ``key`` equals ``value``, else DiffersError."""
    for t, g in ctx.golden.items():
        try:
            _state_eq(value, g[key], what)
            return t
        except DiffersError:
            continue
    raise DiffersError(f"{what}: equals no committed tag's data")


def _materialise(lazy: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {k: v if isinstance(v, torch.Tensor) else v.contiguous() for k, v in lazy.items()}


# What inspect reports about the committed data (stored sizes and the spec are read from the
# headers and the manifest as they are, and are not compared).
INSPECT_KEYS = ("tag", "tensors", "client_state")
INSPECT_TENSOR_KEYS = ("path", "dtype", "shape", "bytes")


def run_op(ctx: Ctx, op: str, tag: str | None, golden: dict[str, Any] | None) -> dict[str, Any]:
    """Run one op; compare with ``ctx.golden`` (or, in golden mode, record into ``golden``)."""
    import zckpt

    d = ctx.save_dir
    g = ctx.golden.get(tag) if tag is not None else None
    if op == "load":
        got = zckpt.load_checkpoint(d, tag=tag)
        if got.load_path is None:
            if os.path.lexists(os.path.join(d, "latest")):
                raise DiffersError("load_checkpoint returned load_path=None although latest exists")
            return {"loaded": None}
        loaded = os.path.basename(os.path.normpath(got.load_path))
        if os.path.dirname(os.path.normpath(got.load_path)) != os.path.normpath(d):
            raise DiffersError(f"loaded {got.load_path}, which is not a tag directory of {d}")
        if golden is not None:
            golden["full"], golden["client"] = got.state, got.client_state
            return {"loaded": loaded}
        if loaded not in ctx.golden or (tag is not None and loaded != tag):
            raise DiffersError(f"loaded tag {loaded!r}, asked for {tag!r}")
        _state_eq(got.state, ctx.golden[loaded]["full"], "state")
        _state_eq(got.client_state, ctx.golden[loaded]["client"], "client_state")
        return {"loaded": loaded}
    if op == "reshard":
        parts = [
            zckpt.load_checkpoint(d, tag=tag, world_size=ctx.k, rank=r).state for r in range(ctx.k)
        ]
        if golden is not None:
            golden["reshard"] = parts
        else:
            _state_eq(parts, g["reshard"], f"world size {ctx.k} ranks")
        return {}
    if op in ("fp32", "lazy"):
        sd = zckpt.get_fp32_state_dict_from_zero_checkpoint(d, tag, lazy_mode=op == "lazy")
        if op == "lazy":
            sd = _materialise(sd)
        if golden is not None:
            golden[op] = sd
        elif tag is None:
            return {"loaded": _match_any(ctx, "fp32", sd, "fp32 state dict")}
        else:
            _state_eq(sd, g[op], "fp32 state dict")
        return {}
    if op == "client":
        cs = zckpt.open_checkpoint(d, tag).client_state()
        if golden is not None:
            golden["client_only"] = cs
        else:
            _state_eq(cs, g["client_only"], "client_state()")
        return {}
    if op == "inspect":
        rc, out = _cli(["inspect", d, *_tag_args(tag), "--json"])
        if rc != 0:
            raise DiffersError(f"inspect exited {rc} without raising")
        doc = json.loads(out)
        sub = {k: doc.get(k) for k in INSPECT_KEYS}
        sub["tensors"] = [{k: t.get(k) for k in INSPECT_TENSOR_KEYS} for t in doc["tensors"]]
        if golden is not None:
            golden["inspect"] = sub
            return {}
        want = ctx.golden.get(doc.get("tag"), {}).get("inspect")
        if want is None or (tag is not None and doc.get("tag") != tag):
            raise DiffersError(f"inspect describes tag {doc.get('tag')!r}, asked for {tag!r}")
        if sub != want:
            bad = [k for k in INSPECT_KEYS if sub[k] != want[k]]
            raise DiffersError(f"inspect output differs in {bad}")
        return {}
    if op == "verify":
        rc, out = _cli(["verify", d, *_tag_args(tag), "--json"])
        if rc not in (0, 1):
            raise DiffersError(f"verify exited {rc}")
        try:
            problems = json.loads(out).get("problems", [])
        except ValueError:
            problems = [out[-300:]]
        if golden is not None and rc != 0:
            raise DiffersError(f"verify fails on the pristine checkpoint: {problems}")
        return {"rc": rc, "problems": [str(p)[:200] for p in problems[:3]]}
    if op == "list_tags":
        tags = [c.tag for c in zckpt.list_tags(d)]
        if not set(tags) <= set(ctx.golden) and golden is None:
            raise DiffersError(f"list_tags lists {tags}, committed were {sorted(ctx.golden)}")
        return {"tags": tags}
    if op == "clean":
        return _clean_op(ctx)
    # The harness's own checks (tests/test_dir_fuzz.py::test_harness_catches_what_it_must).
    if op == "_hang":
        time.sleep(3600)
    if op == "_alloc_4g":
        return {"n": len(bytearray(4 << 30))}
    if op == "_spin":
        while True:
            pass
    if op == "_segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    raise ValueError(op)


def copy_tree(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` keeping FIFOs and symlinks; absolute links into ``src`` are
    rewritten to point into ``dst``."""
    os.mkdir(dst)
    for dirpath, dirnames, filenames in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        out = os.path.normpath(os.path.join(dst, rel))
        for n in [*dirnames, *filenames]:
            s, t = os.path.join(dirpath, n), os.path.join(out, n)
            st = os.lstat(s)
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(s)
                if os.path.isabs(target) and (target + "/").startswith(src + "/"):
                    target = dst + target[len(src) :]
                os.symlink(target, t)
            elif stat.S_ISDIR(st.st_mode):
                os.mkdir(t)
            elif stat.S_ISFIFO(st.st_mode):
                os.mkfifo(t)
            elif stat.S_ISREG(st.st_mode):
                shutil.copyfile(s, t)
        dirnames[:] = [n for n in dirnames if not os.path.islink(os.path.join(dirpath, n))]


def snapshot(root: str) -> dict[str, str]:
    """Every entry under ``root`` (not following links): type and content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [*dirnames, *filenames]:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    out[rel] = "file " + hashlib.sha1(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = "link " + os.readlink(p)
            else:
                out[rel] = f"mode {stat.S_IFMT(st.st_mode):o}"
        dirnames[:] = [n for n in dirnames if not os.path.islink(os.path.join(dirpath, n))]
    return out


def _clean_op(ctx: Ctx) -> dict[str, Any]:
    """``zckpt.clean`` and ``zckpt clean`` on a copy: nothing outside the save_dir changes, and
    every tag that loaded bitwise before still does."""
    import zckpt

    copy = f"{ctx.root}.clean{os.getpid()}"
    try:
        copy_tree(ctx.root, copy)
        d = os.path.join(copy, "ckpt")
        before_ok = []
        for t in ctx.golden:
            try:
                got = zckpt.load_checkpoint(d, tag=t)
                _state_eq(got.state, ctx.golden[t]["full"], "")
                before_ok.append(t)
            except (zckpt.ZckptError, DiffersError):
                pass
        keep = {k: v for k, v in snapshot(copy).items() if not k.startswith("ckpt")}
        removed = zckpt.clean(d)
        rc, _ = _cli(["clean", d])
        if rc != 0:
            raise DiffersError(f"zckpt clean exited {rc}")
        after = {k: v for k, v in snapshot(copy).items() if not k.startswith("ckpt")}
        if after != keep:
            changed = sorted(set(after.items()) ^ set(keep.items()))[:4]
            raise DiffersError(f"clean changed files outside the save_dir: {changed}")
        for t in before_ok:
            try:
                got = zckpt.load_checkpoint(d, tag=t)
            except zckpt.ZckptError as e:
                raise DiffersError(f"tag {t} loaded before clean, not after: {e!r}"[:300]) from None
            _state_eq(got.state, ctx.golden[t]["full"], f"tag {t} after clean")
        return {"removed": removed[:8]}
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def _classify(e: BaseException) -> dict[str, Any]:
    import zckpt

    tb = traceback.extract_tb(e.__traceback__)
    where = [f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in tb[-3:]]
    msg = " ".join(str(e).split())[:400]
    if isinstance(e, DiffersError):
        return {"outcome": "differs", "type": "", "msg": msg}
    if isinstance(e, zckpt.ZckptError):
        return {"outcome": "zckpt", "type": type(e).__name__, "msg": msg}
    return {"outcome": "other", "type": type(e).__name__, "msg": msg, "where": where}


def _child(ctx: Ctx, ops: list[list[Any]], w: int, golden_path: str | None) -> None:
    import resource

    with open("/proc/self/status") as f:
        vm = next(int(x.split()[1]) << 10 for x in f if x.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + HEADROOM, resource.RLIM_INFINITY))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    goldens: dict[str, Any] = {}
    for op, tag in ops:
        rec = goldens.setdefault(tag, {}) if golden_path is not None else None
        try:
            res = {"outcome": "ok", **run_op(ctx, op, tag, rec)}
        except BaseException as e:  # every outcome is reported, the parent judges it
            res = _classify(e)
        res.update(op=op, tag=tag)
        os.write(w, (json.dumps(res) + "\n").encode())
    if golden_path is not None:
        import torch

        torch.save(goldens, golden_path)
        os.write(w, b'{"op": "golden-saved"}\n')


class Watchdog:
    """Decides when an op in a child hangs, robustly on a busy machine: it has used more than
    ``cpu_limit`` seconds of CPU (a loop), or every thread of it has slept for ``blocked``
    seconds without using CPU (blocked, e.g. opening a FIFO), or ``wall`` seconds have passed.
    A child that is merely starved of CPU is runnable, so it is never judged blocked."""

    def __init__(self, pid: int, cpu_limit: float, blocked: float = 2.0, wall: float = 60.0):
        self.pid, self.cpu_limit, self.wall = pid, cpu_limit, wall
        self.blocked = min(blocked, cpu_limit)
        self.tick = os.sysconf("SC_CLK_TCK")
        self.reset()

    def _sample(self) -> tuple[float, bool]:
        """(CPU seconds used, whether every thread sleeps)."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / self.tick
            states = []
            for t in os.listdir(f"/proc/{self.pid}/task"):
                with open(f"/proc/{self.pid}/task/{t}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
        except (OSError, IndexError, ValueError):
            return getattr(self, "cpu0", 0.0), False
        return cpu, all(st in "SD" for st in states)

    def reset(self) -> None:
        self.start = self.changed = time.monotonic()
        self.cpu0 = self.last = self._sample()[0]

    def verdict(self) -> str | None:
        now = time.monotonic()
        cpu, asleep = self._sample()
        if cpu != self.last:
            self.last, self.changed = cpu, now
        if cpu - self.cpu0 > self.cpu_limit:
            return f"hang: more than {self.cpu_limit}s of CPU"
        if asleep and now - self.changed > self.blocked:
            return f"hang: blocked (asleep, no CPU) for {self.blocked}s"
        if now - self.start > self.wall:
            return f"hang: no answer in {self.wall}s"
        return None


def run_job(job: dict[str, Any], cache: dict[str, Any]) -> list[dict[str, Any]]:
    """Run ``job['ops']`` in forked children: one child for all, a fresh one after a hang."""
    import torch

    gp = job.get("golden")
    golden = {}
    if gp and not job.get("make_golden"):
        if gp not in cache:
            cache[gp] = torch.load(gp, weights_only=False)
        golden = cache[gp]
    ctx = Ctx(job["root"], job["k"], golden)
    ops = job["ops"]
    if job.get("make_golden"):  # golden outputs are per committed tag
        ops = [[op, tag] for op, tag in ops if tag is not None]
    timeout = job.get("timeout", OP_TIMEOUT)
    results: list[dict[str, Any]] = []
    i = 0
    while i < len(ops):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.close(r)
                _child(ctx, ops[i:], w, gp if job.get("make_golden") else None)
            finally:
                os._exit(0)
        os.close(w)
        buf = b""
        dog = Watchdog(pid, timeout)
        dead = None
        while True:
            ready, _, _ = select.select([r], [], [], 0.2)
            if not ready:
                dead = dog.verdict()
                if dead:
                    os.kill(pid, signal.SIGKILL)
                    break
                continue
            chunk = os.read(r, 1 << 16)
            if not chunk:
                dead = "died"
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                res = json.loads(line)
                if res.get("op") != "golden-saved":
                    results.append(res)
                    i += 1
                dog.reset()
        os.close(r)
        _, status = os.waitpid(pid, 0)
        if i < len(ops):
            op, tag = ops[i]
            if dead != "died":
                hang = {"op": op, "tag": tag, "outcome": "timeout", "type": "", "msg": dead}
                results.append(hang)
            else:
                sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
                how = f"signal {signal.Signals(sig).name}" if sig else f"exit {status >> 8}"
                results.append({"op": op, "tag": tag, "outcome": "killed", "type": "", "msg": how})
            i += 1
            if job.get("fail_fast") and dead != "died":
                break
    return results


def _warm_up() -> None:
    """Import and run everything once, so that children start warm (Numba cache loaded)."""
    root = tempfile.mkdtemp()
    try:
        build_fixture(Path(root), Params(2, 2, "byteplane"))
        ctx = Ctx(root, 3, {})
        for op, tag in standard_ops():
            if op != "clean":
                with contextlib.suppress(Exception):
                    run_op(ctx, op, tag, {})
    finally:
        shutil.rmtree(root, ignore_errors=True)


def serve() -> None:
    """Read JSON jobs from stdin, one a line; answer each with a JSON line of results."""
    import torch

    torch.set_num_threads(1)
    _warm_up()
    cache: dict[str, Any] = {}
    out = sys.stdout
    sys.stdout = sys.stderr  # only results go to the real stdout
    print(json.dumps({"ready": True}), file=out, flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        try:
            res: Any = {"results": run_job(job, cache)}
        except Exception as e:
            res = {"error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()}
        print(json.dumps(res), file=out, flush=True)


class Harness:
    """The parent's end of the fork server."""

    def __init__(self, log: Path) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(sys.path),
            "MALLOC_ARENA_MAX": "2",
            "OMP_NUM_THREADS": "1",
        }
        self._log = open(log, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            text=True,
        )
        line = self._readline(120)
        if not json.loads(line).get("ready"):
            raise RuntimeError(f"fork server did not start: {line!r}")

    def _readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.close()
            raise RuntimeError(f"fork server gave no answer in {timeout}s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server died (see {self._log.name})")
        return line

    def run(
        self,
        root: Path,
        k: int,
        golden: Path,
        ops: list[list[Any]] | None = None,
        *,
        make_golden: bool = False,
        timeout: float = OP_TIMEOUT,
        fail_fast: bool = False,
    ) -> list[dict[str, Any]]:
        ops = standard_ops() if ops is None else ops
        job = {
            "root": str(root),
            "k": k,
            "golden": str(golden),
            "make_golden": make_golden,
            "ops": ops,
            "timeout": timeout,
            "fail_fast": fail_fast,
        }
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        ans = json.loads(self._readline(65 * len(ops) + 60))
        if "error" in ans:
            raise RuntimeError(f"fork server failed: {ans['error']}\n{ans.get('tb')}")
        return list(ans["results"])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def violations(results: list[dict[str, Any]]) -> list[str]:
    """What the invariant forbids: a non-zckpt exception, a hang, a crash, data other than what
    was committed, and verify passing a tag that some reader then refuses."""
    out = []
    by = {(r["op"], r["tag"]): r for r in results}
    for r in results:
        if r["outcome"] in ("other", "timeout", "killed", "differs"):
            where = f" at {r['where'][-1]}" if r.get("where") else ""
            kind = {"other": "raised", "differs": "returned wrong data:"}.get(
                r["outcome"], r["outcome"]
            )
            out.append(f"{r['op']}({r['tag']}) {kind} {r.get('type', '')}{where}: {r['msg']}")
    for (op, tag), v in by.items():
        if op != "verify" or v["outcome"] != "ok" or v.get("rc") != 0:
            continue
        for lop in LOADLIKE:
            x = by.get((lop, tag))
            if x is not None and x["outcome"] == "zckpt":
                out.append(
                    f"verify({tag}) exits 0 but {lop}({tag}) raised {x['type']}: {x['msg'][:200]}"
                )
    return out


def summary(results: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"  {r['op']}({r['tag']}): {r['outcome']} {r.get('type', '')} {r.get('msg', '')[:160]}"
        + (f" rc={r['rc']}" if "rc" in r else "")
        for r in results
    )


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()


def file_tree(path: Path) -> dict[str, bytes] | None:
    """Every file under ``path`` (relative name -> bytes); None when ``path`` does not exist."""
    if not os.path.lexists(path):
        return None
    if not path.is_dir():
        return {"": path.read_bytes()}
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }
