"""Pytrees of tensors: flatten a state into a skeleton and leaves, and back.

A *state* is any nesting of ``dict`` (str or int keys), ``list`` and ``tuple`` whose leaves are
torch tensors or plain values (``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``). The
:class:`Skeleton` is everything but the tensor bytes: the container structure, the plain values,
and a :class:`TensorMeta` (dtype, shape) per tensor leaf. It is an immutable value, it travels in
every blob header, and every plan is computed from it alone, so a checkpoint can be planned for a
new world size without reading a single tensor byte.

Example:
    >>> import torch
    >>> from zckpt.tree import flatten, unflatten
    >>> skel, leaves = flatten({"w": torch.ones(2, 3), "step": 7})
    >>> skel.paths, skel.tensors[0].shape
    ((('w',),), (2, 3))
    >>> unflatten(skel, leaves)["step"]
    7
"""

from __future__ import annotations

import gc
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from zckpt.errors import StateError
from zckpt.format._dtypes import ITEMSIZE_OF_NAME, dtype_name, torch_dtype

if TYPE_CHECKING:
    import torch

__all__ = [
    "Key",
    "Path",
    "Skeleton",
    "TensorMeta",
    "flatten",
    "format_path",
    "short_repr",
    "skeleton_of",
    "unflatten",
]

Key = str | int
Path = tuple[Key, ...]

# Node tags of the skeleton tree. They are also the on-disk codes (docs/format.md): never reuse.
DICT, LIST, TUPLE, TENSOR, VALUE = 0, 1, 2, 3, 4

_INT_MIN, _UINT_MAX = -(2**63), 2**64 - 1


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a large metadata structure is built or read.

    A skeleton of a few hundred thousand tensors is millions of tracked objects, and building
    another such structure triggers collections that scan all of them again and again (seconds
    per plan or manifest on a MoE state). What is built here holds no reference cycles, so
    reference counting frees it all the same; the collector resumes on exit (if it ran before).

    Example:
        >>> import gc
        >>> with _gc_paused():
        ...     gc.isenabled()
        False
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@dataclass(frozen=True, init=False, repr=False)
class TensorMeta:
    """What a tensor leaf is, without its bytes.

    The dtype is kept by its torch name (``dtype_name``, e.g. ``"bfloat16"``), so a skeleton
    decoded from a file needs no torch; :attr:`dtype` is the torch dtype, resolved (importing
    torch) when asked for. Built from a torch dtype or from its name, the meta is the same value.

    Example:
        >>> import torch
        >>> m = TensorMeta(torch.bfloat16, (3, 4))
        >>> m.numel, m.nbytes, m.dtype_name, m == TensorMeta("bfloat16", (3, 4))
        (12, 24, 'bfloat16', True)
    """

    dtype_name: str
    shape: tuple[int, ...]

    def __init__(self, dtype: torch.dtype | str, shape: tuple[int, ...]) -> None:
        object.__setattr__(self, "dtype_name", dtype_name(dtype))
        object.__setattr__(self, "shape", shape)

    def __repr__(self) -> str:
        return f"TensorMeta(dtype=torch.{self.dtype_name}, shape={self.shape!r})"

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype (imports torch on first use)."""
        return torch_dtype(self.dtype_name)

    @property
    def numel(self) -> int:
        """Number of elements (1 for a 0-d tensor, 0 for an empty one)."""
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        n = ITEMSIZE_OF_NAME.get(self.dtype_name)
        return n if n is not None else self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes of the whole tensor."""
        return self.numel * self.itemsize

    @staticmethod
    def of(t: torch.Tensor) -> TensorMeta:
        """The meta of a tensor.

        Example:
            >>> import torch
            >>> TensorMeta.of(torch.zeros(2, dtype=torch.int8))
            TensorMeta(dtype=torch.int8, shape=(2,))
        """
        return TensorMeta(t.dtype, tuple(int(s) for s in t.shape))


@dataclass(frozen=True)
class Skeleton:
    """The structure of a state: containers, plain values and tensor metas, in flatten order.

    ``node`` is a nested tuple tree: ``(DICT, ((key, node), ...))``, ``(LIST, (node, ...))``,
    ``(TUPLE, (node, ...))``, ``(TENSOR, leaf_index)`` or ``(VALUE, value)``. ``tensors[i]`` and
    ``paths[i]`` describe tensor leaf ``i`` (``paths[i]`` is its first path; a tied tensor's
    other paths are further ``(TENSOR, i)`` nodes, listed by :meth:`tensor_paths`).

    Example:
        >>> import torch
        >>> skel, _ = flatten([torch.zeros(1), {"a": torch.ones(())}])
        >>> skel.paths
        ((0,), (1, 'a'))
    """

    node: Any
    tensors: tuple[TensorMeta, ...]
    paths: tuple[Path, ...] = field(compare=False)

    def __len__(self) -> int:
        return len(self.tensors)

    def tensor_paths(self) -> list[tuple[Path, int]]:
        """Every tensor node's ``(path, leaf)`` in tree order, tied aliases included.

        Example:
            >>> import torch
            >>> w = torch.ones(2)
            >>> flatten({"a": w, "b": w})[0].tensor_paths()
            [(('a',), 0), (('b',), 0)]
        """
        return [(p, n[1]) for p, n in iter_nodes(self.node) if n[0] == TENSOR]

    def name(self, leaf: int) -> str:
        """The printable path of tensor leaf ``leaf``, for messages.

        Example:
            >>> import torch
            >>> skel, _ = flatten({"opt": {0: {"exp_avg": torch.zeros(1)}}})
            >>> skel.name(0)
            'opt/0/exp_avg'
        """
        return format_path(self.paths[leaf])


def format_path(path: Path) -> str:
    """Render a key path for humans: keys joined by ``/``.

    Example:
        >>> format_path(("module", "fc1.weight"))
        'module/fc1.weight'
    """
    return "/".join(str(k) for k in path) if path else "<root>"


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, without rendering the rest of it.

    Error messages show values read from untrusted files: a list nested a thousand deep (whose
    ``repr`` overflows the stack), a map of a million entries or a huge integer (whose ``repr``
    raises) must cost only what is shown. Plain values and the builtin containers are rendered
    as ``repr`` renders them; anything else by its type name.

    Example:
        >>> short_repr([1, "a", {"k": (2.5,)}, None, b"x"])
        "[1, 'a', {'k': (2.5,)}, None, b'x']"
        >>> deep = []
        >>> for _ in range(100_000):
        ...     deep = [deep]
        >>> short_repr(deep, 12)
        '[[[[[[[[[...'
        >>> short_repr(10**5000)
        '<a 16610-bit int>'
    """
    out: list[str] = []
    _render(value, limit + 1, out)
    text = "".join(out)
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


def _render(v: Any, budget: int, out: list[str]) -> int:
    """Append at most about ``budget`` characters of ``v``'s repr; return the budget left.

    Each level of nesting spends at least one character, so recursion stops within ``budget``
    levels."""
    if budget <= 0:
        return 0
    if isinstance(v, (str, bytes, bytearray)):
        piece = repr(v[: budget + 1])
    elif isinstance(v, bool) or v is None or isinstance(v, float):
        piece = repr(v)
    elif isinstance(v, int):
        piece = repr(v) if v.bit_length() <= 256 else f"<a {v.bit_length()}-bit int>"
    elif isinstance(v, (list, tuple, dict)):
        opening, closing = "[]" if isinstance(v, list) else "()" if isinstance(v, tuple) else "{}"
        out.append(opening)
        budget -= 1
        items = v.items() if isinstance(v, dict) else v
        for i, item in enumerate(items):
            if budget <= 0:
                return 0
            if i:
                out.append(", ")
                budget -= 2
            if isinstance(v, dict):
                budget = _render(item[0], budget, out)
                out.append(": ")
                budget = _render(item[1], budget - 2, out)
            else:
                budget = _render(item, budget, out)
        if isinstance(v, tuple) and len(v) == 1:
            out.append(",")
            budget -= 1
        piece = closing
    else:
        piece = f"<{type(v).__name__}>"
    out.append(piece)
    return budget - len(piece)


def _check_value(v: Any, path: Path) -> Any:
    if v is None or isinstance(v, (bool, str, bytes)):
        return v
    if isinstance(v, int):
        if not _INT_MIN <= v <= _UINT_MAX:
            raise StateError(f"{format_path(path)}: integer {v} does not fit in 64 bits")
        return int(v)
    if isinstance(v, float):
        return float(v)
    raise StateError(
        f"{format_path(path)}: cannot store a value of type {type(v).__module__}."
        f"{type(v).__qualname__}; leaves must be tensors, None, bool, int, float, str or bytes"
    )


def _check_tensor(t: torch.Tensor, path: Path) -> torch.Tensor:
    import torch

    if t.layout != torch.strided:
        raise StateError(f"{format_path(path)}: tensor layout {t.layout} is not supported")
    if t.is_quantized or t.device.type == "meta":
        raise StateError(f"{format_path(path)}: quantized and meta tensors have no bytes to store")
    if t.is_complex() or t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    return t.detach()


def _box_alias(x: Any) -> tuple[Any, ...]:
    """Identity of a distributed tensor (DTensor): its global layout and its local memory.

    Two DTensor objects over one local memory view with the same placements on the same mesh
    are one tensor saved once: ``get_model_state_dict`` of an FSDP2 model with tied weights
    gives such a pair. The decision must be the same on every rank (``store/_agreement.py``
    fails a save whose ranks' skeletons differ), so memory decides only where this rank holds
    storage for it: FSDP2 keeps a padded storage per parameter even for an empty local shard;
    a local tensor without storage is its own object only."""
    local = getattr(x, "_local_tensor", None)
    if local is None or local.untyped_storage().nbytes() == 0:
        return ("box", id(x))
    layout = (id(x.device_mesh), tuple(str(p) for p in x.placements), tuple(x.shape))
    return ("box", *layout, *_view_key(local))


def _alias_key(t: torch.Tensor) -> tuple[Any, ...] | None:
    """Identity of a tensor's exact memory view: equal keys are the same (tied) tensor."""
    return None if t.numel() == 0 else _view_key(t)


def _view_key(t: torch.Tensor) -> tuple[Any, ...]:
    """A memory view's place: device, storage, offset, shape, strides and dtype."""
    return (
        t.device,
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        tuple(t.shape),
        tuple(t.stride()),
        t.dtype,
    )


def flatten(state: Any) -> tuple[Skeleton, list[torch.Tensor]]:
    """Split a state into its skeleton and its tensor leaves (in depth-first, insertion order).

    Dicts keep insertion order; ``OrderedDict`` and other mappings come back as ``dict``, tuple
    and list subclasses (``torch.Size``, named tuples) as plain tuples and lists. Tied tensors
    (the same memory viewed the same way, as ``model.state_dict()`` gives for shared weights)
    become one leaf that several paths point at, so they are stored once and come back tied.

    Args:
        state: a pytree of tensors and plain values.

    Returns:
        ``(skeleton, leaves)`` with ``leaves[i]`` the i-th tensor (detached, not copied).

    Raises:
        StateError: for an unsupported leaf or key, naming its path.

    Example:
        >>> import torch
        >>> skel, leaves = flatten({"a": torch.arange(3), "b": (1.5, None)})
        >>> len(leaves), unflatten(skel, leaves)["b"]
        (1, (1.5, None))
    """
    import torch

    tensors: list[torch.Tensor] = []
    metas: list[TensorMeta] = []
    paths: list[Path] = []
    active: set[int] = set()

    seen: dict[tuple[Any, ...], int] = {}

    def walk(x: Any, path: Path) -> Any:
        if isinstance(x, torch.Tensor):
            t = _check_tensor(x, path)
            alias = _box_alias(x) if hasattr(x, "placements") else _alias_key(t)
            if alias is not None:
                if alias in seen:  # a tied tensor: stored once, both paths point at one leaf
                    return (TENSOR, seen[alias])
                seen[alias] = len(tensors)
            tensors.append(t)
            metas.append(TensorMeta.of(t))
            paths.append(path)
            return (TENSOR, len(tensors) - 1)
        if isinstance(x, (Mapping, list, tuple)):
            if id(x) in active:
                raise StateError(f"{format_path(path)}: the state contains a reference cycle")
            active.add(id(x))
            try:
                if isinstance(x, Mapping):
                    items = []
                    for k, v in x.items():
                        if isinstance(k, bool) or not isinstance(k, (str, int)):
                            raise StateError(
                                f"{format_path(path)}: dict key {k!r} of type "
                                f"{type(k).__qualname__} is not a str or int"
                            )
                        _check_value(k, path)
                        items.append((k, walk(v, (*path, k))))
                    return (DICT, tuple(items))
                tag = LIST if isinstance(x, list) else TUPLE
                return (tag, tuple(walk(v, (*path, i)) for i, v in enumerate(x)))
            finally:
                active.discard(id(x))
        return (VALUE, _check_value(x, path))

    node = walk(state, ())
    return Skeleton(node, tuple(metas), tuple(paths)), tensors


def unflatten(skeleton: Skeleton, leaves: Sequence[Any]) -> Any:
    """Rebuild a state from its skeleton and one object per tensor leaf.

    Example:
        >>> import torch
        >>> skel, leaves = flatten({"x": [torch.ones(1), 2]})
        >>> unflatten(skel, ["anything"])
        {'x': ['anything', 2]}
    """
    if len(leaves) != len(skeleton.tensors):
        raise StateError(f"expected {len(skeleton.tensors)} leaves, got {len(leaves)}")

    def build(node: Any) -> Any:
        tag, body = node
        if tag == TENSOR:
            return leaves[body]
        if tag == VALUE:
            return body
        if tag == DICT:
            return {k: build(v) for k, v in body}
        items = [build(v) for v in body]
        return items if tag == LIST else tuple(items)

    return build(skeleton.node)


def skeleton_of(state: Any) -> Skeleton:
    """The skeleton of a state, or the state itself if it is already a skeleton.

    Example:
        >>> import torch
        >>> skeleton_of({"a": torch.zeros(2)}).tensors[0].shape
        (2,)
    """
    return state if isinstance(state, Skeleton) else flatten(state)[0]


def iter_nodes(node: Any, path: Path = ()) -> Iterator[tuple[Path, Any]]:
    """Every node of a skeleton tree with its path, depth first.

    Example:
        >>> skel, _ = flatten({"a": [1]})
        >>> [p for p, _ in iter_nodes(skel.node)]
        [(), ('a',), ('a', 0)]
    """
    yield path, node
    tag, body = node
    if tag == DICT:
        for k, v in body:
            yield from iter_nodes(v, (*path, k))
    elif tag in (LIST, TUPLE):
        for i, v in enumerate(body):
            yield from iter_nodes(v, (*path, i))
