"""A columnar skeleton's tree as arrays, and the skeleton that builds its tuples only when asked.

Rebuilding the nested tuples of a skeleton of a few hundred thousand tensors (one node per
container and leaf, one path tuple per leaf) is most of what a loading rank spends planning a
MoE checkpoint, and the garbage collector then scans all of them again. Planning needs much
less: each leaf's dtype and size, the one key that decides its expert, its top-level key, and
the whole path of a few leaves. :class:`TreeIndex` derives every node's parent, depth and key
from the checked columns (docs/format.md, "Columnar skeleton") in a few vectorised passes, and
:class:`ColumnSkeleton` is the :class:`~zckpt.tree.Skeleton` that a columnar decode returns: its
``node`` and ``paths`` are built from the same columns, by the same code, on first use.

How the tree is found without a walk: in preorder, let ``pending[k]`` be the child slots still
open before node ``k`` (1 before the root; a node fills one and opens its child count). It
steps down by exactly one per leaf, so a container's subtree ends at the first later node where
``pending`` is one below its own; a node's depth is the number of subtrees around it, and its
parent is the last earlier node one level up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from zckpt._lazy import lazy_module
from zckpt.errors import FormatError
from zckpt.format._dtypes import ITEMSIZE
from zckpt.format._skeleton import MAX_DEPTH, show
from zckpt.tree import DICT, TENSOR, TUPLE, VALUE, Path, Skeleton, TensorMeta, _gc_paused
from zckpt.tree import format_path as _format_path

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")  # only a version 2 manifest's skeleton needs it

__all__ = ["ColumnSkeleton", "LeafSizes", "TreeIndex", "build_tree", "tree_index"]


class TreeIndex:
    """The tree of a checked columnar skeleton as arrays over its nodes (in preorder).

    ``parent[j]`` (-1 for the root), ``depth[j]`` (0 for the root), ``key[j]`` (the id in
    ``keys`` of a dict child's key, -1 for other nodes) and, per tensor leaf, ``leaf_node[i]``:
    the node that first names leaf ``i`` (its path is ``skeleton.paths[i]``).

    Example:
        >>> import torch
        >>> from zckpt.format._columns import skeleton_from_columns, skeleton_to_columns
        >>> from zckpt.tree import flatten
        >>> state = {"a": [torch.zeros(1), {"b": torch.ones(2)}]}
        >>> tree = skeleton_from_columns(skeleton_to_columns(flatten(state)[0])).index
        >>> tree.parent.tolist(), tree.depth.tolist(), tree.path(1)
        ([-1, 0, 1, 1, 3], [0, 1, 2, 2, 3], ('a', 1, 'b'))
    """

    def __init__(
        self,
        tags: np.ndarray,
        parent: np.ndarray,
        depth: np.ndarray,
        key: np.ndarray,
        keys: list[Any],
        leaf_node: np.ndarray,
        by_depth: np.ndarray,
        bounds: list[int],
    ) -> None:
        self.tags, self.parent, self.depth, self.key = tags, parent, depth, key
        self.keys, self.leaf_node = keys, leaf_node
        self._by_depth, self._bounds = by_depth, bounds
        self._ordinal: np.ndarray | None = None

    @property
    def max_depth(self) -> int:
        """The depth of the deepest node."""
        return len(self._bounds) - 2

    def levels(self) -> Iterator[np.ndarray]:
        """The nodes of depth 1, 2, ... (each level's in preorder): parents come first."""
        for d in range(1, len(self._bounds) - 1):
            yield self._by_depth[self._bounds[d] : self._bounds[d + 1]]

    def component(self, node: int) -> Any:
        """The key (a dict child's) or position (a list or tuple child's) of a non-root node."""
        k = int(self.key[node])
        return self.keys[k] if k >= 0 else int(self._ordinals()[node])

    def path(self, leaf: int) -> Path:
        """Tensor leaf ``leaf``'s path (``skeleton.paths[leaf]``), walked up from its node."""
        out = []
        j = int(self.leaf_node[leaf])
        while j > 0:
            out.append(self.component(j))
            j = int(self.parent[j])
        return tuple(reversed(out))

    def top_nodes(self) -> np.ndarray:
        """Per tensor leaf, its depth-1 ancestor (its path's first key), -1 for a root leaf."""
        top = np.arange(len(self.parent), dtype=np.int64)
        top[0] = -1
        for d, idx in enumerate(self.levels(), start=1):
            if d > 1:
                top[idx] = top[self.parent[idx]]
        out: np.ndarray = top[self.leaf_node]
        return out

    def _ordinals(self) -> np.ndarray:
        """Each node's position among its parent's children (computed once, when a path is)."""
        if self._ordinal is None:
            n = len(self.parent)
            ordinal = np.zeros(n, dtype=np.int64)
            if n > 1:
                kids = np.argsort(self.parent[1:], kind="stable") + 1  # by parent, in preorder
                par = self.parent[kids]
                ordinal[kids] = np.arange(n - 1) - np.searchsorted(par, par)
            self._ordinal = ordinal
        return self._ordinal


def tree_index(
    tags: np.ndarray, counts: np.ndarray, keys: list[Any], key_ids: np.ndarray, leaves: np.ndarray
) -> TreeIndex | None:
    """The :class:`TreeIndex` of columns whose field lengths, tags, key ids and leaf order are
    already checked (``skeleton_from_columns``); None where the tree itself is malformed (the
    root closes before the last node, containers nest past ``MAX_DEPTH``, a dict repeats a key):
    the node-by-node build then raises the error naming the place, as it always did."""
    n = len(tags)
    width = n + 1
    cont = np.flatnonzero(tags <= TUPLE)
    kids = np.zeros(n, dtype=np.int64)
    kids[cont] = counts
    pending = np.empty(width, dtype=np.int64)
    pending[0] = 1
    np.cumsum(kids - 1, out=pending[1:])
    pending[1:] += 1
    if int(pending[n]) != 0 or (n > 1 and int(pending[1:n].min()) <= 0):
        return None
    # Each container's subtree ends at the first later node whose pending count is one below.
    order = np.sort(pending * width + np.arange(width, dtype=np.int64))
    below = (pending[cont] - 1) * width
    at = np.searchsorted(order, below + cont + 1)
    ends = order[at] - below  # exists: pending falls by one at a time to 0 at node n
    step = np.bincount(cont + 1, minlength=width) - np.bincount(ends, minlength=width)
    depth = np.cumsum(step[:n])
    if len(cont) and int(depth[cont].max()) >= MAX_DEPTH:
        return None
    by_depth = np.sort(depth * width + np.arange(n, dtype=np.int64))
    parent = np.full(n, -1, dtype=np.int64)
    if n > 1:  # the last earlier node one level up
        up = np.searchsorted(by_depth, (depth[1:] - 1) * width + np.arange(1, n)) - 1
        parent[1:] = by_depth[up] % width
    bounds = np.searchsorted(by_depth, np.arange(int(depth.max()) + 2) * width).tolist()
    key = np.full(n, -1, dtype=np.int64)
    dict_kids = np.flatnonzero(tags[parent[1:]] == DICT) + 1  # key ids are in preorder
    key[dict_kids] = key_ids
    pairs = np.sort(parent[dict_kids] * max(1, len(keys)) + key_ids)
    if len(pairs) > 1 and bool((pairs[1:] == pairs[:-1]).any()):
        return None
    tensor_nodes = np.flatnonzero(tags == TENSOR)
    # A leaf's first node is the one naming a leaf past every earlier one (ties name old ones).
    seen = np.maximum.accumulate(leaves.astype(np.int64))
    new = np.ones(len(leaves), dtype=bool)
    new[1:] = seen[1:] > seen[:-1]
    return TreeIndex(tags, parent, depth, key, keys, tensor_nodes[new], by_depth % width, bounds)


class LeafSizes:
    """Per tensor leaf, from the columns: element counts, bytes per element, 0-d or not.

    Example:
        >>> s = LeafSizes(np.array([0, 2], np.uint8), np.array([2, 0], np.uint8),
        ...               np.array([3, 5], np.uint64))
        >>> s.numel.tolist(), s.itemsize.tolist(), s.scalar.tolist()
        ([15, 1], [4, 2], [False, True])
    """

    def __init__(self, codes: np.ndarray, ndims: np.ndarray, dims: np.ndarray) -> None:
        n = len(ndims)
        numel = np.ones(n, dtype=np.int64)
        nz = np.flatnonzero(ndims)
        if len(nz):
            # Sizes are checked to fit in int64 (a zero dimension counted as 1): a product only
            # wraps on its way to 0.
            starts = np.concatenate(([0], np.cumsum(ndims[:-1], dtype=np.int64)))
            with np.errstate(over="ignore"):
                numel[nz] = np.multiply.reduceat(dims.astype(np.int64), starts[nz])
        table = np.zeros(256, dtype=np.int64)
        table[list(ITEMSIZE)] = list(ITEMSIZE.values())
        self.numel: np.ndarray = numel
        self.itemsize: np.ndarray = table[codes]
        self.scalar: np.ndarray = ndims == 0


class ColumnSkeleton(Skeleton):
    """A skeleton decoded from the columnar form: ``tensors`` at once, ``node`` and ``paths``
    (the nested tuples) built on first use; :attr:`index` and :attr:`sizes` answer planning's
    questions without them.

    It is a :class:`~zckpt.tree.Skeleton` like any other: equal to the skeleton it was encoded
    from, and copied or pickled as one.

    Example:
        >>> import torch
        >>> from zckpt.format._columns import skeleton_from_columns, skeleton_to_columns
        >>> from zckpt.tree import flatten
        >>> skel = flatten({"m": {"w": torch.zeros(2, 3)}, "n": 1})[0]
        >>> back = skeleton_from_columns(skeleton_to_columns(skel))
        >>> back.built, back.path(0), back.sizes.numel.tolist(), back.built
        (False, ('m', 'w'), [6], False)
        >>> back == skel, back.paths, back.built
        (True, (('m', 'w'),), True)
    """

    index: TreeIndex
    sizes: LeafSizes
    _build: Callable[[], Skeleton]
    _built: Skeleton | None

    def __init__(
        self,
        tensors: tuple[TensorMeta, ...],
        index: TreeIndex,
        sizes: LeafSizes,
        build: Callable[[], Skeleton],
    ) -> None:
        object.__setattr__(self, "tensors", tensors)
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "_build", build)
        object.__setattr__(self, "_built", None)

    def _tree(self) -> Skeleton:
        built: Skeleton | None = self._built
        if built is None:  # two threads may both build: the same value, either one is kept
            with _gc_paused():
                built = self._build()
            object.__setattr__(self, "_built", built)
        return built

    @property
    def built(self) -> bool:
        """Whether ``node`` and ``paths`` have been built."""
        return self._built is not None

    @property
    def node(self) -> Any:
        """The node tree (see :class:`~zckpt.tree.Skeleton`), built on first use."""
        return self._tree().node

    @property
    def paths(self) -> tuple[Path, ...]:
        """Every tensor leaf's first path, built on first use."""
        return self._tree().paths

    def path(self, leaf: int) -> Path:
        """``paths[leaf]``, without building every path."""
        built = self._built
        return built.paths[leaf] if built is not None else self.index.path(leaf)

    def name(self, leaf: int) -> str:
        """The printable path of tensor leaf ``leaf`` (see :meth:`Skeleton.name`)."""
        return _format_path(self.path(leaf))

    def __eq__(self, other: object) -> bool:
        if other is self:
            return True
        if not isinstance(other, Skeleton):
            return NotImplemented
        return self.tensors == other.tensors and self.node == other.node

    def __hash__(self) -> int:
        return hash((self.node, self.tensors))

    def __repr__(self) -> str:
        return repr(self._tree())

    def __reduce__(self) -> tuple[Any, ...]:
        return (Skeleton, (self.node, self.tensors, self.paths))


def build_tree(
    tags: np.ndarray,
    counts: np.ndarray,
    keys: list[Any],
    key_ids: np.ndarray,
    values: list[Any],
    leaves: np.ndarray,
    metas: tuple[TensorMeta, ...],
    where: str,
) -> Skeleton:
    """The node tree from checked columns, by recursive descent in preorder (one call per
    container; leaves are built inline by their parent). It names the place of any defect that
    :func:`tree_index` reports."""
    next_tag = iter(tags.tolist()).__next__
    next_count = iter(counts.tolist()).__next__
    next_kid = iter(key_ids.tolist()).__next__
    next_leaf = iter(leaves.tolist()).__next__
    next_value = iter(values).__next__
    paths: list[Path] = []
    add_path = paths.append

    def container(tag: int, path: Path, depth: int) -> Any:
        if depth >= MAX_DEPTH:
            raise FormatError(
                f"{where} at {_format_path(path)}: containers nested deeper than {MAX_DEPTH} levels"
            )
        n = next_count()
        kids: list[Any] = []
        add = kids.append
        if tag == DICT:
            ids = []
            for _ in range(n):
                kid = next_kid()
                ids.append(kid)
                key = keys[kid]
                t = next_tag()
                if t == TENSOR:
                    leaf = next_leaf()
                    if leaf == len(paths):
                        add_path((*path, key))
                    add((key, (TENSOR, leaf)))
                elif t == VALUE:
                    add((key, (VALUE, next_value())))
                else:
                    add((key, container(t, (*path, key), depth + 1)))
            if n > 1 and len(set(ids)) != n:
                ids.sort()
                dup = next(a for a, b in zip(ids, ids[1:]) if a == b)
                raise FormatError(
                    f"{where} at {_format_path(path)}: duplicate dict key {show(keys[dup])}"
                )
        else:
            for i in range(n):
                t = next_tag()
                if t == TENSOR:
                    leaf = next_leaf()
                    if leaf == len(paths):
                        add_path((*path, i))
                    add((TENSOR, leaf))
                elif t == VALUE:
                    add((VALUE, next_value()))
                else:
                    add(container(t, (*path, i), depth + 1))
        return (tag, tuple(kids))

    try:
        tag = next_tag()
        if tag == TENSOR:
            root: Any = (TENSOR, next_leaf())
            paths.append(())
        elif tag == VALUE:
            root = (VALUE, next_value())
        else:
            root = container(tag, (), 0)
    except StopIteration:
        raise FormatError(f"{where}: the node arrays end inside an open container") from None
    try:
        next_tag()
    except StopIteration:
        pass
    else:
        raise FormatError(f"{where}: nodes after the root's end")
    if len(paths) != len(metas):  # unreachable after the leaf checks; kept as a guard
        raise FormatError(f"{where}: {len(paths)} tensor leaves, {len(metas)} metas")
    return Skeleton(root, metas, tuple(paths))
