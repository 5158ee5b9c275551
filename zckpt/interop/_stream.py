"""Writing tensors' bytes to a file without building them in memory first.

An export (``_safetensors.py``) needs each output tensor's bytes once, in a file. A DeepSpeed
fp32 weight is a run of ranges of the ranks' flat fp32 partitions, which are themselves byte
ranges of the checkpoint's optimizer files (mapped by ``torch.load(weights_only=True,
mmap=True)`` through the allow-list of ``_unpickle.py``): its bytes can go from those files to
the output file inside the kernel (``copy_file_range``), with no fresh
output memory, no page faults on the mapping and nothing left resident. :class:`StreamedTensor`
is a :class:`zckpt.LazyTensor` that also knows those ranges; :func:`write_value` writes any
value (tensor, lazy or streamed) at a file descriptor's position with bounded memory:

- a streamed value: each range that lies in a checkpoint file is copied with
  ``copy_file_range`` (where the kernel or filesystem refuses it, from the mapping, window by
  window, each window's pages released, as ``PagedSource.read_into`` does); ranges in memory are
  written from memory;
- a :class:`FileRanges` (``_deepspeed.py: export_values``, a checkpoint read as references):
  its byte ranges of the checkpoint files, with ``copy_file_range`` or else ``pread`` and
  ``write``; torch is not needed, nor imported. Each file must still be the one that was read
  (device, inode, size, mtime: checked before and after each range is copied), else the copy
  fails naming it: a tag saved again meanwhile would otherwise mix two saves in the output;
- any other value is materialised (one tensor) and written from its memory, window by window.

Memory beyond the tensor being written is one window at most; a streamed value needs none.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from zckpt.format._dtypes import dtype_name
from zckpt.interop._refs import file_stamp
from zckpt.store._fp32 import LazyTensor

if TYPE_CHECKING:
    import torch

    from zckpt.assemble import Source

__all__ = ["FileRanges", "Segment", "StreamedTensor", "write_value"]

_WINDOW = 16 << 20
#: errnos with which copy_file_range says "not here" (old kernel, other filesystem, seccomp).
_NO_COPY_RANGE = {errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM}
_state = {"copy_range": hasattr(os, "copy_file_range")}

#: ``(source, start, stop)``: elements ``[start, stop)`` of a saved fragment (relative to it).
Segment = tuple["Source", int, int]


@dataclass(frozen=True, eq=False)
class FileRanges:
    """A tensor of ``shape`` and ``dtype`` (a torch dtype name) whose bytes are, in order, the
    ``(path, offset, bytes)`` ranges of files: an export copies them without torch;
    ``contiguous()`` is ``load()``, the tensor (built with torch).

    Example:
        >>> import tempfile
        >>> f = tempfile.NamedTemporaryFile()
        >>> _ = f.write(bytes(range(16))); f.flush()
        >>> v = FileRanges((2,), "int16", ((f.name, 4, 2), (f.name, 10, 2)), lambda: None)
        >>> with tempfile.TemporaryFile() as out:
        ...     write_value(out.fileno(), v, "int16", lambda v, d: None)
        ...     _ = out.seek(0)
        ...     list(out.read())
        4
        [4, 5, 10, 11]
    """

    shape: tuple[int, ...]
    dtype: str
    ranges: tuple[tuple[str, int, int], ...]
    load: Callable[[], Any]
    #: ``(path, stamp)``: a file's identity when its ranges were found (``StorageRef.stamp``);
    #: a copy from a file that no longer has it (replaced, rewritten) fails, naming it.
    stamps: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def contiguous(self) -> Any:
        """The tensor, read and built with torch."""
        return self.load()


@dataclass(frozen=True, eq=False)
class StreamedTensor(LazyTensor):
    """A :class:`zckpt.LazyTensor` whose bytes are, in order, ``segments()``'s ranges of saved
    fragments of the same dtype: an export writes them to its file without materialising it.

    Example:
        >>> import torch
        >>> from zckpt.spec import Fragment
        >>> from zckpt.assemble import TensorSource
        >>> data = torch.arange(4.0)
        >>> src = TensorSource(Fragment(0, 0, 4), data)
        >>> t = StreamedTensor((2,), torch.float32, lambda: data[1:3].clone(),
        ...                    lambda: [(src, 1, 3)])
        >>> t.contiguous().tolist(), t.shape
        ([1.0, 2.0], torch.Size([2]))
    """

    segments: Callable[[], Sequence[Segment]]


def _write_all(fd: int, view: memoryview) -> None:
    while view.nbytes:
        n = os.write(fd, view)
        view = view[n:]


def _bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    import torch

    flat = t.reshape(-1)
    if not flat.numel():
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data


def write_tensor(fd: int, t: torch.Tensor, release: bool = False) -> int:
    """Write a contiguous CPU tensor's bytes at ``fd``'s position, 16 MiB at a time; with
    ``release``, hand each written window's pages of a file mapping back (see ``_pages``).
    Returns the bytes written.

    Example:
        >>> import tempfile, torch
        >>> with tempfile.TemporaryFile() as f:
        ...     write_tensor(f.fileno(), torch.tensor([1, 2], dtype=torch.int16))
        ...     _ = f.seek(0)
        ...     f.read()
        4
        b'\\x01\\x00\\x02\\x00'
    """
    from zckpt.interop._pages import release_pages

    view = _bytes(t)
    lo = t.data_ptr()
    for a in range(0, view.nbytes, _WINDOW):
        b = min(view.nbytes, a + _WINDOW)
        _write_all(fd, view[a:b])
        if release:
            release_pages(lo + a, lo + b)
    return view.nbytes


def _stamp(sfd: int) -> tuple[int, ...]:
    return file_stamp(os.fstat(sfd))


def _check_stamp(sfd: int, src: str, stamp: tuple[int, ...] | None, offset: int) -> None:
    """Refuse to copy from ``src`` (open as ``sfd``) when it is no longer the file that was
    read (``stamp``: device, inode, size, mtime): replaced or rewritten since (DeepSpeed saving
    the tag again), its bytes would be another save's, mixed silently into the output."""
    if stamp is None:
        return
    now = _stamp(sfd)[: len(stamp)]  # a mapping's stamp is (device, inode) only
    if now != stamp:
        from zckpt.interop._unpickle import DeepSpeedFormatError

        what = "replaced" if now[:2] != stamp[:2] else "rewritten"
        sizes = f"size {stamp[2]} -> {now[2]}, " if len(stamp) > 2 else ""
        raise DeepSpeedFormatError(
            f"{src}: {what} since the checkpoint was read ({sizes}copying from byte {offset}); "
            "its bytes would be another save's: export again once the checkpoint is complete"
        )


def _copy_range(
    src: str,
    offset: int,
    n: int,
    fd: int,
    stamp: tuple[int, ...] | None = None,
    replaced_ok: bool = False,
) -> bool:
    """Copy ``n`` bytes of ``src`` from ``offset`` to ``fd``'s position in the kernel; False
    (nothing written) where this kernel or filesystem cannot (the caller writes them itself).
    With ``stamp``, the file must still be the one read, before and after (``_check_stamp``);
    with ``replaced_ok``, another file there is False too (the caller has the bytes mapped)."""
    if not _state["copy_range"]:
        return False
    sfd = os.open(src, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        if replaced_ok and stamp is not None and _stamp(sfd)[: len(stamp)] != stamp:
            return False
        _check_stamp(sfd, src, stamp, offset)
        done = 0
        while done < n:
            try:
                got = os.copy_file_range(sfd, fd, n - done, offset + done)
            except OSError as e:
                if done == 0 and e.errno in _NO_COPY_RANGE:
                    _state["copy_range"] = e.errno not in (errno.ENOSYS, errno.EPERM)
                    return False
                raise
            if got == 0:
                raise OSError(
                    errno.EIO,
                    f"{src}: ends before byte {offset + n} (read at offset "
                    f"{offset + done}); was it truncated while being exported?",
                )
            done += got
        _check_stamp(sfd, src, stamp, offset)
        return True
    finally:
        os.close(sfd)


def _pread_range(
    src: str, offset: int, n: int, fd: int, stamp: tuple[int, ...] | None = None
) -> int:
    """Copy ``n`` bytes of ``src`` from ``offset`` to ``fd``'s position, 16 MiB at a time
    (``stamp`` as for :func:`_copy_range`)."""
    sfd = os.open(src, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        _check_stamp(sfd, src, stamp, offset)
        done = 0
        while done < n:
            chunk = os.pread(sfd, min(_WINDOW, n - done), offset + done)
            if not chunk:
                raise OSError(
                    errno.EIO,
                    f"{src}: ends before byte {offset + n} (read at offset {offset + done}); "
                    "was it truncated while being exported?",
                )
            _write_all(fd, memoryview(chunk))
            done += len(chunk)
        _check_stamp(sfd, src, stamp, offset)
        return done
    finally:
        os.close(sfd)


def write_value(fd: int, value: Any, dtype: Any, materialise: Callable[..., Any]) -> int:
    """Write ``value``'s bytes (as ``dtype``, a torch dtype or its name) at ``fd``'s position;
    returns the bytes written.

    A :class:`FileRanges` of ``dtype`` goes range by range, file to file (no torch); a
    :class:`StreamedTensor` of ``dtype`` segment by segment (checkpoint files to the output in
    the kernel where possible); anything else is ``materialise(value, dtype)`` (a contiguous
    CPU tensor) written from memory.

    Example:
        >>> import tempfile, torch
        >>> with tempfile.TemporaryFile() as f:
        ...     write_value(f.fileno(), torch.ones(2), torch.float32, lambda v, d: v.to(d))
        8
    """
    if isinstance(value, FileRanges) and value.dtype == dtype_name(dtype):
        done = 0
        stamps = dict(value.stamps)
        for path, offset, n in value.ranges:
            st = stamps.get(path)
            copied = _copy_range(path, offset, n, fd, st)
            done += n if copied else _pread_range(path, offset, n, fd, st)
        return done
    if not isinstance(value, StreamedTensor) or dtype_name(value.dtype) != dtype_name(dtype):
        return write_tensor(fd, materialise(value, dtype))
    from zckpt.interop._pages import PagedSource

    total = 0
    for src, a, b in value.segments():
        if isinstance(src, PagedSource):
            where = src.file_range(a, b)
            if where is not None and _copy_range(*where, fd, src.file_stamp(a, b), True):
                total += where[2]
                continue
            # Not copied in the kernel (nor by path from a file renamed over the mapped one):
            # from the mapping (pages released only where it is one).
            total += write_tensor(fd, src.data[a:b], release=where is not None)
        else:
            part = src.read(a, b)
            if dtype_name(part.dtype) != dtype_name(dtype):
                raise TypeError(f"a {part.dtype} segment in a {dtype} streamed tensor")
            total += write_tensor(fd, part.contiguous())
    return total
