"""The columnar skeleton wire form (format v2): a state's structure as a few flat arrays.

The v1 form (``_skeleton.py``) is one msgpack array per node, parsed node by node; a MoE
state of a few hundred thousand tensors takes seconds to decode that way. The columnar form
(docs/format.md, "Columnar skeleton") stores the tree in preorder as packed little-endian
arrays (node tags, child counts, leaf indexes, dtype codes, ranks, dimensions) plus two msgpack
arrays (the distinct dict keys, the plain values), so unpacking is a handful of C calls and
validation is vectorised. The decoded skeleton is a :class:`ColumnSkeleton`: the tree's shape
is checked and indexed by array passes (``_tree_index.py``), and its nested tuples are built,
in one pass over the nodes, only when first used.

Parsing treats the input as untrusted, as the v1 parser does: every tag, count, key, value,
leaf index, dtype code and dimension is checked before anything is built, with the same limits
(nesting of :data:`MAX_DEPTH`, 64-bit values, shapes whose bytes fit in int64).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from itertools import chain
from typing import TYPE_CHECKING, Any

import msgpack
import xxhash

from zckpt._lazy import lazy_module
from zckpt.errors import FormatError, StateError
from zckpt.format._dtypes import CODE_OF_NAME, ITEMSIZE, NAME_OF, name_of_code
from zckpt.format._skeleton import MAX_DEPTH, U64, VALUE_TYPES, expect_list, expect_map, show
from zckpt.format._tree_index import ColumnSkeleton, LeafSizes, build_tree, tree_index
from zckpt.tree import (
    DICT,
    TENSOR,
    TUPLE,
    VALUE,
    Skeleton,
    TensorMeta,
    _gc_paused,
)

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")  # only the columns of a version 2 manifest or blob need it

__all__ = [
    "COLUMNS_VERSION",
    "leaf_columns",
    "leaf_metas_from_columns",
    "skeleton_digest",
    "skeleton_digest_of",
    "skeleton_from_columns",
    "skeleton_to_columns",
]

COLUMNS_VERSION = 1
MAX_NDIM = 64  # dimensions of one tensor (torch allows 64 too)
_I63 = 2**63 - 1
_I64_MIN = -(2**63)
_FIELDS = ("tags", "counts", "keys", "key_ids", "values", "leaves", "dtypes", "ndims", "dims")


def _raise_dtype(code: int, where: str) -> None:
    name_of_code(code, where)  # raises the FormatError naming the code


def skeleton_to_columns(skeleton: Skeleton) -> dict[str, Any]:
    """A skeleton in the columnar wire form: a map of packed arrays (deterministic).

    Raises:
        StateError: the state nests containers deeper than :data:`MAX_DEPTH`, or a dtype has
            no format code.

    Example:
        >>> import torch
        >>> from zckpt.tree import flatten
        >>> c = skeleton_to_columns(flatten({"w": torch.zeros(2, 3), "n": 1})[0])
        >>> c["keys"], c["values"], bytes(c["tags"]), bytes(c["dtypes"])
        (['w', 'n'], [1], b'\\x00\\x03\\x04', b'\\x00')
    """
    tags: list[int] = []
    counts: list[int] = []
    key_ids: list[int] = []
    values: list[Any] = []
    leaves: list[int] = []
    table: dict[tuple[type, Any], int] = {}
    keys: list[Any] = []
    add_tag, add_kid, add_value, add_leaf = (
        tags.append,
        key_ids.append,
        values.append,
        leaves.append,
    )

    def kid(node: Any, depth: int) -> None:
        tag, body = node
        add_tag(tag)
        if tag == TENSOR:
            add_leaf(body)
        elif tag == VALUE:
            add_value(body)
        else:
            container(tag, body, depth)

    def container(tag: int, body: Any, depth: int) -> None:
        if depth >= MAX_DEPTH:
            raise StateError(f"the state nests containers deeper than {MAX_DEPTH} levels")
        counts.append(len(body))
        if tag == DICT:
            # A dict's keys enter the table when the dict is reached, before its children's.
            ids = []
            for k, _ in body:
                i = table.setdefault((type(k), k), len(keys))
                if i == len(keys):
                    keys.append(k)
                ids.append(i)
            for i, (_, v) in zip(ids, body):
                add_kid(i)
                kid(v, depth + 1)
        else:
            for v in body:
                kid(v, depth + 1)

    with _gc_paused():
        kid(skeleton.node, 0)
        metas = skeleton.tensors
        codes = list(map(CODE_OF_NAME.get, [m.dtype_name for m in metas]))
        if None in codes:
            i = codes.index(None)
            raise StateError(f"{skeleton.name(i)}: dtype {metas[i].dtype} has no zckpt format code")
        shapes = [m.shape for m in metas]
        dims = list(chain.from_iterable(shapes))
    return {
        "v": COLUMNS_VERSION,
        "tags": bytes(tags),
        "counts": np.array(counts, dtype="<u4").tobytes(),
        "keys": keys,
        "key_ids": np.array(key_ids, dtype="<u4").tobytes(),
        "values": values,
        "leaves": np.array(leaves, dtype="<u4").tobytes(),
        "dtypes": bytes(codes),  # type: ignore[arg-type]
        "ndims": bytes(map(len, shapes)),
        "dims": np.array(dims, dtype="<u8").tobytes(),
    }


def skeleton_digest(columns: dict[str, Any]) -> int:
    """The xxh3_64 that binds a blob to its skeleton: of the columnar arrays, in field order.

    Each field is hashed with its length: the arrays' raw bytes, the keys and values lists as
    msgpack packs them (deterministic), so no two skeletons share a digest input.

    Example:
        >>> import torch
        >>> from zckpt.tree import flatten
        >>> a = skeleton_to_columns(flatten({"w": torch.zeros(2)})[0])
        >>> b = skeleton_to_columns(flatten({"w": torch.zeros(3)})[0])
        >>> skeleton_digest(a) == skeleton_digest(dict(a)), skeleton_digest(a) == skeleton_digest(b)
        (True, False)
    """
    h = xxhash.xxh3_64()
    for name in _FIELDS:
        v = columns[name]
        raw = v if isinstance(v, bytes) else bytes(msgpack.packb(v, use_bin_type=True))
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return h.intdigest()


# A few entries, newest first: a save encodes every blob of a process against one skeleton
# object, a checkpoint reader checks every blob against its manifest's, and a reshard does both
# at once. An entry keeps its skeleton alive, so an id is never reused while it is cached.
_DIGESTS: list[tuple[Skeleton, int]] = []
_DIGESTS_KEPT = 4


def skeleton_digest_of(skeleton: Skeleton) -> int:
    """:func:`skeleton_digest` of ``skeleton``'s columnar form (the last few results are kept,
    by identity: a save or a load asks once per blob for the same skeleton).

    Raises:
        StateError: as :func:`skeleton_to_columns`.

    Example:
        >>> import torch
        >>> from zckpt.tree import flatten
        >>> skel = flatten({"w": torch.zeros(2)})[0]
        >>> skeleton_digest_of(skel) == skeleton_digest(skeleton_to_columns(skel))
        True
    """
    for cached, digest in list(_DIGESTS):  # a copy: another thread may be updating it
        if cached is skeleton:
            return digest
    digest = skeleton_digest(skeleton_to_columns(skeleton))
    _DIGESTS[:] = [(skeleton, digest), *_DIGESTS[: _DIGESTS_KEPT - 1]]
    return digest


def leaf_columns(metas: Sequence[TensorMeta], leaves: Sequence[int]) -> dict[str, bytes]:
    """Packed columns describing some tensor leaves (a version 2 blob's own): ids, dtype
    codes, ranks and dimensions, as the columnar skeleton packs them.

    Raises:
        StateError: a dtype without a format code.

    Example:
        >>> import torch
        >>> c = leaf_columns([TensorMeta(torch.float32, (2, 3)), TensorMeta(torch.int8, ())], [1])
        >>> bytes(c["leaf"]), bytes(c["dtypes"]), bytes(c["ndims"]), c["dims"]
        (b'\\x01\\x00\\x00\\x00', b'\\x04', b'\\x00', b'')
    """
    codes = []
    for leaf in leaves:
        code = CODE_OF_NAME.get(metas[leaf].dtype_name)
        if code is None:
            raise StateError(f"tensor leaf {leaf}: dtype {metas[leaf].dtype} has no format code")
        codes.append(code)
    return {
        "leaf": np.array(leaves, dtype="<u4").tobytes(),
        "dtypes": bytes(codes),
        "ndims": bytes(len(metas[leaf].shape) for leaf in leaves),
        "dims": np.array([d for leaf in leaves for d in metas[leaf].shape], dtype="<u8").tobytes(),
    }


def leaf_metas_from_columns(obj: Any, where: str) -> dict[int, TensorMeta]:
    """Parse :func:`leaf_columns` output as untrusted input: leaf ids strictly increasing,
    every dtype, rank and shape checked as the columnar skeleton's are.

    Raises:
        FormatError: naming the field and, where it applies, the leaf.

    Example:
        >>> import torch
        >>> c = leaf_columns([TensorMeta(torch.float32, (2, 3))], [0])
        >>> leaf_metas_from_columns(c, "leaves")
        {0: TensorMeta(dtype=torch.float32, shape=(2, 3))}
    """
    m = expect_map(obj, where)
    ids = _array(m, "leaf", "<u4", where)
    if len(ids) > 1:
        bad = np.flatnonzero(np.diff(ids.astype(np.int64)) <= 0)
        if len(bad):
            i = int(bad[0]) + 1
            raise FormatError(
                f"{where}: leaf id {int(ids[i])} at position {i} does not follow {int(ids[i - 1])} "
                "(ids must be strictly increasing)"
            )
    metas = _metas(m, len(ids), where)
    return dict(zip(ids.tolist(), metas, strict=True))


def _array(m: dict[str, Any], key: str, dtype: str, where: str) -> np.ndarray:
    v = m.get(key)
    if type(v) is not bytes:
        raise FormatError(f"{where}: {key!r} must be bin, got {show(v)}")
    size = np.dtype(dtype).itemsize
    if len(v) % size:
        raise FormatError(f"{where}: {key!r} holds {len(v)} bytes, not a multiple of {size}")
    return np.frombuffer(v, dtype=dtype)


def _metas(m: dict[str, Any], n_leaves: int, where: str) -> tuple[TensorMeta, ...]:
    codes = _array(m, "dtypes", "u1", where)
    ndims = _array(m, "ndims", "u1", where)
    dims = _array(m, "dims", "<u8", where)
    if len(codes) != n_leaves or len(ndims) != n_leaves:
        raise FormatError(
            f"{where}: {n_leaves} tensor leaves but {len(codes)} dtype codes and {len(ndims)} ranks"
        )
    if len(ndims) and int(ndims.max()) > MAX_NDIM:
        i = int(np.argmax(ndims > MAX_NDIM))
        raise FormatError(
            f"{where}: tensor {i} has {int(ndims[i])} dimensions (at most {MAX_NDIM})"
        )
    if int(ndims.sum(dtype=np.int64)) != len(dims):
        raise FormatError(
            f"{where}: the ranks add up to {int(ndims.sum())} dims, 'dims' has {len(dims)}"
        )
    known = np.zeros(256, dtype=bool)
    known[list(NAME_OF)] = True
    bad = np.flatnonzero(~known[codes])
    if len(bad):
        i = int(bad[0])
        _raise_dtype(int(codes[i]), f"{where}: tensor {i}")
    if len(dims) and int(dims.max()) > _I63:
        j = int(np.argmax(dims > _I63))
        raise FormatError(f"{where}: dimension {j} is {int(dims[j])}, past int64")
    # Bytes (a zero dimension counted as 1) must fit in int64, as v1 requires: screened in
    # floating point, then checked exactly where the estimate comes near the limit.
    item = np.array([ITEMSIZE.get(c, 1) for c in range(256)], dtype=np.float64)[codes]
    logs = np.log2(np.maximum(dims, 1).astype(np.float64))
    starts = np.concatenate(([0], np.cumsum(ndims[:-1], dtype=np.int64))) if n_leaves else ndims
    per = np.zeros(n_leaves)
    nz = np.flatnonzero(ndims)
    if len(nz):
        per[nz] = np.add.reduceat(logs, starts[nz])
    for i in np.flatnonzero(per + np.log2(item) > 62.0).tolist():
        span = ITEMSIZE[int(codes[i])]
        shape = dims[int(starts[i]) : int(starts[i]) + int(ndims[i])].tolist()
        for d in shape:
            span *= max(d, 1)
        if span > _I63:
            raise FormatError(
                f"{where}: tensor {i}: absurd shape {show(shape)} (its size in bytes, or a "
                "stride, would not fit in 64 bits)"
            )
    # One TensorMeta per distinct (dtype, shape): each rank's rows (dtype code, dims) sorted,
    # equal rows next to each other; no padding.
    out = np.empty(n_leaves, dtype=object)
    for nd in np.unique(ndims).tolist():
        idx = np.flatnonzero(ndims == nd)
        rows = np.empty((len(idx), nd + 1), dtype=np.uint64)
        rows[:, 0] = codes[idx]
        if nd:
            rows[:, 1:] = dims[starts[idx][:, None] + np.arange(nd)]
        order = np.lexsort(rows.T[::-1])
        ranked = rows[order]
        new = np.ones(len(idx), dtype=bool)
        new[1:] = (ranked[1:] != ranked[:-1]).any(axis=1)
        made = np.empty(int(new.sum()), dtype=object)
        made[:] = [TensorMeta(NAME_OF[r[0]], tuple(r[1:])) for r in ranked[new].tolist()]
        out[idx[order]] = made[np.cumsum(new) - 1]
    metas: tuple[TensorMeta, ...] = tuple(out.tolist())
    return metas


def _check_keys(obj: Any, where: str) -> list[Any]:
    keys: list[Any] = expect_list(obj, f"{where} 'keys'")
    if set(map(type, keys)) <= {str}:  # the common case, checked in C
        if len(set(keys)) != len(keys):
            raise FormatError(f"{where}: 'keys' lists a key twice")
        return keys
    for k in keys:
        if type(k) not in (str, int) or (type(k) is int and not _I64_MIN <= k <= U64):
            raise FormatError(f"{where}: dict key {show(k)} is not a str or a 64-bit int")
    if len({(type(k), k) for k in keys}) != len(keys):
        raise FormatError(f"{where}: 'keys' lists a key twice")
    return keys


def _check_values(obj: Any, where: str) -> list[Any]:
    values: list[Any] = expect_list(obj, f"{where} 'values'")
    for v in values:
        if type(v) not in VALUE_TYPES:
            raise FormatError(f"{where}: {type(v).__name__} is not a storable value")
        if type(v) is int and not _I64_MIN <= v <= U64:
            raise FormatError(f"{where}: integer {show(v)} does not fit in 64 bits")
    return values


def skeleton_from_columns(obj: Any, where: str = "skeleton") -> Skeleton:
    """Parse :func:`skeleton_to_columns` output, validating it as untrusted input.

    Raises:
        FormatError: anything malformed (a field, a count, a key, a value, a leaf index, a
            dtype, a dimension), named by field and, where it applies, the place in the tree.

    Example:
        >>> import torch
        >>> from zckpt.tree import flatten
        >>> skel = flatten({"w": torch.zeros(2, 3), "n": [1, None], 5: torch.ones(())})[0]
        >>> skeleton_from_columns(skeleton_to_columns(skel)) == skel
        True
    """
    m = expect_map(obj, where)
    if m.get("v") != COLUMNS_VERSION or type(m.get("v")) is not int:
        raise FormatError(f"{where}: columnar form {show(m.get('v'))}, this reader knows 1")
    tags = _array(m, "tags", "u1", where)
    counts = _array(m, "counts", "<u4", where)
    key_ids = _array(m, "key_ids", "<u4", where)
    leaves = _array(m, "leaves", "<u4", where)
    keys = _check_keys(m.get("keys"), where)
    values = _check_values(m.get("values"), where)
    n = len(tags)
    if n == 0:
        raise FormatError(f"{where}: no root node")
    if int(tags.max()) > VALUE:
        i = int(np.argmax(tags > VALUE))
        raise FormatError(f"{where}: node {i} has unknown tag {int(tags[i])}")
    is_container = tags <= TUPLE
    n_containers = int(is_container.sum())
    if len(counts) != n_containers:
        raise FormatError(f"{where}: {n_containers} containers but {len(counts)} child counts")
    if int(counts.sum(dtype=np.int64)) != n - 1:
        raise FormatError(f"{where}: child counts add up to {int(counts.sum())}, not {n - 1} nodes")
    dict_counts = counts[tags[is_container] == DICT]
    if int(dict_counts.sum(dtype=np.int64)) != len(key_ids):
        raise FormatError(
            f"{where}: dicts hold {int(dict_counts.sum())} keys, 'key_ids' {len(key_ids)}"
        )
    if len(key_ids) and int(key_ids.max()) >= len(keys):
        raise FormatError(f"{where}: key id {int(key_ids.max())} past the {len(keys)} keys")
    n_values = int((tags == VALUE).sum())
    if n_values != len(values):
        raise FormatError(f"{where}: {n_values} value nodes but {len(values)} values")
    if int((tags == TENSOR).sum()) != len(leaves):
        raise FormatError(
            f"{where}: {int((tags == TENSOR).sum())} tensor nodes, {len(leaves)} leaves"
        )
    # A leaf index is the next new leaf or an earlier one (a tied alias): new leaves in order.
    if len(leaves):
        prev = np.concatenate(([-1], np.maximum.accumulate(leaves.astype(np.int64))[:-1]))
        bad = np.flatnonzero(leaves > prev + 1)
        if len(bad):
            raise FormatError(
                f"{where}: tensor node {int(bad[0])} names leaf {int(leaves[bad[0]])} before "
                f"leaf {int(prev[bad[0]]) + 1}"
            )
    n_leaves = int(leaves.max()) + 1 if len(leaves) else 0
    metas = _metas(m, n_leaves, where)
    build = functools.partial(build_tree, tags, counts, keys, key_ids, values, leaves, metas, where)
    index = tree_index(tags, counts, keys, key_ids, leaves)
    if index is None:  # a malformed tree: the node-by-node build names the place
        with _gc_paused():
            return build()
    sizes = LeafSizes(
        _array(m, "dtypes", "u1", where),
        _array(m, "ndims", "u1", where),
        _array(m, "dims", "<u8", where),
    )
    return ColumnSkeleton(metas, index, sizes, build)
