"""A checkpoint written by ``torch.distributed.checkpoint`` (DCP) opened as references.

``dcp.save`` with the ``FileSystemWriter`` (torch 2.13, any number of ranks) writes a directory:
``.metadata`` (a pickle, read by ``_dcp_metadata.py`` through an allow-list) and one or more
``__<rank>_<n>.distcp`` files per rank, each the concatenation of its items. An item is a
chunk of a tensor (a DTensor's local shard, a whole plain tensor) or a non-tensor value, and
each is one ``torch.save`` zip at the byte range the metadata records. They are read here with
``_fastload.py``'s zip reader on that byte range (``load_refs(window=...)``): the zip's layout
checked, its pickle scanned and unpickled on the C unpickler with inert stand-ins, a tensor
becoming a :class:`~zckpt.interop._refs.TensorRef` (which bytes of the ``.distcp`` file),
nothing from the file run and torch not needed.

:func:`open_dcp` checks the directory before any item is read: every file the metadata names is
a regular file inside the directory, and every item's byte range lies inside its file. Reading
an item checks that it is what the metadata says (a tensor of the chunk's dtype and sizes).

Example:
    >>> import tempfile, torch
    >>> from torch.distributed.checkpoint.format_utils import torch_save_to_dcp
    >>> d = tempfile.mkdtemp()
    >>> torch.save({"w": torch.arange(6.0).reshape(2, 3), "step": 7}, d + "/sd.pt")
    >>> torch_save_to_dcp(d + "/sd.pt", d + "/ck")
    >>> ck = open_dcp(d + "/ck")
    >>> ref = ck.tensor_item("w", ck.metadata.tensors["w"].chunks[0])
    >>> ref.shape, ref.dtype, ck.value("step")
    ((2, 3), 'float32', 7)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from zckpt.interop._dcp_metadata import (
    METADATA,
    DcpChunk,
    DcpFormatError,
    DcpItem,
    DcpMetadata,
    DcpUnsafePickleError,
    read_metadata,
)
from zckpt.interop._detect import find_dcp
from zckpt.interop._refs import TensorRef

__all__ = ["DcpCheckpoint", "DcpMissingFileError", "open_dcp"]

_RANK_FILE = re.compile(r"__(\d+)_\d+\.distcp")


class DcpMissingFileError(DcpFormatError, FileNotFoundError):
    """A file the DCP metadata names is not in the checkpoint directory.

    Example:
        >>> issubclass(DcpMissingFileError, FileNotFoundError)
        True
    """


@dataclass(frozen=True)
class DcpCheckpoint:
    """An opened DCP checkpoint: its directory, metadata, and its files' sizes and identities
    (``(st_dev, st_ino, size, mtime)`` when opened, which a copy by path checks later).

    Example:
        >>> import tempfile, torch
        >>> from torch.distributed.checkpoint.format_utils import torch_save_to_dcp
        >>> d = tempfile.mkdtemp()
        >>> torch.save({"w": torch.ones(3)}, d + "/sd.pt")
        >>> torch_save_to_dcp(d + "/sd.pt", d + "/ck")
        >>> ck = open_dcp(d + "/ck")
        >>> ck.file_names, ck.ranks
        (('__0_0.distcp',), 1)
    """

    path: str
    metadata: DcpMetadata
    sizes: dict[str, int]
    stamps: dict[str, tuple[int, int, int, int]]

    @property
    def file_names(self) -> tuple[str, ...]:
        """The ``.distcp`` files the metadata names, sorted."""
        return tuple(sorted(self.sizes))

    @property
    def files(self) -> tuple[str, ...]:
        """Their paths, the metadata file first."""
        return (os.path.join(self.path, METADATA), *(self.file(n) for n in self.file_names))

    @property
    def ranks(self) -> int | None:
        """How many ranks saved it, from the files' names (``__<rank>_<n>.distcp``; a rank
        with nothing to write has no file, so this is a lower bound), or None when the files
        are named otherwise."""
        found = [_RANK_FILE.fullmatch(n) for n in self.file_names]
        if not found or any(m is None for m in found):
            return None
        return 1 + max(int(m.group(1)) for m in found if m is not None)

    def file(self, name: str) -> str:
        """The path of file ``name`` of the checkpoint."""
        return os.path.join(self.path, name)

    def _item(self, name: str, offsets: tuple[int, ...] | None) -> DcpItem:
        return self.metadata.items[(name, offsets)]

    def where(self, name: str, chunk: DcpChunk | None = None) -> str:
        """An item's description for errors: entry, chunk, file and byte range."""
        item = self._item(name, None if chunk is None else chunk.offsets)
        what = name if chunk is None else f"{name} chunk at {list(chunk.offsets)}"
        return f"{self.file(item.relative_path)}: {what} (bytes {item.offset} to {item.end})"

    def _load(self, name: str, chunk: DcpChunk | None) -> Any:
        from zckpt.interop._fastload import NOT_FAST, load_refs
        from zckpt.interop._unpickle import DeepSpeedFormatError

        item = self._item(name, None if chunk is None else chunk.offsets)
        path = self.file(item.relative_path)
        try:
            got = load_refs(path, (item.offset, item.length))
        except DeepSpeedFormatError as e:  # the zip's layout check: the file and record named
            raise DcpFormatError(f"{self.where(name, chunk)}: {e}") from None
        if got is NOT_FAST:
            raise _refusal(self.where(name, chunk), path, item)
        return got

    def tensor_item(self, name: str, chunk: DcpChunk) -> TensorRef:
        """The saved chunk ``chunk`` of tensor ``name``, as a reference to its bytes, checked to
        be a tensor of the metadata's dtype and of the chunk's sizes.

        Raises:
            DcpFormatError: the item is not such a tensor, or not a ``torch.save`` zip zckpt
                reads (file, entry, chunk and byte range named).
        """
        got = self._load(name, chunk)
        want = self.metadata.tensors[name].dtype
        if type(got) is not TensorRef:
            raise DcpFormatError(
                f"{self.where(name, chunk)}: holds a {type(got).__name__}, not a tensor"
            )
        if got.dtype != want or got.shape != chunk.sizes:
            raise DcpFormatError(
                f"{self.where(name, chunk)}: holds a {got.dtype} tensor of {list(got.shape)}, "
                f"where the metadata says {want} of {list(chunk.sizes)}"
            )
        return got

    def value(self, name: str) -> Any:
        """The non-tensor entry ``name`` as torch's ``weights_only`` load builds it (plain
        values as they are; a tensor or dtype inside it is built with torch).

        Raises:
            DcpUnsafePickleError: it references a global outside the allow-list (named).
        """
        got = self._load(name, None)
        if _plain(got):
            return got
        from zckpt.interop._refs import to_torch

        return to_torch(got)


def _plain(x: Any) -> bool:
    if type(x) in (int, float, str, bytes, bool, type(None)):
        return True
    if type(x) in (list, tuple):
        return all(_plain(v) for v in x)
    if type(x) is dict:
        return all(_plain(k) and _plain(v) for k, v in x.items())
    return False


def _refusal(where: str, path: str, item: DcpItem) -> DcpFormatError:
    """Why an item is not read: the globals its pickle names beyond the allow-list, if any
    (found by a scan of its opcodes: nothing is built), else that it is no readable zip."""
    import io
    import pickletools
    import zipfile

    from zckpt.interop._pickle_scan import _globals, _map_name
    from zckpt.interop._window import FileWindow

    names: list[str] = []
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with zipfile.ZipFile(FileWindow(fd, item.offset, item.length)) as z:
                pkl = next(n for n in z.namelist() if n.endswith("/data.pkl"))
                data = z.read(pkl)
        finally:
            os.close(fd)
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            if op.name == "GLOBAL":
                names.append(".".join(_map_name(*str(arg).split(" ", 1))))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(".".join(_map_name(strings[-2], strings[-1])))
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:
        names = []
    refused = sorted({n for n in names if n not in _globals()})
    if refused:
        return DcpUnsafePickleError(
            f"{where}: refused to unpickle {', '.join(refused)} (not in zckpt's allow-list; "
            "nothing from the file was run)"
        )
    return DcpFormatError(
        f"{where}: not a torch.save zip zckpt reads without running its pickle (torn, "
        "compressed, or holding objects torch's weights_only load would not build)"
    )


def open_dcp(path: str | os.PathLike[str]) -> DcpCheckpoint:
    """Open the DCP checkpoint directory ``path``: its metadata read and checked, every file it
    names found (a regular file inside the directory) and every item's byte range checked to
    lie inside its file. No item is read.

    Raises:
        DcpUnsafePickleError: ``.metadata`` references a global outside the allow-list.
        DcpMissingFileError: no ``.metadata``, or a ``.distcp`` file it names is missing.
        DcpFormatError: anything else inconsistent (file, entry, chunk and bytes named).

    Example:
        >>> import tempfile
        >>> open_dcp(tempfile.mkdtemp())
        Traceback (most recent call last):
        ...
        zckpt.interop._dcp.DcpMissingFileError: /tmp/...: not a DCP checkpoint (no .metadata)
    """
    from zckpt.interop._refs import file_stamp
    from zckpt.interop._staged import local_only
    from zckpt.store._storage import StorageError, open_regular

    root = local_only(path, "open_dcp")
    if find_dcp(root) is None:
        raise DcpMissingFileError(f"{root}: not a DCP checkpoint (no {METADATA})")
    md = read_metadata(os.path.join(root, METADATA))
    sizes: dict[str, int] = {}
    stamps: dict[str, tuple[int, int, int, int]] = {}
    for name in md.files():
        p = os.path.join(root, name)
        users = sorted({k[0] for k, i in md.items.items() if i.relative_path == name})
        try:
            fd = open_regular(p, follow=True)
        except StorageError as e:
            shown = ", ".join(users[:3]) + (f" and {len(users) - 3} more" if len(users) > 3 else "")
            cls = DcpMissingFileError if isinstance(e.__cause__, FileNotFoundError) else None
            raise (cls or DcpFormatError)(
                f"{e.strerror or e} (the metadata stores {shown} there)"
            ) from None
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        sizes[name], stamps[name] = st.st_size, file_stamp(st)
    for (name, offsets), item in md.items.items():
        size = sizes[item.relative_path]
        if item.end > size:
            what = name if offsets is None else f"{name} chunk at {list(offsets)}"
            raise DcpFormatError(
                f"{os.path.join(root, item.relative_path)}: {what}: bytes {item.offset} to "
                f"{item.end} lie past the end of the file ({size} bytes: truncated?)"
            )
    return DcpCheckpoint(root, md, sizes, stamps)
