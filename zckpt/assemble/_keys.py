"""The keys of a checkpoint's fp32 state dict, from its skeleton alone (no torch needed).

``zckpt inspect`` lists them without reading a tensor or importing torch;
:func:`~zckpt.assemble.fp32_entries` gives the same keys with torch dtypes, for assembling.
"""

from __future__ import annotations

from typing import NamedTuple

from zckpt.format._dtypes import is_floating
from zckpt.spec import ZeroSpec
from zckpt.tree import Skeleton

__all__ = ["Fp32Key", "fp32_keys"]


class Fp32Key(NamedTuple):
    """One key of an fp32 state dict: its name, the leaf it is read from, the name of its output
    dtype (``"float32"`` for floating tensors, else the tensor's own) and its tie.

    ``source`` is the fp32 master leaf when one exists, else the module leaf (upcast); ``tied_to``
    names an earlier key holding the same module tensor, which the output shares.
    """

    name: str
    source: int
    dtype_name: str
    tied_to: str | None


def fp32_keys(
    skel: Skeleton, spec: ZeroSpec, exclude: frozenset[str] = frozenset()
) -> list[Fp32Key]:
    """The keys of the module's fp32 state dict, in module order, tied keys included.

    Example:
        >>> import torch, zckpt
        >>> w = torch.ones(2)
        >>> skel, _ = zckpt.tree.flatten({"module": {"a": w.half(), "n": torch.tensor(1)},
        ...                               "master": {"a": w}})
        >>> [tuple(k) for k in fp32_keys(skel, zckpt.ZeroSpec(1, 1))]
        [('a', 2, 'float32', None), ('n', 1, 'int64', None)]
    """
    by_path = {p: i for i, p in enumerate(skel.paths)}
    first: dict[int, str] = {}
    out = []
    for path, leaf in skel.tensor_paths():
        if not spec.is_module_path(path):
            continue
        name = ".".join(map(str, path[1:]))
        if name in exclude:
            continue
        meta = skel.tensors[leaf]
        dtype = "float32" if is_floating(meta.dtype_name) else meta.dtype_name
        if leaf in first:
            out.append(Fp32Key(name, leaf, dtype, first[leaf]))
            continue
        first[leaf] = name
        src = by_path.get((spec.master, *path[1:]), leaf)
        if skel.tensors[src].shape != meta.shape:
            src = leaf
        out.append(Fp32Key(name, src, dtype, None))
    return out
