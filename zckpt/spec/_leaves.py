"""What planning reads from a skeleton: each leaf's size, expert id, path and top-level key.

Computed once per skeleton and cached on it (a skeleton is immutable, and a load plans one
skeleton twice: at the saved spec and at the new one). This is the one place planning tells a
columnar skeleton (a v2 manifest's :class:`~zckpt.format._tree_index.ColumnSkeleton`, whose
paths are not built) from an eager one: from the columns it reads the arrays it needs and walks
the tree for the few paths it needs, where an eager skeleton reads its ``paths``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple

from zckpt._lazy import lazy_module
from zckpt.errors import SpecError
from zckpt.format._dtypes import ITEMSIZE_OF_NAME, torch_dtype
from zckpt.format._tree_index import ColumnSkeleton
from zckpt.tree import Path, Skeleton

if TYPE_CHECKING:
    import numpy as np

    from zckpt.spec._spec import ZeroSpec
else:
    np = lazy_module("numpy")

__all__ = ["LeafInfo", "expert_ids", "is_module", "itemsize", "leaf_info", "paths_of"]


def itemsize(name: str) -> int:
    """Bytes per element of the named dtype (from the format's table: no torch needed)."""
    n = ITEMSIZE_OF_NAME.get(name)
    return n if n is not None else torch_dtype(name).itemsize


def _cache(skel: Skeleton) -> dict[Any, Any]:
    """Per-skeleton values that every plan of it needs (a skeleton is immutable; a load plans
    one skeleton twice, at the saved spec and the new one)."""
    cache: dict[Any, Any] | None = skel.__dict__.get("_plan_cache")
    if cache is None:
        cache = {}
        object.__setattr__(skel, "_plan_cache", cache)
    return cache


class LeafInfo(NamedTuple):
    numels: list[int]
    numel: np.ndarray  # int64
    items: np.ndarray  # bytes per element, int64
    scalar: np.ndarray  # 0-d tensors (bool)


def leaf_info(skel: Skeleton) -> LeafInfo:
    cache = _cache(skel)
    info: LeafInfo | None = cache.get("leaves")
    if info is None and isinstance(skel, ColumnSkeleton):  # sizes straight from the columns
        s = skel.sizes
        info = cache["leaves"] = LeafInfo(s.numel.tolist(), s.numel, s.itemsize, s.scalar)
    if info is None:
        tensors = skel.tensors
        n = len(tensors)
        shapes = [m.shape for m in tensors]
        dtypes = [m.dtype_name for m in tensors]
        numels = list(map(math.prod, shapes))
        try:
            numel = np.array(numels, dtype=np.int64).reshape(n)
        except OverflowError:
            big = next(i for i, x in enumerate(numels) if x > 2**63 - 1)
            raise SpecError(
                f"{skel.name(big)}: {numels[big]} elements do not fit in 64 bits"
            ) from None
        size = {d: itemsize(d) for d in set(dtypes)}
        items = np.fromiter(map(size.__getitem__, dtypes), dtype=np.int64, count=n)
        scalar = np.fromiter(map(len, shapes), dtype=np.int64, count=n) == 0
        info = cache["leaves"] = LeafInfo(numels, numel, items, scalar)
    return info


def expert_ids(skel: Skeleton, spec: ZeroSpec) -> np.ndarray:
    cache = _cache(skel)
    key = ("experts", spec.experts)
    ids: np.ndarray | None = cache.get(key)
    if ids is None:
        if isinstance(skel, ColumnSkeleton) and not skel.built:
            ids = cache[key] = spec._expert_ids_tree(skel.index)
        else:
            ids = cache[key] = spec._expert_ids(skel.paths)
    return ids


def paths_of(skel: Skeleton, leaves: list[int]) -> list[Path]:
    """The paths of some leaves: a columnar skeleton walks a few up its tree rather than build
    every path (the leaves a plan needs paths for are the few outside the experts, as a rule)."""
    if isinstance(skel, ColumnSkeleton) and not skel.built and 4 * len(leaves) < len(skel):
        return [skel.index.path(i) for i in leaves]
    paths = skel.paths
    return [paths[i] for i in leaves]


def is_module(skel: Skeleton, leaves: np.ndarray, module: str) -> np.ndarray:
    """Whether each leaf's path starts with the key ``module`` (``spec.is_module_path``)."""
    if isinstance(skel, ColumnSkeleton) and not skel.built:
        tree = skel.index
        tops = tree.top_nodes()[leaves]
        firsts, which = np.unique(tops, return_inverse=True)
        ok = [t >= 0 and str(tree.component(t)) == module for t in firsts.tolist()]
        out: np.ndarray = np.array(ok, dtype=bool)[which.reshape(-1)]
        return out
    paths = skel.paths
    return np.array([bool(paths[i]) and str(paths[i][0]) == module for i in leaves.tolist()], bool)
