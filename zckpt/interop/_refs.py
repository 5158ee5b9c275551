"""Inert references to the tensors of a ``torch.save`` file, and the torch objects they stand for.

``_fastload.py`` unpickles DeepSpeed's files on the C unpickler with ``find_class`` answering
the objects of this module instead of torch's: a tensor becomes a :class:`TensorRef` (which
zip record of which file, dtype, storage offset, shape, stride), a dtype or storage type a
:class:`TorchGlobal` naming it, ``torch.Size`` a :class:`Size` tuple, ``torch.device`` a
:class:`Device`. None of them needs torch, so a consolidation whose every output is a byte range
of the checkpoint's files (``_deepspeed.py: export_values``) never imports it.

:func:`to_torch` turns such a tree into what torch's ``weights_only`` load builds from the same
file: each rebuild call is made with torch's own function on storages sliced from one private
mapping of the file (as ``mmap=True`` does), each token becomes the object torch's allow-list
maps its name to. That is the eager and lazy torch path's load: one unpickle, two readings.

Example:
    >>> ref = TensorRef(StorageRef("/f.pt", "0", "float32", 6, "cpu", 64), 2, (2, 2), (2, 1))
    >>> ref.numel(), ref.dtype, ref.is_contiguous(), ref.file_range()
    (4, 'float32', True, ('/f.pt', 72, 16))
"""

from __future__ import annotations

import enum
import math
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from zckpt.format._dtypes import ITEMSIZE_OF_NAME

__all__ = [
    "Device",
    "RebuildFn",
    "Size",
    "StorageRef",
    "TensorRef",
    "TorchGlobal",
    "TorchBuilder",
    "file_stamp",
    "is_tensor",
    "to_torch",
]

# Quantized dtypes' elements are one byte (qint32: four); storages of them may appear.
_ITEMSIZE = {**ITEMSIZE_OF_NAME, "qint8": 1, "quint8": 1, "qint32": 4, "quint4x2": 1, "quint2x4": 1}


def file_stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    """A file's identity as a copy by path checks it (:attr:`StorageRef.stamp`): device,
    inode, size and mtime. A file renamed over it has another device or inode; one rewritten in
    place another size or mtime.

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile() as f:
        ...     file_stamp(os.fstat(f.fileno()))[2]
        0
    """
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class StorageRef:
    """A storage of a ``torch.save`` zip: ``numel`` elements of ``dtype`` (a torch dtype name)
    at byte ``offset`` of ``path`` (record ``data/<key>``); ``stamp``: the file's identity when
    it was read (device, inode, size, mtime in ns), which a copy of its bytes checks later.

    Example:
        >>> StorageRef("/f.pt", "0", "bfloat16", 3, "cpu", 128).nbytes
        6
    """

    path: str
    key: str
    dtype: str
    numel: int
    location: str
    offset: int
    stamp: tuple[int, ...] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the storage."""
        return self.numel * _ITEMSIZE[self.dtype]


class TensorRef:
    """A tensor of a ``torch.save`` file, not built: its storage, storage offset (elements),
    shape and stride, and the rebuild call that makes it in torch (``call``: the torch function's
    qualified name and its arguments, storages as :class:`StorageRef`).

    It answers what DeepSpeed's reader asks of a tensor (``dtype`` as a name, ``shape``,
    ``numel()``, ``dim()``) and :meth:`file_range`, where its bytes are.

    Example:
        >>> s = StorageRef("/f.pt", "0", "float32", 8, "cpu", 0)
        >>> t = TensorRef(s, 0, (2, 4), (1, 2))
        >>> t.is_contiguous(), t.file_range(), t.file_range(1, 3) is None
        (False, None, True)
    """

    __slots__ = ("call", "shape", "storage", "storage_offset", "stride")

    def __init__(
        self,
        storage: StorageRef,
        storage_offset: int,
        shape: tuple[int, ...],
        stride: tuple[int, ...],
        call: tuple[str, tuple[Any, ...]] | None = None,
    ) -> None:
        self.storage, self.storage_offset = storage, storage_offset
        self.shape, self.stride = shape, stride
        args = (storage, storage_offset, shape, stride)
        self.call = call if call is not None else ("torch._utils._rebuild_tensor", args)

    def __repr__(self) -> str:
        return f"TensorRef({self.storage.path}:{self.storage.key}, {self.dtype}, {self.shape})"

    @property
    def dtype(self) -> str:
        """The torch dtype's name (``"float32"``)."""
        return self.storage.dtype

    def numel(self) -> int:
        """Elements."""
        return math.prod(self.shape)

    def dim(self) -> int:
        """Dimensions."""
        return len(self.shape)

    def is_contiguous(self) -> bool:
        """Row-major without gaps (as torch says it: size-1 dimensions' strides do not count)."""
        want = 1
        for n, s in zip(reversed(self.shape), reversed(self.stride)):
            if n != 1 and s != want:
                return False
            want *= n
        return True

    def file_range(self, start: int = 0, stop: int | None = None) -> tuple[str, int, int] | None:
        """``(path, byte offset, bytes)`` of flat elements ``[start, stop)``, or None when the
        tensor is not contiguous (its bytes are no one range).

        Example:
            >>> s = StorageRef("/f.pt", "0", "int16", 8, "cpu", 64)
            >>> TensorRef(s, 1, (4,), (1,)).file_range(1, 3)
            ('/f.pt', 68, 4)
        """
        n = self.numel()
        stop = n if stop is None else stop
        if not self.is_contiguous() or not 0 <= start <= stop <= n:
            return None
        item = _ITEMSIZE[self.dtype]
        at = self.storage.offset + (self.storage_offset + start) * item
        return (self.storage.path, at, (stop - start) * item)


class TorchGlobal:
    """A torch value an allowed ``GLOBAL`` names (a dtype, a storage type): kept by its name.

    Example:
        >>> TorchGlobal("torch.BFloat16Storage").storage_dtype
        'bfloat16'
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name

    @property
    def storage_dtype(self) -> str | None:
        """The dtype name of a storage type (``torch.FloatStorage``: ``"float32"``), else None."""
        return STORAGE_DTYPES.get(self.name.rsplit(".", 1)[-1])


#: Storage type names torch's allow-list holds (also as ``torch.cuda.<name>``) -> their dtypes.
STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "QInt8Storage": "qint8",
    "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32",
    "QUInt4x2Storage": "quint4x2",
    "QUInt2x4Storage": "quint2x4",
}


class Size(tuple):  # type: ignore[type-arg]
    """Stand-in for ``torch.Size``: a tuple (``to_torch`` makes it a ``torch.Size``).

    Example:
        >>> Size((2, 3)) == (2, 3)
        True
    """

    __slots__ = ()


class Device:
    """Stand-in for ``torch.device``: the arguments it was built with.

    Example:
        >>> Device("cpu").args
        ('cpu',)
    """

    __slots__ = ("args",)
    args: tuple[Any, ...]

    def __new__(cls, *args: Any) -> Device:
        self = object.__new__(cls)
        self.args = args
        return self

    def __init__(self, *args: Any) -> None:
        pass


class TensorType:
    """Stand-in for ``torch.Tensor`` (the type ``_rebuild_from_type_v2`` is given)."""

    __slots__ = ()


TENSOR_TYPE = TensorType()


def _shape(x: Any, what: str) -> tuple[int, ...]:
    if not isinstance(x, tuple) or any(type(d) is not int or d < 0 for d in x):
        raise ValueError(f"{what}: {x!r} is not a tuple of sizes")
    return tuple(x)


class RebuildFn:
    """Stand-in for torch's tensor rebuild functions: returns a :class:`TensorRef`, checked as
    torch's ``set_`` checks it (the elements lie inside the storage), else raises.

    Example:
        >>> s = StorageRef("/f.pt", "0", "float32", 4, "cpu", 0)
        >>> REBUILD["torch._utils._rebuild_tensor_v2"](s, 1, (3,), (1,), False, OrderedDict())
        TensorRef(/f.pt:0, float32, (3,))
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def __call__(self, *args: Any) -> TensorRef:
        if self.name.endswith("_rebuild_from_type_v2"):
            if len(args) != 4 or not isinstance(args[0], RebuildFn) or args[1] is not TENSOR_TYPE:
                raise ValueError("_rebuild_from_type_v2 of something other than a tensor")
            func, _type, inner, state = args
            if func.name.endswith("_rebuild_from_type_v2") or not isinstance(inner, tuple):
                raise ValueError("_rebuild_from_type_v2 of something other than a tensor")
            if state is not None and not isinstance(state, dict):
                raise ValueError("a tensor state that is not a dict")
            base = func(*inner)
            return TensorRef(base.storage, base.storage_offset, base.shape, base.stride,
                             (self.name, args))  # fmt: skip
        if self.name.endswith("_rebuild_tensor_v2"):
            if len(args) not in (6, 7) or type(args[4]) is not bool:
                raise ValueError("_rebuild_tensor_v2 with unexpected arguments")
            if len(args) == 7 and args[6]:
                raise ValueError("tensor metadata (conj, neg bits): torch's load decides")
        elif len(args) != 4:
            raise ValueError("_rebuild_tensor with unexpected arguments")
        storage, offset, shape, stride = args[:4]
        if not isinstance(storage, StorageRef) or type(offset) is not int or offset < 0:
            raise ValueError("a tensor rebuilt from something other than a storage")
        shape, stride = _shape(shape, "size"), _shape(stride, "stride")
        if len(shape) != len(stride):
            raise ValueError("size and stride of different lengths")
        if math.prod(shape) and offset + sum((n - 1) * s for n, s in zip(shape, stride)) >= max(
            storage.numel, 0
        ):
            raise ValueError("a tensor past the end of its storage")
        return TensorRef(storage, offset, shape, stride, (self.name, args))


REBUILD = {
    n: RebuildFn(n)
    for n in (
        "torch._utils._rebuild_tensor",
        "torch._utils._rebuild_tensor_v2",
        "torch._tensor._rebuild_from_type_v2",
    )
}


def is_tensor(x: Any) -> bool:
    """A torch tensor or a :class:`TensorRef` (without importing torch).

    Example:
        >>> is_tensor(3), is_tensor(TensorRef(StorageRef("/f", "0", "int8", 1, "cpu", 0), 0,
        ...                                   (1,), (1,)))
        (False, True)
    """
    if isinstance(x, TensorRef):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


class TorchBuilder:
    """Builds torch objects from references: one private mapping per file, storages shared by
    key (as torch's load shares them). A DeepSpeed checkpoint opened as references keeps one,
    so its tensors built one by one share what a whole load would.

    Example:
        >>> import tempfile, torch
        >>> from zckpt.interop._fastload import load_refs
        >>> p = tempfile.mkdtemp() + "/x.pt"
        >>> torch.save([torch.ones(2)], p)
        >>> TorchBuilder().tensor(load_refs(p)[0]).tolist()
        [1.0, 1.0]
    """

    def __init__(self) -> None:
        import torch
        import torch._weights_only_unpickler as wou

        self.torch = torch
        self.allowed = wou._get_allowed_globals()
        self.whole: dict[str, Any] = {}
        self.loaded: dict[tuple[str, str, int], Any] = {}
        self.memo: dict[int, tuple[Any, Any]] = {}

    def storage(self, s: StorageRef) -> Any:
        torch = self.torch
        # By offset too: a DCP .distcp file holds many torch.save zips, each with a storage "0"
        key = (s.path, s.key, s.offset)
        if key in self.loaded:
            return self.loaded[key]
        if s.path not in self.whole:
            import os

            self.whole[s.path] = torch.UntypedStorage.from_file(
                s.path, False, os.path.getsize(s.path)
            )
        untyped = self.whole[s.path][s.offset : s.offset + s.nbytes]
        typed = torch.storage.TypedStorage(
            wrap_storage=untyped, dtype=getattr(torch, s.dtype), _internal=True
        )
        if typed._data_ptr() != 0:  # as torch's own load shares them
            self.loaded[key] = typed
        return typed

    def value(self, x: Any) -> Any:
        """``x`` as torch's load builds it; each object of the tree converted once (shared
        objects stay shared), containers in place."""
        t = type(x)
        if t in (int, float, str, bytes, bool, type(None)):
            return x
        if id(x) in self.memo:
            return self.memo[id(x)][1]
        out: Any
        if t is TensorRef:
            name, args = x.call
            out = self.allowed[name](*[self.value(a) for a in args])
        elif t is StorageRef:
            out = self.storage(x)
        elif t is RebuildFn or t is TorchGlobal:
            out = self.allowed[x.name]
        elif t is TensorType:
            out = self.torch.Tensor
        elif x is Size or x is Device:  # the classes themselves, as values
            out = self.torch.Size if x is Size else self.torch.device
        elif t is Size:
            out = self.torch.Size([self.value(v) for v in x])
        elif t is Device:
            out = self.torch.device(*[self.value(v) for v in x.args])
        elif t is tuple:
            out = tuple([self.value(v) for v in x])
        else:
            # Containers and the stand-ins are converted in place: known before their items,
            # so a cycle through them ends; the memo keeps every original alive (its id is
            # never reused during the walk).
            self.memo[id(x)] = (x, x)
            if t is list:
                x[:] = [self.value(v) for v in x]
            elif t is dict or t is OrderedDict:
                items = [(self.value(k), self.value(v)) for k, v in x.items()]
                x.clear()
                x.update(items)
                self._attrs(x)
            else:  # the stand-ins (their attributes), ZeroStage, empty sets
                self._attrs(x)
            return x
        self.memo[id(x)] = (x, out)
        return out

    def tensor(self, x: Any) -> Any:
        """A :class:`TensorRef` as the torch tensor it stands for; anything else as it is."""
        if type(x) is not TensorRef:
            return x
        self.memo.clear()
        return self.value(x)

    def _attrs(self, x: Any) -> None:
        """The attributes ``BUILD`` set on a stand-in instance (or an ``OrderedDict``)."""
        d = getattr(x, "__dict__", None)
        if type(d) is dict and d and not isinstance(x, (type, enum.Enum)):
            for k in list(d):
                d[k] = self.value(d[k])


def to_torch(tree: Any) -> Any:
    """The tree torch's ``weights_only`` load (``mmap=True``) builds from the file ``tree`` was
    unpickled from as references (see the module docstring); containers are converted in place.
    Imports torch.

    Example:
        >>> import tempfile, torch
        >>> from zckpt.interop._fastload import load_refs
        >>> p = tempfile.mkdtemp() + "/x.pt"
        >>> torch.save({"w": torch.arange(3.0), "n": torch.Size([3])}, p)
        >>> refs = load_refs(p)
        >>> type(refs["w"]).__name__, to_torch(refs)["w"].tolist(), type(refs["n"]).__name__
        ('TensorRef', [0.0, 1.0, 2.0], 'Size')
    """
    return TorchBuilder().value(tree)
