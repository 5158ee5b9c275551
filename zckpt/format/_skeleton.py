"""Skeletons on the wire: the container tree and tensor metas as msgpack-able arrays.

The blob index and the checkpoint manifest share this encoding (docs/format.md, "Skeleton").
Parsing treats its input as untrusted: every node, key, value, dtype code and dimension is
checked, nesting is bounded, and errors name the place in the tree.
"""

from __future__ import annotations

from typing import Any

from zckpt.errors import FormatError, StateError
from zckpt.format._dtypes import ITEMSIZE, dtype_code, name_of_code
from zckpt.tree import (
    DICT,
    LIST,
    TENSOR,
    TUPLE,
    VALUE,
    Path,
    Skeleton,
    TensorMeta,
    format_path,
    short_repr,
)

__all__ = [
    "MAX_DEPTH",
    "check_plain",
    "expect_int",
    "expect_list",
    "expect_map",
    "field",
    "parse_skeleton",
    "parse_tensors",
    "show",
    "skeleton_from_wire",
    "skeleton_to_wire",
    "wire_node",
]

MAX_DEPTH = 128  # container nesting of a skeleton or of 'extra'; msgpack's own stack allows 1023
U64 = 2**64 - 1
_I63 = 2**63 - 1
_I64_MIN = -(2**63)
VALUE_TYPES = (type(None), bool, int, float, str, bytes)


# ---------------------------------------------------------------------------------- checks


def show(v: Any) -> str:
    """A value for an error message, cut to 60 characters (without rendering the rest: values
    read from a blob may be huge or nested a thousand deep, past the recursion limit)."""
    return short_repr(v)


def check_plain(v: Any, max_depth: int = MAX_DEPTH) -> str | None:
    """Why ``v`` is not a plain msgpack value nested at most ``max_depth`` containers deep
    (maps with str keys, arrays, nil, bool, 64-bit int, float, str, bin), or None if it is.

    Iterative, so it checks values nested deeper than Python's recursion limit.

    Example:
        >>> check_plain({"a": [1, None, {"b": b"x"}]}) is None
        True
        >>> check_plain([[[]]], max_depth=2)
        'containers nested deeper than 2 levels'
    """
    stack: list[tuple[Any, int]] = [(v, 0)]
    while stack:
        x, depth = stack.pop()
        if isinstance(x, (dict, list)):
            if depth >= max_depth:
                return f"containers nested deeper than {max_depth} levels"
            if isinstance(x, dict):
                for k in x:
                    if type(k) is not str:
                        return f"map key {show(k)} is not a str"
                stack.extend((c, depth + 1) for c in x.values())
            else:
                stack.extend((c, depth + 1) for c in x)
        elif type(x) not in VALUE_TYPES:
            return f"{type(x).__name__} is not a plain msgpack value"
        elif type(x) is int and not _I64_MIN <= x <= U64:
            return f"integer {show(x)} does not fit in 64 bits"
    return None


def field(m: dict[str, Any], key: str, where: str) -> Any:
    """``m[key]``, or a FormatError naming the missing field."""
    if key not in m:
        raise FormatError(f"{where}: missing field {key!r}")
    return m[key]


def expect_int(v: Any, where: str, lo: int = 0, hi: int = U64) -> int:
    """``v`` if it is an int (not a bool) in ``[lo, hi]``, else a FormatError."""
    if type(v) is not int or not lo <= v <= hi:
        raise FormatError(f"{where}: expected an integer in [{lo}, {hi}], got {show(v)}")
    return v


def expect_list(v: Any, where: str, size: int | None = None) -> list[Any]:
    """``v`` if it is an array (of ``size`` items, when given), else a FormatError."""
    if not isinstance(v, list) or (size is not None and len(v) != size):
        what = "an array" if size is None else f"an array of {size}"
        raise FormatError(f"{where}: expected {what}, got {show(v)}")
    return v


def expect_map(v: Any, where: str) -> dict[str, Any]:
    """``v`` if it is a map, else a FormatError."""
    if not isinstance(v, dict):
        raise FormatError(f"{where}: expected a map, got {show(v)}")
    return v


# ---------------------------------------------------------------------------------- skeletons


def wire_node(node: Any, depth: int = 0) -> list[Any]:
    """A skeleton node as msgpack arrays: ``[tag, body]``, dict bodies as ``[[key, node], ...]``.

    Raises:
        StateError: the state nests containers deeper than :data:`MAX_DEPTH`.
    """
    tag, body = node
    if tag in (DICT, LIST, TUPLE):
        if depth >= MAX_DEPTH:
            raise StateError(f"the state nests containers deeper than {MAX_DEPTH} levels")
        if tag == DICT:
            return [tag, [[k, wire_node(v, depth + 1)] for k, v in body]]
        return [tag, [wire_node(v, depth + 1) for v in body]]
    return [tag, body]


def skeleton_to_wire(skeleton: Skeleton) -> dict[str, Any]:
    """A skeleton in the index's encoding: ``{"tensors": [...], "skeleton": node}``.

    Manifests and other zckpt files reuse it, so a skeleton has one encoding everywhere.

    Example:
        >>> import torch
        >>> from zckpt.tree import flatten
        >>> skeleton_to_wire(flatten({"w": torch.zeros(2, 3), "n": 1})[0])
        {'tensors': [[0, [2, 3]]], 'skeleton': [0, [['w', [3, 0]], ['n', [4, 1]]]]}
    """
    return {
        "tensors": [
            [dtype_code(m.dtype_name, skeleton.name(i)), list(m.shape)]
            for i, m in enumerate(skeleton.tensors)
        ],
        "skeleton": wire_node(skeleton.node),
    }


def skeleton_from_wire(obj: Any) -> Skeleton:
    """Parse :func:`skeleton_to_wire` output, validating it as untrusted input.

    Raises:
        FormatError: anything malformed, named by its place in the tree.

    Example:
        >>> import torch
        >>> from zckpt.tree import flatten
        >>> skel = flatten({"w": torch.zeros(2, 3), "n": [1, None]})[0]
        >>> skeleton_from_wire(skeleton_to_wire(skel)) == skel
        True
    """
    m = expect_map(obj, "skeleton")
    return parse_skeleton(
        field(m, "skeleton", "skeleton"), parse_tensors(field(m, "tensors", "skeleton"))
    )


def parse_tensors(v: Any) -> tuple[TensorMeta, ...]:
    metas = []
    for i, t in enumerate(expect_list(v, "index 'tensors'")):
        where = f"index 'tensors'[{i}]"
        code, shape = expect_list(t, where, 2)
        dtype = name_of_code(expect_int(code, f"{where} dtype code"), where)
        dims = tuple(
            expect_int(d, f"{where} shape", 0, _I63) for d in expect_list(shape, f"{where} shape")
        )
        # The bytes, counting a zero dimension as 1, must fit in int64: that bounds the element
        # count and the byte size, and also the strides (torch computes them from the other
        # dimensions, so [0, 2**62, 2**62] has no elements but cannot be made).
        span = ITEMSIZE[code]
        for d in dims:  # stepwise, so a long list of huge dims never builds a huge integer
            span *= max(d, 1)
            if span > _I63:
                raise FormatError(
                    f"{where}: absurd shape {show(list(dims))} (its size in bytes, or a stride, "
                    f"would not fit in 64 bits)"
                )
        metas.append(TensorMeta(dtype, dims))
    return tuple(metas)


def parse_skeleton(v: Any, metas: tuple[TensorMeta, ...]) -> Skeleton:
    paths: list[Path] = []

    def node(x: Any, path: Path, depth: int) -> Any:
        where = f"index 'skeleton' at {format_path(path)}"
        tag, body = expect_list(x, where, 2)
        if type(tag) is not int:  # True == 1 == LIST and 3.0 == TENSOR: compare ints only
            raise FormatError(f"{where}: node tag {show(tag)} is not an integer")
        if tag == TENSOR:
            # A leaf index is either the next new leaf or an earlier one (a tied alias).
            leaf = expect_int(body, f"{where} tensor leaf", 0, len(paths))
            if leaf == len(paths):
                if leaf >= len(metas):
                    raise FormatError(f"{where}: tensor leaf {leaf} has no entry in 'tensors'")
                paths.append(path)
            return (TENSOR, leaf)
        if tag == VALUE:
            if type(body) not in VALUE_TYPES:
                raise FormatError(f"{where}: {type(body).__name__} is not a storable value")
            if type(body) is int and not _I64_MIN <= body <= U64:
                raise FormatError(f"{where}: integer {show(body)} does not fit in 64 bits")
            return (VALUE, body)
        if tag not in (DICT, LIST, TUPLE):
            raise FormatError(f"{where}: unknown node tag {show(tag)}")
        if depth >= MAX_DEPTH:
            raise FormatError(f"{where}: containers nested deeper than {MAX_DEPTH} levels")
        items = expect_list(body, where)
        if tag != DICT:
            return (tag, tuple(node(c, (*path, i), depth + 1) for i, c in enumerate(items)))
        out, seen = [], set()
        for item in items:
            k, child = expect_list(item, where, 2)
            if type(k) not in (str, int) or (type(k) is int and not _I64_MIN <= k <= U64):
                raise FormatError(f"{where}: dict key {show(k)} is not a str or a 64-bit int")
            if k in seen:
                raise FormatError(f"{where}: duplicate dict key {show(k)}")
            seen.add(k)
            out.append((k, node(child, (*path, k), depth + 1)))
        return (DICT, tuple(out))

    root = node(v, (), 0)
    if len(paths) != len(metas):
        raise FormatError(
            f"index: the skeleton has {len(paths)} tensor leaves but 'tensors' lists {len(metas)}"
        )
    return Skeleton(root, metas, tuple(paths))
