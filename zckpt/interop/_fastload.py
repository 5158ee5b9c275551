"""``torch.load(weights_only=True, mmap=True)`` of DeepSpeed's files, on the C unpickler.

torch's ``weights_only`` unpickler is pure Python: rank 0's files of a ZeRO-3 checkpoint took
0.2-0.3 s of a 0.6 s consolidation. :func:`fast_load` gives the same result from Python's C
``pickle.Unpickler``, with the same guarantee that nothing from the file is run, or returns
:data:`NOT_FAST` and the caller does what it did before (torch's own ``weights_only`` load,
with its refusals and messages).

How it stays exactly torch's result, never more permissive:

1. **A scan first** (``_pickle_scan.py``: :func:`~zckpt.interop._pickle_scan.scan`), over the
   opcodes without building anything. It accepts only the opcodes torch's ``weights_only``
   unpickler supports, and only ``GLOBAL`` names in ``FAST_GLOBALS``: torch's tensor rebuild
   functions (``_rebuild_tensor``, ``_rebuild_tensor_v2``, ``_rebuild_from_type_v2``), its
   storage types and dtypes, ``torch.Tensor``, ``torch.Size``, ``torch.device``,
   ``collections.OrderedDict`` (each the very object torch's own allow-list maps the name to)
   and zckpt's inert DeepSpeed stand-ins. It follows what kind of object each stack slot and
   memo entry holds, and accepts ``REDUCE`` only on one of those globals, ``NEWOBJ`` only on
   one of those classes (not ``Parameter``), ``BUILD`` only with a fresh ``dict`` as the state
   and only on an ``OrderedDict`` or a stand-in instance, ``APPEND(S)`` only on a list and
   ``SETITEM(S)`` only on a dict or ``OrderedDict``: where torch would refuse, or would do
   something the C unpickler does differently, the scan says no.
2. **The C unpickler then builds the objects** with ``find_class`` answering only
   ``FAST_GLOBALS`` (anything else raises), and those are inert: torch's names are answered
   by the stand-ins of ``_refs.py`` (a rebuild function returns a ``TensorRef``: which record of
   the file, dtype, storage offset, shape, stride, checked to lie inside its storage as torch's
   ``set_`` checks it), and ``persistent_load`` answers only ``('storage', type, key,
   location, numel)`` ids, with a ``StorageRef`` (the record's byte offset, read from the zip's
   own headers). This is :func:`load_refs`: no torch object is built, torch is not imported.
3. **torch's objects, when wanted** (:func:`fast_load`): ``_refs.to_torch`` calls torch's own
   rebuild functions with the recorded arguments, on slices of one private mapping of the file
   (as torch's ``mmap=True`` load makes them), and maps every other stand-in to the object
   torch's allow-list maps its name to.

Before any of it, the zip's layout is checked (``_zipcheck.py: _record_offsets``, beside the
records' CRC-32 checks): one record per name, each local header where the central directory
says and agreeing with it, records disjoint. torch's loads check none of it (a directory entry
pointing at another record's header gives that record's bytes, a duplicate name one copy or the
other), so a file failing it is a :class:`~zckpt.interop._unpickle.DeepSpeedFormatError`
naming the record and the byte offset, not left to torch. Any other error on the way (a torn
file, an odd state the C unpickler rejects) is :data:`NOT_FAST`: torch's load then runs and
reports it as before.
"""

from __future__ import annotations

import io
import os
import pickle
import sys
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

from zckpt.interop._pickle_scan import _globals, _map_name, scan
from zckpt.interop._refs import StorageRef, file_stamp, to_torch
from zckpt.interop._window import FileWindow
from zckpt.interop._zipcheck import _DamagedError, _record_offsets

__all__ = ["NOT_FAST", "fast_load", "load_refs"]

#: What :func:`fast_load` returns when it cannot give torch's result; the caller loads as before.
NOT_FAST: Any = object()


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
