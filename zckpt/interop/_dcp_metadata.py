"""A DCP checkpoint's ``.metadata`` read without running its pickle's code.

``torch.distributed.checkpoint``'s ``FileSystemWriter`` pickles one ``Metadata`` dataclass
(tensor shapes, dtypes and chunk boxes; where each chunk or value lies in which ``.distcp``
file; the flattening map of nested keys). This module unpickles it on Python's C unpickler with
``find_class`` answering only an allow-list of those dataclasses' qualified names (and
``torch.Size``, dtypes, the layout helper, ``pathlib`` paths, ``OrderedDict``), each answered by
an inert stand-in of this module; any other global is refused before anything is built
(:class:`DcpUnsafePickleError`, naming the file and the global), so the file cannot run code.
The stand-ins are then checked and turned into zckpt's own frozen values
(:class:`DcpMetadata`), every inconsistency a :class:`DcpFormatError` naming the file and the
tensor. Neither torch nor DCP is imported.

Example:
    >>> import tempfile, torch
    >>> from torch.distributed.checkpoint.format_utils import torch_save_to_dcp
    >>> d = tempfile.mkdtemp()
    >>> torch.save({"w": torch.ones(2, 3), "step": 7}, d + "/sd.pt")
    >>> torch_save_to_dcp(d + "/sd.pt", d + "/dcp")
    >>> md = read_metadata(d + "/dcp/.metadata")
    >>> md.tensors["w"].dtype, md.tensors["w"].shape, md.values
    ('float32', (2, 3), ('step',))
"""

from __future__ import annotations

import io
import math
import os
import pickle
from dataclasses import dataclass
from typing import Any

from zckpt.errors import FormatError
from zckpt.format._dtypes import ITEMSIZE_OF_NAME
from zckpt.interop._detect import DCP_METADATA as METADATA

__all__ = [
    "METADATA",
    "DcpChunk",
    "DcpFormatError",
    "DcpItem",
    "DcpMetadata",
    "DcpTensor",
    "DcpUnsafePickleError",
    "parse_metadata",
    "read_metadata",
]

#: Larger metadata than this is refused before it is read (a DCP ``.metadata`` of 10^5 tensors
#: is a few tens of MiB).
MAX_METADATA_BYTES = 1 << 30


class DcpFormatError(FormatError):
    """A DCP checkpoint zckpt cannot read: missing or inconsistent files, chunks or items.

    Example:
        >>> import zckpt
        >>> issubclass(DcpFormatError, zckpt.FormatError), issubclass(DcpFormatError, ValueError)
        (True, True)
    """


class DcpUnsafePickleError(DcpFormatError):
    """A DCP pickle references a global outside zckpt's allow-list; nothing of it was run.

    Example:
        >>> issubclass(DcpUnsafePickleError, DcpFormatError)
        True
    """


@dataclass(frozen=True)
class DcpChunk:
    """A box of a tensor: ``sizes`` elements from ``offsets`` along each dimension.

    Example:
        >>> DcpChunk((2, 0), (3, 4)).numel
        12
    """

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Elements in the box."""
        return math.prod(self.sizes)


@dataclass(frozen=True)
class DcpTensor:
    """A saved tensor: its dtype (a torch dtype name), global shape and the chunks saved.

    Example:
        >>> DcpTensor("bfloat16", (4,), (DcpChunk((0,), (4,)),)).numel
        4
    """

    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[DcpChunk, ...]

    @property
    def numel(self) -> int:
        """Elements of the whole tensor."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class DcpItem:
    """Where one chunk (or non-tensor value) is stored: bytes ``[offset, offset + length)`` of
    the file ``relative_path`` (a name inside the checkpoint directory).

    Example:
        >>> DcpItem("__0_0.distcp", 0, 1577).end
        1577
    """

    relative_path: str
    offset: int
    length: int

    @property
    def end(self) -> int:
        """The byte after the item."""
        return self.offset + self.length


#: A storage key: a tensor's name and chunk offsets, or a value's name and None.
ItemKey = tuple[str, "tuple[int, ...] | None"]


@dataclass(frozen=True)
class DcpMetadata:
    """What a DCP ``.metadata`` says, as zckpt's own values.

    ``tensors`` and ``values`` (the names of non-tensor entries, saved as ``torch.save`` bytes)
    are in the file's order, the state dict's; ``items`` maps ``(name, chunk offsets)`` (None
    for a value) to where it is stored; ``paths`` gives each flattened name its key path in the
    nested state dict (DCP's ``planner_data``; a name without one is a top-level key).

    Example:
        >>> md = DcpMetadata({}, (), {}, {}, "1.0.0", ("step",))
        >>> md.path_of("step"), md.path_of("a.b")
        (('step',), ('a.b',))
    """

    tensors: dict[str, DcpTensor]
    values: tuple[str, ...]
    items: dict[ItemKey, DcpItem]
    paths: dict[str, tuple[str | int, ...]]
    version: str | None
    #: Every entry's name, tensors and values together, in the file's order.
    order: tuple[str, ...]

    def path_of(self, name: str) -> tuple[str | int, ...]:
        """The key path of entry ``name`` in the nested state dict."""
        return self.paths.get(name, (name,))

    def files(self) -> tuple[str, ...]:
        """The files the items lie in, sorted (names relative to the directory)."""
        return tuple(sorted({i.relative_path for i in self.items.values()}))


# -- the stand-ins the unpickler builds -------------------------------------------------------


class _Record:
    """A stand-in for one of DCP's dataclasses: ``NEWOBJ`` with no arguments, then ``BUILD``
    sets its state (a dict of fields, or TensorProperties' tuple)."""

    kind = ""

    def __init__(self) -> None:  # never called by the unpickler (NEWOBJ calls __new__)
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _record(kind: str) -> type[_Record]:
    return type(f"_{kind}", (_Record,), {"kind": kind, "__slots__": ()})


class _Token:
    """An inert value a global stands for: a dtype, a layout, an enum member."""

    __slots__ = ("kind", "name")

    def __init__(self, kind: str, name: Any) -> None:
        self.kind, self.name = kind, name

    def __repr__(self) -> str:
        return f"{self.kind}:{self.name}"


def _size(*args: Any) -> tuple[int, ...]:
    """``torch.Size(seq)``."""
    if len(args) != 1:
        raise ValueError("torch.Size with unexpected arguments")
    return tuple(args[0])


def _layout(*args: Any) -> _Token:
    """``torch.serialization._get_layout(name)``."""
    if len(args) != 1 or not isinstance(args[0], str):
        raise ValueError("_get_layout with unexpected arguments")
    return _Token("layout", args[0])


def _mem_format(*args: Any) -> _Token:
    """``_MEM_FORMAT_ENCODING(value)``."""
    if len(args) != 1 or type(args[0]) is not int:
        raise ValueError("_MEM_FORMAT_ENCODING with unexpected arguments")
    return _Token("memory_format", args[0])


def _path(*args: Any) -> str:
    """``pathlib.PosixPath(*parts)`` (``StorageMeta.checkpoint_id``): its text."""
    if not all(isinstance(a, str) for a in args):
        raise ValueError("a path of something other than strings")
    return "/".join(args)


_MD = "torch.distributed.checkpoint."  # DCP's modules: named (pickle globals), never imported
_CLASSES = (
    "Metadata",
    "TensorStorageMetadata",
    "TensorProperties",
    "ChunkStorageMetadata",
    "BytesStorageMetadata",
    "MetadataIndex",
    "StorageMeta",
)
_RECORDS = {name: _record(name) for name in (*_CLASSES, "_StorageInfo")}


def _allowed() -> dict[str, Any]:
    out: dict[str, Any] = {f"{_MD}metadata.{n}": _RECORDS[n] for n in _CLASSES}
    out[f"{_MD}metadata._MEM_FORMAT_ENCODING"] = _mem_format
    out[f"{_MD}filesystem._StorageInfo"] = _RECORDS["_StorageInfo"]
    out["torch.Size"] = _size
    out["torch.serialization._get_layout"] = _layout
    out["collections.OrderedDict"] = dict
    for cls in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
        out[f"pathlib.{cls}"] = _path
        out[f"pathlib._local.{cls}"] = _path
    for name in ITEMSIZE_OF_NAME:
        out[f"torch.{name}"] = _Token("dtype", name)
    for name in ("strided", "sparse_coo", "sparse_csr", "_mkldnn"):
        out[f"torch.{name}"] = _Token("layout", f"torch.{name}")
    return out


#: Qualified name -> what the restricted unpickler answers for it (nothing else is found).
ALLOWED_GLOBALS = _allowed()


class _RefusedError(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full not in ALLOWED_GLOBALS:
            raise _RefusedError(full)
        return ALLOWED_GLOBALS[full]

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("a persistent id (DCP metadata has none)")


def _unpickle(data: bytes, where: str) -> Any:
    try:
        return _Unpickler(io.BytesIO(data)).load()
    except _RefusedError as e:
        raise DcpUnsafePickleError(
            f"{where}: refused to unpickle {e.name} (not in zckpt's allow-list for DCP "
            "metadata; nothing from the file was run)"
        ) from None
    except Exception as e:  # a torn pickle, a stand-in called oddly: nothing foreign ran
        raise DcpFormatError(
            f"{where}: not a DCP metadata pickle zckpt can read ({type(e).__name__}: {e})"
        ) from None


# -- stand-ins to values, checked ---------------------------------------------------------------


def _fields(x: Any, kind: str, where: str) -> dict[str, Any]:
    if not isinstance(x, _Record) or x.kind != kind:
        raise DcpFormatError(f"{where}: a {type(x).__name__} where DCP writes a {kind}")
    state = x.state if x.state is not None else {}
    if not isinstance(state, dict):
        raise DcpFormatError(f"{where}: a {kind} with a state that is not a dict")
    return state


def _dims(x: Any, where: str) -> tuple[int, ...]:
    if not isinstance(x, tuple) or any(type(d) is not int or d < 0 for d in x):
        raise DcpFormatError(f"{where}: {x!r} is not a tuple of sizes")
    return x


def _int(x: Any, where: str) -> int:
    if type(x) is not int or x < 0:
        raise DcpFormatError(f"{where}: {x!r} is not a byte count")
    return x


def _tensor(name: str, x: Any, where: str) -> DcpTensor:
    f = _fields(x, "TensorStorageMetadata", f"{where}: {name}")
    props = f.get("properties")
    if not isinstance(props, _Record) or props.kind != "TensorProperties":
        raise DcpFormatError(f"{where}: {name}: no TensorProperties")
    state = props.state
    dtype = state[0] if isinstance(state, tuple) and state else None
    if isinstance(state, dict):  # an older writer's plain dataclass state
        dtype = state.get("dtype")
    if not isinstance(dtype, _Token) or dtype.kind != "dtype":
        raise DcpFormatError(f"{where}: {name}: dtype {dtype!r} is not one zckpt stores")
    shape = _dims(f.get("size"), f"{where}: {name}: size")
    chunks_in = f.get("chunks")
    if not isinstance(chunks_in, list):
        raise DcpFormatError(f"{where}: {name}: chunks is not a list")
    chunks = []
    for i, c in enumerate(chunks_in):
        cf = _fields(c, "ChunkStorageMetadata", f"{where}: {name}: chunk {i}")
        offsets = _dims(cf.get("offsets"), f"{where}: {name}: chunk {i} offsets")
        sizes = _dims(cf.get("sizes"), f"{where}: {name}: chunk {i} sizes")
        if len(offsets) != len(shape) or len(sizes) != len(shape):
            raise DcpFormatError(
                f"{where}: {name}: chunk {i} at {list(offsets)} of {list(sizes)} has not the "
                f"{len(shape)} dimensions of its shape {list(shape)}"
            )
        if any(o + s > n for o, s, n in zip(offsets, sizes, shape)):
            raise DcpFormatError(
                f"{where}: {name}: chunk {i} at {list(offsets)} of {list(sizes)} lies outside "
                f"its shape {list(shape)}"
            )
        chunks.append(DcpChunk(offsets, sizes))
    return DcpTensor(str(dtype.name), shape, tuple(chunks))


def _storage(x: Any, where: str) -> dict[ItemKey, DcpItem]:
    if not isinstance(x, dict):
        raise DcpFormatError(f"{where}: storage_data is a {type(x).__name__}, not a dict")
    out: dict[ItemKey, DcpItem] = {}
    for k, v in x.items():
        kf = _fields(k, "MetadataIndex", f"{where}: storage_data key")
        fqn, offset = kf.get("fqn"), kf.get("offset")
        if not isinstance(fqn, str):
            raise DcpFormatError(f"{where}: storage_data: a key without a name")
        off = None if offset is None else _dims(offset, f"{where}: {fqn}: storage offset")
        at = f"{where}: {fqn}" + ("" if off is None else f" chunk at {list(off)}")
        vf = _fields(v, "_StorageInfo", at)
        path = vf.get("relative_path")
        if not isinstance(path, str):
            raise DcpFormatError(f"{at}: no relative_path")
        if vf.get("transform_descriptors"):
            raise DcpFormatError(
                f"{at}: stored through the storage transforms {vf['transform_descriptors']!r} "
                "(DCP extensions such as compression), which zckpt does not read"
            )
        item = DcpItem(
            path, _int(vf.get("offset"), f"{at}: offset"), _int(vf.get("length"), f"{at}: length")
        )
        if (fqn, off) in out:
            raise DcpFormatError(f"{at}: stored twice")
        out[(fqn, off)] = item
    return out


def _paths(x: Any, where: str) -> dict[str, tuple[str | int, ...]]:
    if x is None:
        return {}
    if not isinstance(x, dict):
        raise DcpFormatError(f"{where}: planner_data is a {type(x).__name__}, not a dict")
    out: dict[str, tuple[str | int, ...]] = {}
    for k, v in x.items():
        if not isinstance(k, str) or not isinstance(v, tuple) or not v:
            raise DcpFormatError(f"{where}: planner_data entry {k!r} is not a key path")
        if any(type(p) not in (str, int) for p in v) or type(v[0]) is not str:
            raise DcpFormatError(f"{where}: planner_data: {k}: {v!r} is not a key path")
        out[k] = v
    return out


def parse_metadata(data: bytes, where: str = METADATA) -> DcpMetadata:
    """The :class:`DcpMetadata` of ``.metadata`` bytes (``where`` names them in errors).

    Raises:
        DcpUnsafePickleError: a global outside the allow-list (named); nothing was run.
        DcpFormatError: not DCP metadata, or inconsistent (the entry named).

    Example:
        >>> import pickle
        >>> parse_metadata(pickle.dumps(print), "x/.metadata")
        Traceback (most recent call last):
        ...
        zckpt.interop._dcp_metadata.DcpUnsafePickleError: x/.metadata: refused to unpickle \
builtins.print (not in zckpt's allow-list for DCP metadata; nothing from the file was run)
    """
    top = _fields(_unpickle(data, where), "Metadata", where)
    sdm = top.get("state_dict_metadata")
    if not isinstance(sdm, dict):
        raise DcpFormatError(f"{where}: state_dict_metadata is not a dict")
    tensors: dict[str, DcpTensor] = {}
    values: list[str] = []
    for name, v in sdm.items():
        if not isinstance(name, str):
            raise DcpFormatError(f"{where}: an entry named {name!r}, not a string")
        if isinstance(v, _Record) and v.kind == "BytesStorageMetadata":
            values.append(name)
        else:
            tensors[name] = _tensor(name, v, where)
    items = _storage(top.get("storage_data"), where)
    paths = _paths(top.get("planner_data"), where)
    version = top.get("version")
    md = DcpMetadata(
        tensors,
        tuple(values),
        items,
        paths,
        version if isinstance(version, str) else None,
        tuple(sdm),
    )
    _check_items(md, where)
    return md


def _check_items(md: DcpMetadata, where: str) -> None:
    """Every chunk and value has an item; item names are plain file names in the directory."""
    for name, t in md.tensors.items():
        for c in t.chunks:
            if (name, c.offsets) not in md.items:
                raise DcpFormatError(
                    f"{where}: {name}: chunk at {list(c.offsets)} of {list(c.sizes)} has no "
                    "storage entry"
                )
    for name in md.values:
        if (name, None) not in md.items:
            raise DcpFormatError(f"{where}: {name}: value has no storage entry")
    for path in md.files():
        if (
            not path
            or path in (".", "..")
            or "/" in path
            or "\\" in path
            or "\0" in path
            or path == METADATA
        ):
            raise DcpFormatError(
                f"{where}: storage file {path!r} is not a file name inside the checkpoint "
                "directory (zckpt reads nothing outside it)"
            )


def read_metadata(path: str | os.PathLike[str]) -> DcpMetadata:
    """Read and check a DCP ``.metadata`` file (see the module docstring).

    Raises:
        DcpUnsafePickleError: a global outside the allow-list (named); nothing was run.
        DcpFormatError: unreadable, not DCP metadata, or inconsistent (the entry named).

    Example:
        >>> import tempfile
        >>> read_metadata(tempfile.mkdtemp() + "/.metadata")
        Traceback (most recent call last):
        ...
        zckpt.interop._dcp_metadata.DcpFormatError: /tmp/.../.metadata: no such file
    """
    from zckpt.store._storage import StorageError, open_regular

    where = os.fspath(path)
    try:
        fd = open_regular(where, follow=True)
    except StorageError as e:
        raise DcpFormatError(e.strerror or str(e)) from None
    try:
        size = os.fstat(fd).st_size
        if size > MAX_METADATA_BYTES:
            raise DcpFormatError(f"{where}: {size} bytes, more than DCP metadata can be")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read()
    except OSError as e:
        raise DcpFormatError(f"{where}: cannot read ({e.strerror or e})") from None
    finally:
        os.close(fd)
    return parse_metadata(data, where)
