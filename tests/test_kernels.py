"""zckpt.kernels: every kernel equals its NumPy reference; the upcasts equal torch on all inputs.

The Numba kernels are called directly as well as through the public wrappers, so that with
``NUMBA_DISABLE_JIT=1`` (where the wrappers use the reference) their logic is still checked, run
as Python. Sizes stay small for that reason.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from zckpt import kernels
from zckpt.kernels import _numba, _reference

UINTS = (np.uint8, np.uint16, np.uint32, np.uint64)
# Bit patterns every upcast test should meet: signed zeros, infinities, NaNs (quiet, signalling,
# with payloads, negative), subnormals, extremes, for both fp16 and bf16 layouts.
SPECIAL_16 = [
    0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0x7C01, 0x7D01, 0xFE55, 0x7FFF, 0xFFFF,
    0x0001, 0x03FF, 0x8001, 0x83FF, 0x0400, 0x7BFF, 0xFBFF,
    0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0xFF81, 0x0080, 0x007F, 0x7F7F,
]  # fmt: skip


def _array(raw: bytes, dtype: Any) -> npt.NDArray[Any]:
    return np.frombuffer(raw, dtype=dtype).copy()


@st.composite
def range_tables(draw: st.DrawFn, max_len: int = 200, max_rows: int = 20) -> tuple[Any, ...]:
    """``(src_len, dst_len, table)``: in-bounds rows whose dst ranges do not overlap."""
    src_len = draw(st.integers(0, max_len))
    dst_len = draw(st.integers(0, max_len))
    n = draw(st.integers(0, max_rows))
    # Disjoint dst ranges: consecutive pairs of sorted cut points (empty ranges allowed).
    cuts = sorted(draw(st.lists(st.integers(0, dst_len), min_size=2 * n, max_size=2 * n)))
    rows = []
    for d, e in zip(cuts[::2], cuts[1::2], strict=True):
        count = min(e - d, src_len)
        s = draw(st.integers(0, src_len - count))
        rows.append([s, d, count])
    rows = draw(st.permutations(rows))
    return src_len, dst_len, np.array(rows, dtype=np.int64).reshape(-1, 3)


def _u16_values(n: int) -> st.SearchStrategy[list[int]]:
    value = st.one_of(st.sampled_from(SPECIAL_16), st.integers(0, 0xFFFF))
    return st.lists(value, min_size=n, max_size=n)


# ---------------------------------------------------------------------------------------------
# copy_ranges


@given(range_tables(), st.sampled_from(UINTS), st.data())
def test_copy_ranges_matches_reference(
    spec: tuple[Any, ...], dtype: Any, data: st.DataObject
) -> None:
    src_len, dst_len, table = spec
    k = np.dtype(dtype).itemsize
    src = _array(data.draw(st.binary(min_size=src_len * k, max_size=src_len * k)), dtype)
    before = _array(data.draw(st.binary(min_size=dst_len * k, max_size=dst_len * k)), dtype)
    want = before.copy()
    _reference.copy_ranges(want, src, table)
    got = before.copy()
    _numba.copy_ranges(got, src, table)
    np.testing.assert_array_equal(got, want)
    for threads in (None, 1, 3):
        got = before.copy()
        kernels.copy_ranges(got, src, table, threads=threads)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.bool_, np.complex128, "S3"])
def test_copy_ranges_any_plain_dtype(dtype: Any) -> None:
    # Non-uint dtypes move as bytes; 16- and 3-byte elements go through a uint8 view.
    k = np.dtype(dtype).itemsize
    src = np.arange(10 * k, dtype=np.uint8).view(dtype)
    dst = np.zeros(8, dtype)
    table = np.array([[1, 0, 3], [6, 4, 4]])
    kernels.copy_ranges(dst, src, table)
    want = np.zeros(8, dtype)
    want[0:3], want[4:8] = src[1:4], src[6:10]
    assert dst.tobytes() == want.tobytes()


def test_copy_ranges_overlapping_rows_apply_in_order() -> None:
    src = np.arange(100, dtype=np.uint32)
    table = np.array([[0, 0, 60], [50, 10, 40], [0, 20, 5]])
    for threads in (1, 4):
        dst = np.zeros(60, np.uint32)
        kernels.copy_ranges(dst, src, table, threads=threads)
        want = np.arange(60, dtype=np.uint32)
        want[10:50] = np.arange(50, 90)
        want[20:25] = np.arange(5)
        np.testing.assert_array_equal(dst, want)


def test_copy_ranges_shared_memory_is_memmove() -> None:
    buf = np.arange(20, dtype=np.uint16)
    want = buf.copy()
    want[3:13] = want[0:10].copy()
    kernels.copy_ranges(buf, buf, [[0, 3, 10]])
    np.testing.assert_array_equal(buf, want)


def test_copy_ranges_misaligned_views() -> None:
    raw = np.arange(41, dtype=np.uint8)
    src = raw[1:].view(np.uint32)  # odd address: the wrapper takes the NumPy path
    assert not src.flags.aligned
    dst = np.zeros(10, np.uint32)
    kernels.copy_ranges(dst, src, [[2, 1, 8]])
    np.testing.assert_array_equal(dst[1:9], src[2:10])


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ([-1, 0, 1], "row 1 .* negative"),
        ([0, -1, 1], "row 1 .* negative"),
        ([0, 0, -1], "row 1 .* negative"),
        ([8, 0, 3], "row 1 .* past the end of src \\(10 elements\\)"),
        ([0, 4, 3], "row 1 .* past the end of dst \\(6 elements\\)"),
        ([0, 0, 11], "row 1 .* past the end of src"),
        ([2**62, 0, 2**62], "row 1 .* past the end of src"),
        ([0, 2**63 - 1, 1], "row 1 .* past the end of dst"),
    ],
)
def test_copy_ranges_rejects_bad_rows_before_copying(row: list[int], match: str) -> None:
    dst = np.zeros(6, np.uint8)
    with pytest.raises(ValueError, match=match):
        kernels.copy_ranges(dst, np.ones(10, np.uint8), [[0, 0, 6], row])
    assert not dst.any()
    f32 = np.zeros(6, np.float32)
    with pytest.raises(ValueError, match=match):
        kernels.upcast_ranges(f32, np.ones(10, np.uint16), [[0, 0, 6], row], "bf16")
    assert not f32.any()


@pytest.mark.parametrize("rows", [3, 40])  # few rows are checked in Python, many in NumPy
def test_bad_row_is_named_for_any_table_size(rows: int) -> None:
    table = np.array([[i, i, 1] for i in range(rows)])
    table[rows - 2] = [0, 5, 10**6]
    with pytest.raises(ValueError, match=rf"row {rows - 2} .* past the end of src \(50 elements\)"):
        kernels.copy_ranges(np.zeros(50, np.uint16), np.zeros(50, np.uint16), table)
    table[rows - 2] = [0, 1000, 1]
    with pytest.raises(ValueError, match=rf"row {rows - 2} .* past the end of dst \(50 elements\)"):
        kernels.copy_ranges(np.zeros(50, np.uint16), np.zeros(50, np.uint16), table)
    table[rows - 2] = [0, 0, -1]
    with pytest.raises(ValueError, match=rf"row {rows - 2} .* negative"):
        kernels.copy_ranges(np.zeros(50, np.uint16), np.zeros(50, np.uint16), table)
    # Non-int64 and non-contiguous tables are converted.
    table = np.asfortranarray(np.array([[i, i, 1] for i in range(rows)], np.uint32))
    dst = np.zeros(50, np.uint16)
    kernels.copy_ranges(dst, np.arange(50, dtype=np.uint16) + 1, table)
    assert dst[:rows].tolist() == list(range(1, rows + 1))


def test_copy_ranges_rejects_bad_arguments() -> None:
    a = np.zeros(8, np.uint8)
    with pytest.raises(ValueError, match="shape"):
        kernels.copy_ranges(a, a.copy(), [[0, 0]])
    with pytest.raises(TypeError, match="integers"):
        kernels.copy_ranges(a, a.copy(), [[0.0, 0.0, 1.0]])
    with pytest.raises(ValueError, match=r"row 0 .* out of range"):
        kernels.copy_ranges(a, a.copy(), np.array([[2**64 - 1, 0, 1]], np.uint64))
    with pytest.raises(TypeError, match="dtypes differ"):
        kernels.copy_ranges(a, a.view(np.int8), [[0, 0, 1]])
    with pytest.raises(TypeError, match=r"numpy\.ndarray"):
        kernels.copy_ranges(a, b"\0" * 8, [[0, 0, 1]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.copy_ranges(a, np.zeros(16, np.uint8)[::2], [[0, 0, 1]])
    with pytest.raises(ValueError, match="1-D"):
        kernels.copy_ranges(a.reshape(2, 4), a.reshape(2, 4), [[0, 0, 1]])
    with pytest.raises(TypeError, match="plain data"):
        kernels.copy_ranges(np.zeros(2, object), np.zeros(2, object), [[0, 0, 1]])
    ro = np.zeros(8, np.uint8)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        kernels.copy_ranges(ro, a, [[0, 0, 1]])
    with pytest.raises(ValueError, match="threads"):
        kernels.copy_ranges(a, a.copy(), [], threads=0)
    kernels.copy_ranges(a, a.copy(), np.empty((0, 3)))  # an empty table of any dtype is fine
    kernels.copy_ranges(a, a.copy(), [])


# ---------------------------------------------------------------------------------------------
# upcast_ranges


@given(range_tables(), st.sampled_from(["bf16", "f16"]), st.data())
def test_upcast_ranges_matches_reference(
    spec: tuple[Any, ...], kind: str, data: st.DataObject
) -> None:
    src_len, dst_len, table = spec
    src = np.array(data.draw(_u16_values(src_len)), dtype=np.uint16)
    before = _array(data.draw(st.binary(min_size=4 * dst_len, max_size=4 * dst_len)), np.float32)
    want = before.copy()
    _reference.upcast_ranges(want, src, table, kind)
    got = before.copy()
    _numba.upcast_ranges(got, src, table, kind)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    for threads in (None, 1, 3):
        got = before.copy()
        kernels.upcast_ranges(got, src, table, kind, threads=threads)  # type: ignore[arg-type]
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


ALL_16 = np.arange(1 << 16, dtype=np.uint16)
UPCASTS = [
    pytest.param(_reference.upcast_ranges, id="reference"),
    pytest.param(_numba.upcast_ranges, id="numba"),
    pytest.param(kernels.upcast_ranges, id="public"),
]


def _torch_bits(kind: str) -> npt.NDArray[np.uint32]:
    # 65536 is a multiple of torch's vector width: every element takes its bulk conversion.
    dt = torch.bfloat16 if kind == "bf16" else torch.float16
    out: npt.NDArray[np.uint32] = torch.from_numpy(ALL_16).view(dt).float().numpy().view(np.uint32)
    return out


@pytest.mark.parametrize("upcast", UPCASTS)
@pytest.mark.parametrize("kind", ["bf16", "f16"])
def test_upcast_exhaustive_against_torch(upcast: Any, kind: str) -> None:
    dst = np.full(1 << 16, np.nan, np.float32)
    upcast(dst, ALL_16, np.array([[0, 0, 1 << 16]], np.int64), kind)
    got, want = dst.view(np.uint32), _torch_bits(kind)
    bad = np.flatnonzero(got != want)
    assert not len(bad), [(hex(i), hex(got[i]), hex(want[i])) for i in bad[:8]]


@pytest.mark.parametrize("upcast", UPCASTS)
@pytest.mark.parametrize(
    ("h", "f32"),
    [
        (0x0000, 0x00000000),  # +0
        (0x8000, 0x80000000),  # -0
        (0x7C00, 0x7F800000),  # +inf
        (0xFC00, 0xFF800000),  # -inf
        (0x7E00, 0x7FC00000),  # canonical quiet NaN
        (0x7C01, 0x7FC02000),  # signalling NaN: payload kept, quiet bit set
        (0xFD55, 0xFFEAA000),  # negative signalling NaN with payload
        (0x0001, 0x33800000),  # smallest subnormal, 2**-24
        (0x03FF, 0x387FC000),  # largest subnormal
        (0x8200, 0xB8000000),  # -2**-15, a subnormal
        (0x0400, 0x38800000),  # smallest normal, 2**-14
        (0x7BFF, 0x477FE000),  # 65504
        (0x3C00, 0x3F800000),  # 1.0
    ],
)
def test_upcast_f16_known_values(upcast: Any, h: int, f32: int) -> None:
    dst = np.zeros(1, np.float32)
    upcast(dst, np.array([h], np.uint16), np.array([[0, 0, 1]], np.int64), "f16")
    assert hex(int(dst.view(np.uint32)[0])) == hex(f32)


def test_upcast_bf16_keeps_signalling_nan() -> None:
    dst = np.zeros(2, np.float32)
    kernels.upcast_ranges(dst, np.array([0x7F81, 0xFFC1], np.uint16), [[0, 0, 2]], "bf16")
    assert [hex(int(b)) for b in dst.view(np.uint32)] == ["0x7f810000", "0xffc10000"]


def test_upcast_ranges_misaligned_and_shared() -> None:
    raw = np.zeros(2 * 9 + 1, np.uint8)
    src = raw[1:].view(np.uint16)
    src[:] = [0x3C00, 0x4000, 0x4200, 0x4400, 0x7C01, 0x0001, 0x8000, 0xFC00, 0x3555]
    want = np.empty(9, np.float32)
    _reference.upcast_ranges(want, src, np.array([[0, 0, 9]]), "f16")
    dst = np.empty(9, np.float32)
    kernels.upcast_ranges(dst, src, [[0, 0, 9]], "f16")
    np.testing.assert_array_equal(dst.view(np.uint32), want.view(np.uint32))
    # dst overlapping src: the source of the row is read before it is overwritten.
    buf = np.zeros(12, np.float32)
    buf.view(np.uint16)[:9] = src
    kernels.upcast_ranges(buf, buf.view(np.uint16), [[0, 0, 9]], "f16")
    np.testing.assert_array_equal(buf[:9].view(np.uint32), want.view(np.uint32))


def test_upcast_ranges_rejects_bad_arguments() -> None:
    dst = np.zeros(4, np.float32)
    src = np.zeros(4, np.uint16)
    with pytest.raises(ValueError, match="kind"):
        kernels.upcast_ranges(dst, src, [[0, 0, 1]], "f32")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="float32"):
        kernels.upcast_ranges(np.zeros(4, np.float64), src, [[0, 0, 1]], "f16")
    with pytest.raises(TypeError, match="2-byte"):
        kernels.upcast_ranges(dst, np.zeros(4, np.uint8), [[0, 0, 1]], "f16")
    # Any 2-byte dtype is taken as bit patterns.
    kernels.upcast_ranges(dst, np.array([1.5], np.float16), [[0, 2, 1]], "f16")
    assert dst.tolist() == [0.0, 0.0, 1.5, 0.0]


# ---------------------------------------------------------------------------------------------
# split_planes / join_planes

itemsizes = st.one_of(st.sampled_from([1, 2, 4, 8]), st.integers(1, 17))


@given(itemsizes, st.integers(0, 150), st.booleans(), st.data())
def test_planes_match_reference_and_round_trip(
    k: int, n: int, misalign: bool, data: st.DataObject
) -> None:
    raw = np.frombuffer(data.draw(st.binary(min_size=n * k, max_size=n * k)), np.uint8)
    # A misaligned buffer makes the word loops step aside for the byte loop.
    buf = np.empty(n * k + 1, np.uint8)
    src = buf[1:] if misalign else buf[:-1]
    src[:] = raw
    want = np.empty((k, n), np.uint8)
    _reference.split_planes(src, want, 0, n)
    got = np.empty((k, n), np.uint8)
    _numba.split_planes(src, got, 0, n)
    np.testing.assert_array_equal(got, want)
    for threads in (None, 1, 3):
        got = np.empty((k, n), np.uint8)
        kernels.split_planes(src, k, got, threads=threads)
        np.testing.assert_array_equal(got, want)

    back_buf = np.empty(n * k + 1, np.uint8)
    back = back_buf[1:] if misalign else back_buf[:-1]
    _numba.join_planes(want, back, 0, n)
    np.testing.assert_array_equal(back, src)
    for threads in (None, 1, 3):
        back[:] = 0
        kernels.join_planes(want, back, threads=threads)
        np.testing.assert_array_equal(back, src)
    ref_back = np.empty(n * k, np.uint8)
    _reference.join_planes(want, ref_back, 0, n)
    np.testing.assert_array_equal(ref_back, src)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 8, 16])
def test_planes_of_floats(k: int) -> None:
    # Little-endian: plane k-1 holds the sign/exponent byte of every element.
    x = np.arange(300, dtype=np.uint8)[: (300 // k) * k]
    out = np.empty((k, len(x) // k), np.uint8)
    kernels.split_planes(x, k, out)
    for b in range(k):
        np.testing.assert_array_equal(out[b], x[b::k])


@pytest.mark.parametrize("k", [2, 4, 8])
def test_planes_block_boundaries(k: int) -> None:
    # More elements than one generic-loop block, odd sizes, chunked across threads.
    n = 3 * 4096 + 77
    rng = np.random.default_rng(k)
    src = rng.integers(0, 256, n * k, dtype=np.uint8)
    for s in (src, np.concatenate([[0], src]).astype(np.uint8)[1:]):
        out = np.empty((k, n), np.uint8)
        kernels.split_planes(s, k, out, threads=3)
        np.testing.assert_array_equal(out, s.reshape(n, k).T)
        back = np.empty(n * k, np.uint8)
        kernels.join_planes(out, back, threads=3)
        np.testing.assert_array_equal(back, s)


def test_planes_shared_memory() -> None:
    buf = np.arange(16, dtype=np.uint8)
    kernels.split_planes(buf, 2, buf.reshape(2, 8))
    np.testing.assert_array_equal(buf[:8], np.arange(0, 16, 2))
    np.testing.assert_array_equal(buf[8:], np.arange(1, 16, 2))
    kernels.join_planes(buf.reshape(2, 8), buf)
    np.testing.assert_array_equal(buf, np.arange(16))


def test_planes_reject_bad_arguments() -> None:
    src = np.zeros(12, np.uint8)
    with pytest.raises(ValueError, match="itemsize"):
        kernels.split_planes(src, 0, np.zeros((0, 0), np.uint8))
    with pytest.raises(ValueError, match="multiple"):
        kernels.split_planes(src, 5, np.zeros((5, 2), np.uint8))
    with pytest.raises(ValueError, match=r"shape \(4, 3\)"):
        kernels.split_planes(src, 4, np.zeros((3, 4), np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        kernels.split_planes(src.view(np.uint16), 2, np.zeros((2, 6), np.uint8))
    with pytest.raises(ValueError, match="2-D"):
        kernels.join_planes(src, np.zeros(12, np.uint8))
    with pytest.raises(ValueError, match="at least one plane"):
        kernels.join_planes(np.zeros((0, 3), np.uint8), np.zeros(0, np.uint8))
    with pytest.raises(ValueError, match="12 bytes"):
        kernels.join_planes(src.reshape(4, 3), np.zeros(11, np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        kernels.join_planes(src.reshape(4, 3), np.zeros(12, np.int8))


# ---------------------------------------------------------------------------------------------
# Chunking for threads


@given(range_tables(max_rows=10), st.integers(1, 9))
def test_split_table_covers_every_element_once(spec: tuple[Any, ...], parts: int) -> None:
    _, _, table = spec
    table = table[table[:, 2] > 0]
    if not len(table):
        return

    def pairs(t: npt.NDArray[np.int64]) -> list[tuple[int, int]]:
        return [(s + j, d + j) for s, d, c in t.tolist() for j in range(c)]

    pieces = kernels._split_table(table, parts)
    assert len(pieces) <= parts
    assert sorted(p for piece in pieces for p in pairs(piece)) == sorted(pairs(table))
    assert all((piece[:, 2] >= 0).all() for piece in pieces)


def test_auto_threads_above_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_PARALLEL_MIN_BYTES", 1024)
    monkeypatch.setattr(kernels, "_MIN_CHUNK_BYTES", 256)
    assert kernels._n_threads(None, 1023) == 1
    assert kernels._n_threads(None, 4096) == min(kernels._cpus(), 8, 16)
    src = np.arange(5000, dtype=np.uint16)
    dst = np.zeros(5000, np.float32)
    kernels.upcast_ranges(dst, src, [[0, 0, 2500], [2500, 2500, 2500]], "bf16")
    np.testing.assert_array_equal(dst.view(np.uint32), src.astype(np.uint32) << 16)


def test_backend() -> None:
    import numba

    off = getattr(numba.config, "DISABLE_JIT", False)
    assert kernels.backend() == ("numpy" if off else "numba")
