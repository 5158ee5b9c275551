"""``torch.load(weights_only=True, mmap=True)`` of DeepSpeed's files, on the C unpickler.

torch's ``weights_only`` unpickler is pure Python: rank 0's files of a ZeRO-3 checkpoint took
0.2-0.3 s of a 0.6 s consolidation. :func:`fast_load` gives the same result from Python's C
``pickle.Unpickler``, with the same guarantee that nothing from the file is run, or returns
:data:`NOT_FAST` and the caller does what it did before (torch's own ``weights_only`` load,
with its refusals and messages).

How it stays exactly torch's result, never more permissive:

1. **A scan first** (:func:`scan`), over the opcodes without building anything. It accepts only
   the opcodes torch's ``weights_only`` unpickler supports, and only ``GLOBAL`` names in
   :data:`FAST_GLOBALS`: torch's tensor rebuild functions (``_rebuild_tensor``,
   ``_rebuild_tensor_v2``, ``_rebuild_from_type_v2``), its storage types and dtypes,
   ``torch.Tensor``, ``torch.Size``, ``torch.device``, ``collections.OrderedDict`` (each the
   very object torch's own allow-list maps the name to) and zckpt's inert DeepSpeed stand-ins.
   It follows
   what kind of object each stack slot and memo entry holds, and accepts ``REDUCE`` only on one
   of those globals, ``NEWOBJ`` only on one of those classes (not ``Parameter``), ``BUILD`` only
   with a fresh ``dict`` as the state and only on an ``OrderedDict`` or a stand-in instance,
   ``APPEND(S)`` only on a list and ``SETITEM(S)`` only on a dict or ``OrderedDict``: where torch
   would refuse, or would do something the C unpickler does differently, the scan says no.
2. **The C unpickler then builds the objects** with ``find_class`` answering only
   :data:`FAST_GLOBALS` (anything else raises), and those are inert: torch's names are answered
   by the stand-ins of ``_refs.py`` (a rebuild function returns a ``TensorRef``: which record of
   the file, dtype, storage offset, shape, stride, checked to lie inside its storage as torch's
   ``set_`` checks it), and ``persistent_load`` answers only ``('storage', type, key,
   location, numel)`` ids, with a ``StorageRef`` (the record's byte offset, read from the zip's
   own headers). This is :func:`load_refs`: no torch object is built, torch is not imported.
3. **torch's objects, when wanted** (:func:`fast_load`): ``_refs.to_torch`` calls torch's own
   rebuild functions with the recorded arguments, on slices of one private mapping of the file
   (as torch's ``mmap=True`` load makes them), and maps every other stand-in to the object
   torch's allow-list maps its name to.

Before any of it, the zip's layout is checked (``_record_offsets``): one record per name, each
local header where the central directory says and agreeing with it, records disjoint. torch's
loads check none of it (a directory entry pointing at another record's header gives that
record's bytes, a duplicate name one copy or the other), so a file failing it is a
:class:`~zckpt.interop._unpickle.DeepSpeedFormatError` naming the record and the byte offset,
not left to torch. Any other error on the way (a torn file, an odd state the C unpickler
rejects) is :data:`NOT_FAST`: torch's load then runs and reports it as before.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import sys
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from zckpt.interop._refs import (
    REBUILD,
    STORAGE_DTYPES,
    TENSOR_TYPE,
    Device,
    Size,
    StorageRef,
    TorchGlobal,
    file_stamp,
    to_torch,
)
from zckpt.interop._window import FileWindow

__all__ = [
    "FAST_GLOBALS",
    "NOT_FAST",
    "fast_load",
    "load_refs",
    "record_problems",
    "records_problems",
    "require_intact",
    "scan",
]

#: What :func:`fast_load` returns when it cannot give torch's result; the caller loads as before.
NOT_FAST: Any = object()

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
    :data:`FAST_GLOBALS`); see the module docstring. Never builds an object.

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


class _Unpickler(pickle.Unpickler):
    """The C unpickler, answering only the fast globals and storage ids."""

    def __init__(self, data: bytes, fast: Mapping[str, Any], storage: Callable[..., Any]):
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._fast = fast
        self._storage = storage

    def find_class(self, module: str, name: str) -> Any:
        module, name = _map_name(module, name)
        full = f"{module}.{name}"
        if full not in self._fast:  # never reached after scan(); kept as the last word
            raise pickle.UnpicklingError(f"refused global {full}")
        return self._fast[full]

    def persistent_load(self, pid: Any) -> Any:
        return self._storage(pid)


class _DamagedError(Exception):
    """The file is a torch.save zip that no loader may read as it is (torch's ``mmap=True`` load
    would give wrong values without an error): a zckpt error, not torch's fallback."""


_LOCAL = struct.Struct("<4sHHHHHIIIHH")  # a zip local file header (30 bytes)
_DESCRIPTOR = b"PK\x07\x08"
_ZIP64_SIZE = 0xFFFFFFFF
_DESC32, _DESC64 = struct.Struct("<III"), struct.Struct("<IQQ")


def _record_offsets(
    fd: int, infos: list[zipfile.ZipInfo], start_dir: int, base: int = 0
) -> dict[str, int]:
    """Where each record's bytes begin in the file (after its local header; the zip starts at
    byte ``base`` of it, as a DCP item does inside its ``.distcp`` file), by name, the zip's layout
    checked first: one record per name; each record's local header where the central directory
    puts it, naming that record, and agreeing with it (CRC-32 and sizes, in the header or in
    the data descriptor after the bytes); the records, descriptors included, disjoint and before
    the central directory. torch's loads (``mmap`` or not) check none of this and read a record
    another one's bytes, a shifted range or a duplicate's copy without an error; so a file
    failing it is damaged (:class:`_DamagedError`, naming the record and the byte offset), not
    left to torch's load.
    """
    out: dict[str, int] = {}
    spans: list[tuple[int, int, str]] = []
    for info in infos:
        name, at = info.filename, int(info.header_offset)
        if name in out:
            raise _DamagedError(f"two zip records are named {name} (which one is the file's?)")
        head = os.pread(fd, _LOCAL.size, base + at)
        if len(head) != _LOCAL.size or head[:4] != b"PK\x03\x04":
            raise _DamagedError(f"record {name}: no zip local header at byte {at}")
        _sig, _v, flags, _method, _t, _d, crc, csize, usize, n, m = _LOCAL.unpack(head)
        raw = os.pread(fd, n, base + at + _LOCAL.size)
        local = raw.decode("utf-8" if flags & 0x800 else "cp437", errors="replace")
        if local != info.orig_filename:
            raise _DamagedError(f"record {name}: the local header at byte {at} names {local!r}")
        data = at + _LOCAL.size + n + m
        end = data + int(info.compress_size)
        want = (info.CRC, info.compress_size, info.file_size)
        if flags & 0x08:  # CRC-32 and sizes in a data descriptor after the bytes (zip64: 8-byte)
            desc = os.pread(fd, 24, base + end)
            skip = 4 if desc[:4] == _DESCRIPTOR else 0
            for form in (_DESC32, _DESC64):
                if len(desc) >= skip + form.size and form.unpack_from(desc, skip) == want:
                    end += skip + form.size
                    break
            else:
                raise _DamagedError(
                    f"record {name}: its data descriptor at byte {end} disagrees with the "
                    "central directory (CRC-32, sizes)"
                )
        elif crc != info.CRC or (_ZIP64_SIZE not in (csize, usize) and (csize, usize) != want[1:]):
            raise _DamagedError(
                f"record {name}: the local header at byte {at} disagrees with the central "
                "directory (CRC-32, sizes)"
            )
        out[name] = base + data
        spans.append((at, end, name))
    spans.sort()
    for (a, end, name), nxt in zip(spans, [*spans[1:], (start_dir, 0, "the central directory")]):
        if end > nxt[0]:
            raise _DamagedError(
                f"record {name} (bytes {a} to {end}) overlaps {nxt[2]} at byte {nxt[0]}"
            )
    return out


_CRC_PIECE = 1 << 20  # read into one buffer and hashed while in the CPU cache


def record_problems(
    path: str,
    on_bytes: Callable[[int], None] | None = None,
    window: tuple[int, int] | None = None,
) -> list[str]:
    """Every record of the ``torch.save`` zip ``path`` read whole and its CRC-32 compared with
    the one its central directory records (after the layout check of ``_record_offsets``): the
    only checksum a DeepSpeed checkpoint has, and one that torch's loads never check (a flipped
    bit in a tensor's bytes loads as a wrong value). Each problem names the file, the record and
    the byte range; ``[]`` when every record matches. A file that is not a zip (torch's legacy
    format) has no CRC to check: ``[]``. ``on_bytes`` is told each piece's size as it is read.
    ``window``: ``(offset, length)``, the zip is those bytes of ``path`` (a DCP item).

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> p = tempfile.mkdtemp() + "/x.pt"
        >>> torch.save({"w": torch.arange(3.0)}, p)
        >>> record_problems(p)
        []
        >>> raw = bytearray(Path(p).read_bytes())
        >>> raw[raw.index(torch.arange(3.0).numpy().tobytes()) + 5] ^= 1
        >>> _ = Path(p).write_bytes(raw)
        >>> print(record_problems(p)[0])  # doctest: +ELLIPSIS
        /...x.pt: record x/data/0 (bytes ... to ...): CRC-32 0x... where the zip records 0x...
    """
    import zlib

    try:
        with open(path, "rb") as f:
            base = 0 if window is None else window[0]
            if os.pread(f.fileno(), 4, base) != b"PK\x03\x04":
                return []
            try:
                z = zipfile.ZipFile(f if window is None else FileWindow(f.fileno(), *window))
            except zipfile.BadZipFile as e:
                return [f"{path}: not a readable zip ({e})"]
            with z:
                infos = z.infolist()
                try:
                    offsets = _record_offsets(f.fileno(), infos, int(z.start_dir), base)
                except _DamagedError as e:
                    return [f"{path}: {e}"]
                problems = []
                view = memoryview(bytearray(_CRC_PIECE))
                for info in infos:
                    if info.compress_type != zipfile.ZIP_STORED:
                        try:  # zipfile inflates it and checks the CRC-32 at its end
                            with z.open(info) as r:
                                while piece := r.read(_CRC_PIECE):
                                    if on_bytes is not None:
                                        on_bytes(len(piece))
                        except (zipfile.BadZipFile, OSError, EOFError) as e:
                            problems.append(f"{path}: record {info.filename}: {e}")
                        continue
                    start, left, crc = offsets[info.filename], int(info.compress_size), 0
                    at = start
                    while left:
                        got = os.preadv(f.fileno(), [view[: min(left, _CRC_PIECE)]], at)
                        if not got:
                            break
                        crc = zlib.crc32(view[:got], crc)
                        at, left = at + got, left - got
                        if on_bytes is not None:
                            on_bytes(got)
                    if left:
                        problems.append(
                            f"{path}: record {info.filename} (bytes {start} to "
                            f"{start + info.compress_size}): the file ends at byte {at}"
                        )
                    elif crc != info.CRC:
                        problems.append(
                            f"{path}: record {info.filename} (bytes {start} to {at}): CRC-32 "
                            f"{crc:#010x} where the zip records {info.CRC:#010x}"
                        )
                return problems
    except OSError as e:
        return [f"{path}: {e.strerror or e}"]


def records_problems(
    paths: Sequence[str], on_bytes: Callable[[int], None] | None = None
) -> list[str]:
    """:func:`record_problems` of every file in ``paths``, files read side by side on
    ``decode_threads()`` threads; the problems in ``paths``' order.

    Example:
        >>> import tempfile, torch
        >>> d = tempfile.mkdtemp()
        >>> for n in "ab":
        ...     torch.save({"w": torch.ones(2)}, f"{d}/{n}.pt")
        >>> records_problems([f"{d}/a.pt", f"{d}/b.pt"])
        []
    """
    from concurrent.futures import ThreadPoolExecutor

    from zckpt.format._decode import decode_threads

    threads = max(1, min(decode_threads(), len(paths)))
    if threads == 1:
        return [p for path in paths for p in record_problems(path, on_bytes)]
    with ThreadPoolExecutor(threads, thread_name_prefix="zckpt-crc") as pool:
        found = list(pool.map(lambda path: record_problems(path, on_bytes), paths))
    return [p for problems in found for p in problems]


def require_intact(paths: Sequence[str]) -> None:
    """Raise unless every zip record of every file in ``paths`` matches its CRC-32
    (:func:`records_problems`), before a conversion or an export reads them: torch's loads
    would read a flipped bit as a value.

    Raises:
        DeepSpeedFormatError: naming the first problems (file, record, byte range).

    Example:
        >>> require_intact([])
    """
    problems = records_problems(paths)
    if problems:
        from zckpt.interop._unpickle import DeepSpeedFormatError

        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise DeepSpeedFormatError(
            "damaged checkpoint files, nothing was written: " + "; ".join(problems[:3]) + more
        )


def load_refs(path: str, window: tuple[int, int] | None = None) -> Any:
    """``path`` (a ``torch.save`` zip) unpickled on the C unpickler with its tensors as
    :class:`~zckpt.interop._refs.TensorRef` and torch's other values as the inert stand-ins of
    ``_refs.py``: nothing is built in torch, nothing from the file is run, and torch is not
    imported. :data:`NOT_FAST` where the scan or the unpickler says no (see the module
    docstring); ``_refs.to_torch`` of the result is what :func:`fast_load` returns.
    ``window``: ``(offset, length)``, the zip is those bytes of ``path`` (a DCP item); its
    storages' offsets are the file's.

    Example:
        >>> import tempfile, torch
        >>> p = tempfile.mkdtemp() + "/x.pt"
        >>> torch.save({"w": torch.arange(3.0)}, p)
        >>> ref = load_refs(p)["w"]
        >>> ref.dtype, ref.shape, ref.file_range()[2]
        ('float32', (3,), 12)
    """
    fast = _globals()
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below, after the storages are located)
    except OSError:
        return NOT_FAST
    try:
        st = os.fstat(f.fileno())
    except OSError:
        f.close()
        return NOT_FAST
    stamp = file_stamp(st)
    base, size = (0, st.st_size) if window is None else window
    if base < 0 or size < 0 or base + size > st.st_size:
        f.close()
        return NOT_FAST
    try:
        inner = f if window is None else FileWindow(f.fileno(), base, size)
        with f, zipfile.ZipFile(inner) as z:
            infos = z.infolist()
            offsets = _record_offsets(f.fileno(), infos, int(z.start_dir), base)
            prefix = infos[0].filename.split("/", 1)[0] + "/" if infos else ""
            records = {i.filename[len(prefix) :]: i for i in infos}
            if not prefix or any(not i.filename.startswith(prefix) for i in infos):
                return NOT_FAST
            if "byteorder" in records and z.read(records["byteorder"]) != sys.byteorder.encode():
                return NOT_FAST
            data = z.read(records["data.pkl"])
            if not scan(data, fast):
                return NOT_FAST
            seen: dict[str, StorageRef] = {}

            def storage(pid: Any) -> Any:
                if type(pid) is not tuple or len(pid) != 5:
                    raise pickle.UnpicklingError("not a storage id")
                typename, storage_type, key, location, numel = pid
                if isinstance(typename, bytes):
                    typename = typename.decode("ascii")
                if isinstance(location, bytes):
                    location = location.decode("ascii")
                if typename != "storage" or not isinstance(location, str):
                    raise pickle.UnpicklingError("not a storage id")
                dtype = getattr(storage_type, "storage_dtype", None) or ""
                if not dtype or type(key) is not str or type(numel) is not int or numel < 0:
                    raise pickle.UnpicklingError("not a storage id")
                info = records[f"data/{key}"]
                if info.compress_type != zipfile.ZIP_STORED:
                    raise pickle.UnpicklingError("a compressed storage")
                ref = StorageRef(path, key, dtype, numel, location, offsets[info.filename], stamp)
                if ref.nbytes != info.file_size:  # torch's mmap load would not notice
                    raise _DamagedError(
                        f"storage data/{key} is {numel} x {dtype} ({ref.nbytes} bytes) but its "
                        f"record holds {info.file_size} bytes"
                    )
                if ref.offset + ref.nbytes > base + size:
                    raise pickle.UnpicklingError("a storage past the end of the file")
                if seen.setdefault(key, ref) != ref:  # one key, two readings: torch decides
                    raise pickle.UnpicklingError("a storage key with two types")
                return ref

            return _Unpickler(data, fast, storage).load()
    except _DamagedError as e:
        from zckpt.interop._unpickle import DeepSpeedFormatError

        raise DeepSpeedFormatError(f"{path}: {e}") from None
    except Exception:  # a torn or foreign zip, the C unpickler's own checks: torch's load decides
        return NOT_FAST


def fast_load(path: str) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True, mmap=True)`` with zckpt's
    DeepSpeed stand-ins allowed, on the C unpickler; :data:`NOT_FAST` where it cannot be sure
    to give the same result (see the module docstring). ``path`` is a ``torch.save`` zip: it is
    read as references (:func:`load_refs`), which torch's own rebuild functions then turn into
    tensors (``_refs.to_torch``).

    Example:
        >>> import tempfile, torch
        >>> p = tempfile.mkdtemp() + "/x.pt"
        >>> torch.save({"w": torch.arange(3.0), "n": torch.Size([3])}, p)
        >>> fast_load(p)["w"].tolist()
        [0.0, 1.0, 2.0]
        >>> torch.save({"f": print}, p)
        >>> fast_load(p) is NOT_FAST
        True
    """
    refs = load_refs(path)
    if refs is NOT_FAST:
        return NOT_FAST
    try:
        return to_torch(refs)
    except Exception:  # torch's rebuild refused what the stand-ins accepted: torch's load decides
        return NOT_FAST
