"""The opcode scan of the C-unpickler fast path, and the globals it accepts.

:func:`scan` reads a ``torch.save`` pickle's opcodes without building anything and says whether
Python's C unpickler would build exactly what torch's ``weights_only`` unpickler builds from it,
referring to nothing outside :data:`FAST_GLOBALS` (torch's tensor rebuild functions, storage
types and dtypes, ``torch.Tensor``, ``torch.Size``, ``torch.device``,
``collections.OrderedDict`` and zckpt's inert DeepSpeed stand-ins, each answered by the inert
objects of ``_refs.py``). It is step 1 of ``_fastload.py``, whose docstring gives the rules and
why they keep the result torch's. It lives apart from the unpickling because it is the
allow-list and the rule of what is safe, decided on the bytes alone (no file, no unpickler, no
torch), and ``_dcp.py`` checks a DCP value's globals against the same table.
"""

from __future__ import annotations

import struct
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from zckpt.interop._refs import (
    REBUILD,
    STORAGE_DTYPES,
    TENSOR_TYPE,
    Device,
    Size,
    TorchGlobal,
)

__all__ = ["FAST_GLOBALS", "scan"]

_PLAIN = "plain"  # a stand-in class instance: BUILD sets attributes

#: The dtypes torch's ``weights_only`` allow-list names (``torch.<name>``), kept by name.
DTYPE_NAMES = tuple(
    [
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "bool",
        "complex128",
        "complex64",
        "complex32",
        "qint8",
        "qint32",
        "quint8",
        "quint4x2",
        "quint2x4",
        "uint16",
        "uint32",
        "uint64",
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "float4_e2m1fn_x2",
        "bits1x8",
        "bits2x4",
        "bits4x2",
        "bits8",
        "bits16",
        "uint1",
        "uint2",
        "uint3",
        "uint4",
        "uint5",
        "uint6",
        "uint7",
        "int1",
        "int2",
        "int3",
        "int4",
        "int5",
        "int6",
        "int7",
    ]
)


def _fast_globals(extra: Mapping[str, Any]) -> dict[str, Any]:
    """Every global the fast path answers, by name, as the inert objects of ``_refs.py`` (no
    torch): what torch's allow-list maps these names to is what ``to_torch`` makes of them."""
    out: dict[str, Any] = {
        "collections.OrderedDict": OrderedDict,
        "torch.Size": Size,
        "torch.device": Device,
        "torch.Tensor": TENSOR_TYPE,
        **REBUILD,
    }
    for name in DTYPE_NAMES:
        out[f"torch.{name}"] = TorchGlobal(f"torch.{name}")
    for name in STORAGE_DTYPES:
        for module in ("torch", "torch.cuda"):
            if module == "torch" or not name.startswith("Q"):
                out[f"{module}.{name}"] = TorchGlobal(f"{module}.{name}")
    out.update(extra)
    return out


#: Filled on first use (``_fast_globals`` with ``_unpickle.ALLOWED_GLOBALS``'s stand-ins).
FAST_GLOBALS: dict[str, Any] = {}


def _globals() -> dict[str, Any]:
    if not FAST_GLOBALS:
        from zckpt.interop._unpickle import ALLOWED_GLOBALS

        FAST_GLOBALS.update(_fast_globals(ALLOWED_GLOBALS))
    return FAST_GLOBALS


def _map_name(module: str, name: str) -> tuple[str, str]:
    """torch's ``_read_global_instruction`` renaming (Python 2 names)."""
    if (module, name) in NAME_MAPPING:
        return NAME_MAPPING[(module, name)]
    if module in IMPORT_MAPPING:
        return IMPORT_MAPPING[module], name
    return module, name


def _kind_of_global(obj: Any) -> str:
    if obj is OrderedDict:
        return "g:odict"
    if type(obj).__name__ == "RebuildFn":
        return "g:rebuild"
    if obj is TENSOR_TYPE:  # NEWOBJ/REDUCE on torch.Tensor: torch's load decides
        return "g:value"
    if isinstance(obj, type) and obj.__module__.startswith("zckpt.interop._unpickle"):
        return "g:standin-enum" if issubclass(obj, int) else "g:standin"
    if obj is Size or obj is Device:
        return "g:class"
    return "g:value"


# Opcodes pushing a plain value of a fixed width (argument bytes after the opcode): NONE,
# NEWTRUE, NEWFALSE, EMPTY_TUPLE, EMPTY_SET; BININT1, BININT2, BININT, BINFLOAT.
_SCALARS = {0x4E: 0, 0x88: 0, 0x89: 0, 0x29: 0, 0x8F: 0, 0x4B: 1, 0x4D: 2, 0x4A: 4, 0x47: 8}

_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_H16 = struct.Struct("<H")


def scan(data: bytes, fast: Mapping[str, Any] | None = None) -> bool:
    """Whether the C unpickler would build exactly what torch's ``weights_only`` unpickler
    builds from ``data``, and refers to nothing outside ``fast`` (default
    :data:`FAST_GLOBALS`); see ``_fastload.py``'s module docstring. Never builds an object.

    Example:
        >>> import pickle, collections
        >>> scan(pickle.dumps(collections.OrderedDict(a=[1, 2.0, "x"]), protocol=2))
        True
        >>> scan(pickle.dumps(print, protocol=2)), scan(pickle.dumps({1}, protocol=4))
        (False, False)
    """
    g = _globals() if fast is None else fast
    try:
        return _scan(data, g)
    except (IndexError, KeyError, struct.error, UnicodeDecodeError, ValueError):
        return False


def _scan(data: bytes, g: Mapping[str, Any]) -> bool:
    stack: list[str] = []
    marks: list[list[str]] = []
    memo: dict[int, str] = {}
    names: dict[str, str] = {}
    pos, end = 0, len(data)
    proto_seen = False
    while pos < end:
        op = data[pos]
        pos += 1
        if op == 0x80:  # PROTO
            if data[pos] != 2 or proto_seen:
                return False
            proto_seen = True
            pos += 1
        elif op == 0x63:  # GLOBAL
            nl = data.index(b"\n", pos)
            nl2 = data.index(b"\n", nl + 1)
            module, name = _map_name(data[pos:nl].decode(), data[nl + 1 : nl2].decode())
            pos = nl2 + 1
            full = f"{module}.{name}"
            if full not in g:
                return False
            if full not in names:
                names[full] = _kind_of_global(g[full])
            stack.append(names[full])
        elif op == 0x81:  # NEWOBJ
            stack.pop()
            cls = stack.pop()
            if cls == "g:odict":
                stack.append("odict")
            elif cls == "g:standin":
                stack.append(_PLAIN)
            elif cls in ("g:standin-enum", "g:class"):
                stack.append("other")
            else:
                return False
        elif op == 0x52:  # REDUCE
            stack.pop()
            func = stack[-1]
            if func == "g:odict":
                stack[-1] = "odict"
            elif func == "g:rebuild":
                stack[-1] = "tensor"
            elif func == "g:standin":
                stack[-1] = _PLAIN
            elif func in ("g:standin-enum", "g:class"):
                stack[-1] = "other"
            else:
                return False
        elif op == 0x62:  # BUILD
            state = stack.pop()
            if state != "dict" or stack[-1] not in ("odict", _PLAIN):
                return False
        elif op == 0x61:  # APPEND
            stack.pop()
            if stack[-1] != "list":
                return False
        elif op == 0x65:  # APPENDS
            stack = marks.pop()
            if stack[-1] != "list":
                return False
        elif op == 0x73:  # SETITEM
            stack.pop()
            stack.pop()
            if stack[-1] not in ("dict", "odict"):
                return False
        elif op == 0x75:  # SETITEMS
            items = stack
            stack = marks.pop()
            if len(items) % 2 or stack[-1] not in ("dict", "odict"):
                return False
        elif op == 0x28:  # MARK
            marks.append(stack)
            stack = []
        elif op == 0x74:  # TUPLE
            stack = marks.pop()
            stack.append("other")
        elif op == 0x85:  # TUPLE1
            stack[-1] = "other"
        elif op == 0x86:  # TUPLE2
            if len(stack) < 2:
                return False
            stack[-2:] = ["other"]
        elif op == 0x87:  # TUPLE3
            if len(stack) < 3:
                return False
            stack[-3:] = ["other"]
        elif op in _SCALARS:  # a value of a fixed width: nothing to follow
            pos += _SCALARS[op]
            stack.append("other")
        elif op == 0x5D:  # EMPTY_LIST
            stack.append("list")
        elif op == 0x7D:  # EMPTY_DICT
            stack.append("dict")
        elif op == 0x58:  # BINUNICODE
            (n,) = _U32.unpack_from(data, pos)
            pos += 4 + n
            stack.append("other")
        elif op in (0x55, 0x8A):  # SHORT_BINSTRING LONG1
            pos += 1 + data[pos]
            stack.append("other")
        elif op == 0x51:  # BINPERSID
            stack[-1] = "storage"
        elif op == 0x68:  # BINGET
            stack.append(memo[data[pos]])
            pos += 1
        elif op == 0x6A:  # LONG_BINGET
            stack.append(memo[_U32.unpack_from(data, pos)[0]])
            pos += 4
        elif op == 0x71:  # BINPUT
            memo[data[pos]] = stack[-1]
            pos += 1
        elif op == 0x72:  # LONG_BINPUT
            memo[_U32.unpack_from(data, pos)[0]] = stack[-1]
            pos += 4
        elif op == 0x2E:  # STOP
            return proto_seen and pos == end and len(stack) == 1 and not marks
        else:
            return False
        if pos > end:
            return False
    return False
