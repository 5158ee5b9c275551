"""Hostile zip containers for DeepSpeed's ``.pt`` files (``zckpt/interop/_fastload.py``).

torch's own loads (``mmap=True`` or not) take a zip record's bytes where the central directory
and the local header say, checking neither against the other: a record whose directory entry
points at another record's header, a duplicate name, or a local header whose extra field grew
gives another tensor's bytes, a duplicate's copy or a shifted range, silently (and the fast
path, which read records the same way, gave them too; with a duplicate name it even took the
other copy than torch). The property here: whatever is done to a file's zip structure (the
headers, descriptors, central directory, end record; never the pickle's or a storage's bytes),
:func:`zckpt.interop.load_pickle` and ``load_refs`` either raise a zckpt ``FormatError`` or give
exactly the values the file was saved with.
"""

from __future__ import annotations

import io
import struct
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import zckpt
import zckpt.interop as zi
from zckpt.interop._fastload import NOT_FAST, load_refs
from zckpt.interop._refs import to_torch

VALUES: dict[str, Any] = {
    "a": torch.arange(4.0),
    "b": torch.arange(10, 16, dtype=torch.int64).reshape(2, 3),
    "c": torch.arange(3.0, dtype=torch.float64)[1:],  # a view: storage offset 1
    "n": torch.Size([2, 3]),
}


def _torch_file() -> bytes:
    f = io.BytesIO()
    torch.save(VALUES, f)
    return f.getvalue()


def _rezip(raw: bytes, deflate: str = "", dup: str = "", dup_first: bool = False) -> bytes:
    """``raw``'s records rewritten by ``zipfile`` (no data descriptors, no alignment): record
    ``deflate`` compressed; record ``dup`` written twice, one copy (the first or the last) with
    other bytes of the same length."""
    out = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(io.BytesIO(raw)) as a:
        warnings.simplefilter("ignore")  # "Duplicate name"
        b = zipfile.ZipFile(out, "w")
        for info in a.infolist():
            body = a.read(info)
            other = bytes(len(body)) if info.filename.endswith(dup or "\0") else None
            if other is not None and dup_first:
                b.writestr(info.filename, other)
            how = zipfile.ZIP_DEFLATED if info.filename.endswith(deflate or "\0") else 0
            b.writestr(info.filename, body, compress_type=how)
            if other is not None and not dup_first:
                b.writestr(info.filename, b"\x7f" * len(body))
        b.close()
    return out.getvalue()


RAW = _torch_file()
BASES = {
    "torch": RAW,
    "zipfile": _rezip(RAW),
    "deflated": _rezip(RAW, deflate="data/0"),
    "dup_last": _rezip(RAW, dup="data/0"),
    "dup_first": _rezip(RAW, dup="data/1", dup_first=True),
    "dup_pickle": _rezip(RAW, dup="data.pkl"),
}


def _layout(raw: bytes) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """The data spans of the records (what no mutation touches), the local headers' offsets
    and the central directory entries' offsets, as the intact file has them."""
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        infos = z.infolist()
        start = z.start_dir
    data, local = [], []
    for i in infos:
        n, m = struct.unpack_from("<HH", raw, i.header_offset + 26)
        at = i.header_offset + 30 + n + m
        data.append((at, at + i.compress_size))
        local.append(i.header_offset)
    central, pos = [], start
    while raw[pos : pos + 4] == b"PK\x01\x02":
        central.append(pos)
        n, m, k = struct.unpack_from("<HHH", raw, pos + 28)
        pos += 46 + n + m + k
    return data, local, central


def _structural(raw: bytes) -> list[int]:
    data, _, _ = _layout(raw)
    inside = bytearray(len(raw))
    for a, b in data:
        inside[a:b] = b"\x01" * (b - a)
    return [i for i in range(len(raw)) if not inside[i]]


def _u16(b: bytearray, at: int, delta: int) -> None:
    struct.pack_into("<H", b, at, (struct.unpack_from("<H", b, at)[0] + delta) % 65536)


def _u32(b: bytearray, at: int, value: int) -> None:
    struct.pack_into("<I", b, at, value % (1 << 32))


STRUCTURE = {name: _structural(raw) for name, raw in BASES.items()}

# A mutation: (kind, a, b), applied to the file as it is when its turn comes; a and b are
# fractions or small ints, interpreted by _mutate against the file's own layout.
MUTATIONS = st.tuples(
    st.sampled_from(["flip", "trunc", "append", "offset", "offset_to", "extra", "csize", "name"]),
    st.integers(0, 1 << 20),
    st.integers(-64, 64),
)


def _mutate(raw: bytes, kind: str, a: int, d: int, fixed: list[int] | None = None) -> bytes:
    """``raw`` mutated; ``fixed``: the bytes a flip may hit (default: ``raw``'s structure)."""
    b = bytearray(raw)
    try:
        _, local, central = _layout(raw)
    except (zipfile.BadZipFile, struct.error, IndexError):
        local, central = [], []
    if kind == "flip":
        at = [i for i in (_structural(raw) if fixed is None else fixed) if i < len(b)]
        if at:
            b[at[a % len(at)]] ^= 1 << (d % 8)
    elif kind == "trunc":
        del b[a % (len(b) + 1) :]
    elif kind == "append":
        b += bytes([a % 256]) * (d % 64 + 1)
    elif not central:
        return bytes(b)
    elif kind in ("offset", "offset_to"):
        c = central[a % len(central)]
        old = struct.unpack_from("<I", b, c + 42)[0]
        new = local[d % len(local)] if kind == "offset_to" else old + d
        _u32(b, c + 42, new)
    elif kind == "extra":
        _u16(b, local[a % len(local)] + 28, d)
    elif kind == "csize":
        c = central[a % len(central)]
        for field in (20, 24):
            _u32(b, c + field, struct.unpack_from("<I", b, c + field)[0] + d)
    elif kind == "name":  # one byte of a local header's record name
        h = local[a % len(local)]
        n = struct.unpack_from("<H", b, h + 26)[0]
        b[h + 30 + (d % max(n, 1))] ^= 0x01
    return bytes(b)


def _equal(got: Any) -> bool:
    if not isinstance(got, dict) or list(got) != list(VALUES):
        return False
    for k, want in VALUES.items():
        v = got[k]
        if isinstance(want, torch.Tensor):
            if not isinstance(v, torch.Tensor) or (v.dtype, v.shape, v.stride()) != (
                want.dtype,
                want.shape,
                want.stride(),
            ):
                return False
            if not torch.equal(v, want):
                return False
        elif type(v) is not type(want) or v != want:
            return False
    return True


def _check(load: Callable[[], Any]) -> None:
    try:
        got = load()
    except zckpt.FormatError:
        return
    if got is NOT_FAST:
        return
    assert _equal(got), f"a damaged file read as other values without an error: {got!r}"


@settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(base=st.sampled_from(sorted(BASES)), mutations=st.lists(MUTATIONS, max_size=3))
@example(base="dup_first", mutations=[])  # torch takes the first copy, zipfile the last
@example(base="dup_last", mutations=[])
@example(base="dup_pickle", mutations=[])
@example(base="torch", mutations=[("offset_to", 4, 5)])  # data/0's entry -> data/1's header
@example(base="torch", mutations=[("extra", 4, 16)])  # data/0 shifted onto its descriptor
@example(base="zipfile", mutations=[("extra", 4, 8)])  # shifted, no descriptors to tell
@example(base="torch", mutations=[("csize", 4, 64)])
@example(base="deflated", mutations=[])  # refused by the byte-range path: torch's load reads it
def test_a_damaged_zip_is_refused_or_read_right(
    tmp_path: Path, base: str, mutations: list[tuple[str, int, int]]
) -> None:
    raw = BASES[base]
    fixed = STRUCTURE[base]  # a flip never hits a record's bytes, whatever came before it
    for kind, a, d in mutations:
        raw = _mutate(raw, kind, a, d, fixed)
    p = tmp_path / "x.pt"
    p.write_bytes(raw)
    _check(lambda: zi.load_pickle(p))
    _check(lambda: _built(load_refs(str(p))))


def _built(refs: Any) -> Any:
    return refs if refs is NOT_FAST else to_torch(refs)


@pytest.mark.parametrize(
    ("base", "mutation", "message"),
    [
        ("dup_first", None, r"x\.pt: two zip records are named archive/data/1"),
        ("torch", ("offset_to", 4, 5), r"x\.pt: record archive/data/0: the local header at byte"),
        ("torch", ("extra", 4, 16), r"x\.pt: record archive/data/0: its data descriptor at byte"),
        ("zipfile", ("extra", 4, 8), r"x\.pt: record archive/data/0 \(bytes \d+ to \d+\) over"),
    ],
)
def test_the_error_names_the_file_the_record_and_the_offset(
    tmp_path: Path, base: str, mutation: tuple[str, int, int] | None, message: str
) -> None:
    raw = BASES[base]
    if mutation is not None:
        raw = _mutate(raw, *mutation)
    p = tmp_path / "x.pt"
    p.write_bytes(raw)
    if base == "torch":  # torch's own loads read these without an error, as other values
        got = torch.load(p, weights_only=True)
        assert not _equal(got)
    with pytest.raises(zckpt.FormatError, match=message):
        zi.load_pickle(p)


def test_the_mutations_reach_what_they_aim_at(tmp_path: Path) -> None:
    # The property is not vacuous: the intact bases load as saved, by the fast path where
    # their records are stored, and each aimed mutation changes the file.
    for name in ("torch", "zipfile", "deflated"):
        p = tmp_path / f"{name}.pt"
        p.write_bytes(BASES[name])
        assert _equal(torch.load(p, weights_only=True))
        refs = load_refs(str(p))
        assert (refs is NOT_FAST) == (name == "deflated")
        assert _equal(zi.load_pickle(p))
    for kind in ("offset_to", "extra", "csize", "name", "flip"):
        assert _mutate(RAW, kind, 4, 5) != RAW, kind
    assert sys.byteorder.encode() in RAW
