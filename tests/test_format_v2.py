"""Format v2 (issue 13): the columnar skeleton wire form, as a value and as untrusted input."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from zckpt.errors import FormatError
from zckpt.format import skeleton_from_wire, skeleton_to_wire
from zckpt.format._columns import skeleton_digest, skeleton_from_columns, skeleton_to_columns
from zckpt.format._skeleton import MAX_DEPTH
from zckpt.testing import states, training_states
from zckpt.tree import DICT, LIST, TENSOR, VALUE, Skeleton, TensorMeta, flatten


def _wire(obj: Any) -> Any:
    """Through msgpack and back, as a reader gets it."""
    return msgpack.unpackb(msgpack.packb(obj, use_bin_type=True), raw=False, strict_map_key=False)


@given(states())
def test_columns_round_trip_and_agree_with_v1(state: Any) -> None:
    skel = flatten(state)[0]
    cols = _wire(skeleton_to_columns(skel))
    back = skeleton_from_columns(cols)
    assert back == skel and back.paths == skel.paths
    assert back.tensor_paths() == skel.tensor_paths()
    assert back == skeleton_from_wire(_wire(skeleton_to_wire(skel)))
    assert skeleton_digest(cols) == skeleton_digest(skeleton_to_columns(skel))


@given(training_states(), training_states())
def test_digest_tells_skeletons_apart(a: Any, b: Any) -> None:
    sa, sb = flatten(a)[0], flatten(b)[0]
    da, db = skeleton_digest(skeleton_to_columns(sa)), skeleton_digest(skeleton_to_columns(sb))
    same = (
        sa == sb
        and sa.paths == sb.paths
        and msgpack.packb(skeleton_to_wire(sa)) == msgpack.packb(skeleton_to_wire(sb))
    )
    assert (da == db) == same


def test_ties_values_and_int_keys_survive() -> None:
    w = torch.ones(3)
    state = {"a": w, "b": [w, None, 2.5, b"x", 2**64 - 1, -(2**63)], 7: (torch.zeros(0, 2),)}
    skel = flatten(state)[0]
    back = skeleton_from_columns(_wire(skeleton_to_columns(skel)))
    assert back == skel and back.tensor_paths() == [(("a",), 0), (("b", 0), 0), ((7, 0), 1)]


def _cols(state: Any) -> dict[str, Any]:
    return dict(_wire(skeleton_to_columns(flatten(state)[0])))


BASE = {"m": {"w": torch.zeros(2, 3), "b": torch.zeros(3)}, "step": 4, "l": [1, torch.ones(())]}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("v", 2, "columnar form 2"),
        ("tags", "abc", "'tags' must be bin"),
        ("tags", b"", "no root node"),
        ("tags", b"\x00\x09", "unknown tag 9"),
        ("counts", b"\x01\x00\x00", "not a multiple of 4"),
        ("counts", np.array([9, 2, 2], "<u4").tobytes(), "child counts add up"),
        ("key_ids", np.array([0, 1, 2, 3], "<u4").tobytes(), "dicts hold"),
        ("key_ids", np.array([0, 1, 2, 3, 9], "<u4").tobytes(), "key id 9"),
        ("keys", ["m", "w", "b", 1.5, "l"], "is not a str or a 64-bit int"),
        ("keys", ["m", "w", "w", "step", "l"], "lists a key twice"),
        ("values", [4], "2 value nodes but 1 values"),
        ("values", [4, [1]], "list is not a storable value"),
        ("values", [4, 2**64], "does not fit in 64 bits"),
        ("leaves", np.array([1, 0, 2], "<u4").tobytes(), "names leaf 1 before leaf 0"),
        ("dtypes", b"\x00\x00\xff", "unknown dtype code 255"),
        ("dtypes", b"\x00\x00", "3 tensor leaves but 2 dtype codes"),
        ("ndims", b"\x02\x01\x41", "65 dimensions"),
        ("ndims", b"\x02\x01\x01", "the ranks add up to 4 dims"),
        ("dims", np.array([2, 2**63, 3], "<u8").tobytes(), "past int64"),
        ("dims", np.array([2**40, 2**40, 3], "<u8").tobytes(), "absurd shape"),
    ],
)
def test_malformed_columns_are_refused(field: str, value: Any, message: str) -> None:
    cols = _cols(BASE)
    cols[field] = value
    with pytest.raises(FormatError, match=message):
        skeleton_from_columns(cols)


def test_duplicate_key_in_one_dict_is_refused_but_not_across_dicts() -> None:
    ok = _cols({"a": {"x": 1}, "b": {"x": 2}})
    assert skeleton_from_columns(ok).node[1][1][1][1][0][0] == "x"
    cols = _cols({"a": 1, "b": 2})
    cols["key_ids"] = np.array([0, 0], "<u4").tobytes()
    with pytest.raises(FormatError, match="duplicate dict key 'a'"):
        skeleton_from_columns(cols)


def test_nesting_is_bounded_on_read() -> None:
    deep: Any = (VALUE, 1)
    for _ in range(MAX_DEPTH + 1):
        deep = (LIST, (deep,))
    cols = {
        "v": 1,
        "tags": bytes([LIST] * (MAX_DEPTH + 1) + [VALUE]),
        "counts": np.ones(MAX_DEPTH + 1, "<u4").tobytes(),
        "keys": [],
        "key_ids": b"",
        "values": [1],
        "leaves": b"",
        "dtypes": b"",
        "ndims": b"",
        "dims": b"",
    }
    with pytest.raises(FormatError, match="nested deeper than 128"):
        skeleton_from_columns(cols)
    with pytest.raises(Exception, match="deeper than 128"):
        skeleton_to_columns(Skeleton(deep, (), ()))


def test_structure_must_end_with_the_root() -> None:
    cols = _cols([1, 2])
    cols["tags"] = bytes([LIST, VALUE, VALUE])
    cols["counts"] = np.array([1], "<u4").tobytes()
    with pytest.raises(FormatError, match=r"child counts add up|after the root"):
        skeleton_from_columns(cols)
    two_roots = {**_cols(1), "tags": bytes([VALUE, VALUE]), "values": [1, 2]}
    with pytest.raises(FormatError):
        skeleton_from_columns(two_roots)


@given(st.data())
def test_any_mutation_is_a_format_error_or_a_valid_skeleton(data: st.DataObject) -> None:
    cols = _cols(BASE)
    field = data.draw(st.sampled_from(sorted(cols)))
    v = cols[field]
    if isinstance(v, bytes) and v:
        i = data.draw(st.integers(0, len(v) - 1))
        b = bytearray(v)
        b[i] = data.draw(st.integers(0, 255))
        cols[field] = bytes(b)
    else:
        cols[field] = data.draw(
            st.one_of(st.none(), st.integers(), st.text(max_size=3), st.lists(st.integers()))
        )
    try:
        skel = skeleton_from_columns(cols)
    except FormatError:
        return
    assert isinstance(skel, Skeleton) and len(skel.paths) == len(skel.tensors)


def test_metas_are_shared_between_equal_tensors() -> None:
    skel = Skeleton(
        (DICT, (("a", (TENSOR, 0)), ("b", (TENSOR, 1)))),
        (TensorMeta(torch.float32, (4, 2)), TensorMeta(torch.float32, (4, 2))),
        (("a",), ("b",)),
    )
    back = skeleton_from_columns(_wire(skeleton_to_columns(skel)))
    assert back.tensors[0] is back.tensors[1] and back == skel
