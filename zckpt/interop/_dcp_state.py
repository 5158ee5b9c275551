"""A DCP checkpoint's state dict at any source world size, by zckpt's one assembly mechanism.

Each saved chunk (a box of its tensor: offsets and sizes along every dimension) is cut into
the runs of elements that are contiguous in the row-major flat tensor (:func:`chunk_runs`: one
run for a ``Shard(0)`` chunk or a whole tensor, one per outer index for a ``Shard(1)`` one), and
each run is a :class:`ChunkRun`: a ``Fragment`` of the tensor's leaf whose elements are a byte
range of the chunk's ``torch.save`` record in its ``.distcp`` file. ``assemble.index_sources``
indexes them (an overlap is an error) and ``SourceIndex.missing`` finds gaps, both reported
with the chunks' boxes (:func:`dcp_layout`); ``assemble.fp32_tensors`` then builds the tensors,
copying each run out of the file mapping window by window (``_pages.PagedSource``). A
safetensors export (:func:`export_values`) copies the same byte ranges file to file
(``_stream.FileRanges``) without building anything.

:func:`dcp_state_dict` returns what ``torch.distributed.checkpoint.format_utils
.dcp_to_torch_save`` saves: the nested state dict (DCP's ``planner_data`` key paths), tensors
in their saved dtypes, non-tensor values as a ``weights_only`` load builds them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from zckpt.errors import CoverageError
from zckpt.interop._dcp import DcpCheckpoint, open_dcp
from zckpt.interop._dcp_metadata import DcpChunk, DcpFormatError, DcpMetadata
from zckpt.interop._refs import TensorRef
from zckpt.spec import Box, Fragment, box_runs
from zckpt.tree import DICT, TENSOR, Skeleton, TensorMeta

if TYPE_CHECKING:
    import torch

    from zckpt.assemble import SourceIndex

__all__ = [
    "ChunkRun",
    "DcpLayout",
    "checkpoint_state",
    "chunk_runs",
    "dcp_layout",
    "dcp_state_dict",
    "export_values",
    "nest",
]


def chunk_runs(shape: Sequence[int], chunk: DcpChunk) -> list[tuple[int, int, int]]:
    """``(flat start in the tensor, flat start in the chunk, elements)`` of each run of the
    chunk's box that is contiguous in the row-major tensor, in order.

    Example:
        >>> chunk_runs((4, 6), DcpChunk((2, 0), (2, 6)))  # Shard(0): one run
        [(12, 0, 12)]
        >>> chunk_runs((4, 6), DcpChunk((0, 3), (2, 3)))  # Shard(1): one per row
        [(3, 0, 3), (9, 3, 3)]
        >>> chunk_runs((), DcpChunk((), ())), chunk_runs((0, 3), DcpChunk((0, 0), (0, 3)))
        ([(0, 0, 1)], [])
    """
    return box_runs(shape, Box(tuple(chunk.offsets), tuple(chunk.sizes)))


#: Runs of at least this many bytes are copied window by window, their pages released as they go.
_LONG_RUN = 1 << 20


class _Reader:
    """torch tensors of one checkpoint's chunk references, built once each from one private
    mapping per file (``_refs.TorchBuilder``), and the mappings found for page release."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # assembly reads tensors from several threads
        self._builder: Any = None
        self._flat: dict[int, Any] = {}
        self._mappings: dict[str, tuple[Any, ...]] = {}
        self._done: dict[int, int] = {}  # elements of a chunk copied since its last release

    def flat(self, ref: TensorRef) -> torch.Tensor:
        with self._lock:
            got = self._flat.get(id(ref))  # (ref, tensor): the ref kept alive, its id unused
            if got is None:
                from zckpt.interop._refs import TorchBuilder

                if self._builder is None:
                    self._builder = TorchBuilder()
                got = (ref, self._builder.tensor(ref).reshape(-1))  # copied if not contiguous
                self._flat[id(ref)] = got
            t: torch.Tensor = got[1]
            return t

    def mappings(self, path: str) -> tuple[Any, ...]:
        with self._lock:
            if path not in self._mappings:
                from zckpt.interop._pages import file_mappings

                self._mappings[path] = file_mappings([path])
            return self._mappings[path]

    def copied(self, ref: TensorRef, n: int) -> None:
        """``n`` more elements of chunk ``ref`` were copied out in short runs: once all of them
        were, hand its file pages back (short runs hold no whole page of their own, so they
        are released chunk by chunk; a page touched again is read again from the file)."""
        from zckpt.interop._pages import _mapping_of, release_pages

        with self._lock:
            done = self._done.get(id(ref), 0) + n
            self._done[id(ref)] = 0 if done >= ref.numel() else done
        if done < ref.numel():
            return
        t = self.flat(ref)
        lo = t.data_ptr()
        hi = lo + t.numel() * t.element_size()
        if _mapping_of(self.mappings(ref.storage.path), lo, hi) is not None:
            release_pages(lo, hi)  # only memory that maps the checkpoint's file


@dataclass(frozen=True, eq=False)
class ChunkRun:
    """A run of a saved chunk (see :func:`chunk_runs`) as an ``assemble`` source: elements
    ``[local, local + fragment.numel)`` of the chunk ``ref`` (a reference to its bytes).

    Example:
        >>> from zckpt.interop._refs import StorageRef
        >>> ref = TensorRef(StorageRef("/f", "0", "float32", 6, "cpu", 64), 0, (2, 3), (3, 1))
        >>> run = ChunkRun(Fragment(0, 9, 12), "w", DcpChunk((1, 0), (2, 3)), 3, ref)
        >>> run.file_range(0, 3)
        ('/f', 76, 12)
    """

    fragment: Fragment
    name: str
    chunk: DcpChunk
    local: int
    ref: TensorRef
    reader: _Reader = field(default_factory=_Reader, repr=False)

    def file_range(self, start: int, stop: int) -> tuple[str, int, int] | None:
        """``(path, byte offset, bytes)`` of elements ``[start, stop)`` of the run in its
        ``.distcp`` file, or None when the chunk was saved non-contiguous."""
        return self.ref.file_range(self.local + start, self.local + stop)

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of the run, a view of the file mapping."""
        return self.reader.flat(self.ref)[self.local + start : self.local + stop]

    def read_into(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Copy elements ``[start, stop)`` into ``out``, handing back the file pages copied:
        a long run window by window (``PagedSource``), short ones (a ``Shard(1)`` chunk's
        rows) with one copy each and their chunk's pages once all its runs are copied."""
        data = self.read(start, stop)
        if data.numel() * data.element_size() >= _LONG_RUN:
            from zckpt.interop._pages import PagedSource

            mappings = self.reader.mappings(self.ref.storage.path)
            return PagedSource(self.fragment, data, mappings).read_into(0, stop - start, out)
        out.copy_(data)
        self.reader.copied(self.ref, stop - start)
        return out


class DcpLayout(NamedTuple):
    """A DCP checkpoint's tensors as zckpt sees them: a flat skeleton (one leaf per tensor, named
    by its DCP name, in the metadata's order), the chunk runs as sources, and their index.

    Example:
        >>> DcpLayout._fields
        ('skeleton', 'runs', 'saved')
    """

    skeleton: Skeleton
    runs: list[ChunkRun]
    saved: SourceIndex


def _box(c: DcpChunk) -> str:
    return f"chunk at {list(c.offsets)} of {list(c.sizes)}"


def _overlapping_chunks(md: DcpMetadata, name: str) -> str:
    chunks = md.tensors[name].chunks
    for i, a in enumerate(chunks):
        for b in chunks[i + 1 :]:
            if (
                a.numel
                and b.numel
                and all(
                    oa < ob + sb and ob < oa + sa
                    for oa, sa, ob, sb in zip(a.offsets, a.sizes, b.offsets, b.sizes)
                )
            ):
                return f"{_box(a)} and {_box(b)} overlap"
    return "two chunks overlap"


def _unravel(i: int, shape: tuple[int, ...]) -> list[int]:
    out = []
    for n in reversed(shape):
        i, r = divmod(i, n)
        out.append(r)
    return out[::-1]


def dcp_layout(ck: DcpCheckpoint) -> DcpLayout:
    """Every tensor's chunk runs, read as references and checked: each chunk's item is a tensor
    of its dtype and sizes, no two chunks overlap, and every element of every tensor is in one.

    Raises:
        DcpFormatError: naming the file, tensor, chunk box (or the first missing index).

    Example:
        >>> import tempfile, torch
        >>> from torch.distributed.checkpoint.format_utils import torch_save_to_dcp
        >>> d = tempfile.mkdtemp()
        >>> torch.save({"w": torch.ones(2, 3)}, d + "/sd.pt")
        >>> torch_save_to_dcp(d + "/sd.pt", d + "/ck")
        >>> lay = dcp_layout(open_dcp(d + "/ck"))
        >>> lay.skeleton.paths, [r.fragment for r in lay.runs]
        ((('w',),), [Fragment(leaf=0, start=0, stop=6)])
    """
    from zckpt.assemble import index_sources

    md = ck.metadata
    names = list(md.tensors)
    metas = [TensorMeta(md.tensors[n].dtype, md.tensors[n].shape) for n in names]
    node = (DICT, tuple((n, (TENSOR, i)) for i, n in enumerate(names)))
    skel = Skeleton(node, tuple(metas), tuple((n,) for n in names))
    reader = _Reader()
    runs: list[ChunkRun] = []
    for leaf, name in enumerate(names):
        t = md.tensors[name]
        for c in t.chunks:
            ref = ck.tensor_item(name, c)
            for g, local, n in chunk_runs(t.shape, c):
                runs.append(ChunkRun(Fragment(leaf, g, g + n), name, c, local, ref, reader))
    try:
        index = index_sources(skel, runs)
    except CoverageError as e:
        name = str(e).split(":", 1)[0]
        detail = _overlapping_chunks(md, name) if name in md.tensors else str(e)
        raise DcpFormatError(f"{ck.path}: {name}: {detail} ({e})") from None
    for leaf, name in enumerate(names):
        t = md.tensors[name]
        gaps = index.missing(Fragment(leaf, 0, t.numel))
        if gaps:
            a, b = gaps[0]
            more = f" and {len(gaps) - 1} more ranges" if len(gaps) > 1 else ""
            raise DcpFormatError(
                f"{ck.path}: {name}: elements [{a}, {b}) of {t.numel} (from index "
                f"{_unravel(a, t.shape)} of {list(t.shape)}){more} are in no saved chunk"
            )
    return DcpLayout(skel, runs, index)


def nest(md: DcpMetadata, flat: dict[str, Any]) -> dict[str, Any]:
    """The nested state dict of ``flat`` (values by DCP name): each placed at its key path, as
    DCP's ``set_element`` does (a path's int keys make lists), in the metadata's order.

    Example:
        >>> md = DcpMetadata({}, (), {}, {"a.b": ("a", "b"), "a.l.1": ("a", "l", 1)}, None,
        ...                  ("a.b", "a.l.1"))
        >>> nest(md, {"a.b": 1, "a.l.1": 2})
        {'a': {'b': 1, 'l': [None, 2]}}
    """
    root: dict[str, Any] = {}
    for name in md.order:
        if name not in flat:
            continue
        path = md.path_of(name)
        cur: Any = root
        for key, nxt in zip(path, path[1:]):
            new: Any = {} if type(nxt) is str else []
            if isinstance(cur, dict):
                cur = cur.setdefault(key, new)
            else:
                if type(key) is not int:
                    raise DcpFormatError(f"{name}: key path {path!r} names a list by {key!r}")
                while len(cur) <= key:
                    cur.append(None)
                if cur[key] is None:
                    cur[key] = new
                cur = cur[key]
        last = path[-1]
        if isinstance(cur, list):
            if type(last) is not int:
                raise DcpFormatError(f"{name}: key path {path!r} names a list by {last!r}")
            while len(cur) <= last:
                cur.append(None)
        elif type(last) is not str:
            raise DcpFormatError(f"{name}: key path {path!r} names a dict by {last!r}")
        cur[last] = flat[name]
    return root


def dcp_tensors(
    ck: DcpCheckpoint,
    lazy_mode: bool,
    keys: dict[str, str] | None = None,
    *,
    upcast: bool = False,
) -> dict[str, Any]:
    """Tensors of an open DCP checkpoint, assembled from their runs: every one by its DCP name,
    or (``keys``: DCP name -> output key) the ones named, under their output keys. ``upcast``:
    floating tensors narrower than fp32 (fp16, bf16, fp8) are built as fp32, upcast as they
    are copied (no narrow copy first); other dtypes, fp64 included, are kept.
    ``lazy_mode``: :class:`zckpt.LazyTensor` values.

    Example:
        >>> dcp_tensors.__name__
        'dcp_tensors'
    """
    from zckpt.assemble import Fp32Entry, assemble_fp32, fp32_tensors
    from zckpt.format._decode import decode_threads
    from zckpt.format._dtypes import ITEMSIZE_OF_NAME, is_floating, torch_dtype
    from zckpt.store._fp32 import LazyTensor

    lay = dcp_layout(ck)

    def dtype(i: int) -> Any:
        name = lay.skeleton.tensors[i].dtype_name
        narrow = is_floating(name) and ITEMSIZE_OF_NAME.get(name, 4) < 4
        return torch_dtype("float32" if upcast and narrow else name)

    entries = [
        Fp32Entry(n if keys is None else keys[n], i, dtype(i), None)
        for i, n in enumerate(ck.metadata.tensors)
        if keys is None or n in keys
    ]
    if not lazy_mode:
        return fp32_tensors(lay.saved, entries, decode_threads())
    out: dict[str, Any] = {}
    for e in entries:

        def load(e: Fp32Entry = e) -> Any:
            return dict(assemble_fp32(lay.saved, [e]))[e.name]

        out[e.name] = LazyTensor(lay.skeleton.tensors[e.source].shape, e.dtype, load)
    return out


def dcp_state_dict(path: str | os.PathLike[str], *, lazy_mode: bool = False) -> dict[str, Any]:
    """The whole state dict of the DCP checkpoint directory ``path``, at any source world size:
    what ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` would save, bit for
    bit (nested by DCP's key paths, tensors in their saved dtypes, non-tensor values as torch's
    ``weights_only`` load builds them), read without running any of its pickles' code.

    Args:
        path: the directory ``dcp.save`` wrote (``.metadata`` and ``.distcp`` files); at a
            URL, copied to a private local directory first (``interop/_staged.py``).
        lazy_mode: tensors as :class:`zckpt.LazyTensor`, assembled on ``.contiguous()``.

    Raises:
        DcpUnsafePickleError: a pickle references a global outside the allow-list.
        DcpFormatError: files missing or inconsistent, chunks overlapping or leaving a gap
            (file, tensor, chunk and byte range named).

    Example:
        >>> import tempfile, torch
        >>> from torch.distributed.checkpoint.format_utils import torch_save_to_dcp
        >>> d = tempfile.mkdtemp()
        >>> w = torch.randn(3, 4)
        >>> torch.save({"model": {"w": w}, "step": 5}, d + "/sd.pt")
        >>> torch_save_to_dcp(d + "/sd.pt", d + "/ck")
        >>> sd = dcp_state_dict(d + "/ck")
        >>> torch.equal(sd["model"]["w"], w), sd["step"]
        (True, 5)
    """
    from zckpt.interop._staged import is_remote, read_foreign

    if is_remote(path):  # copied to a local directory, read there
        return read_foreign(path, None, lambda d: dcp_state_dict(d, lazy_mode=lazy_mode), lazy_mode)
    return checkpoint_state(open_dcp(path), lazy_mode=lazy_mode)


def checkpoint_state(ck: DcpCheckpoint, *, lazy_mode: bool = False) -> dict[str, Any]:
    """:func:`dcp_state_dict` of a checkpoint already opened.

    Example:
        >>> checkpoint_state.__name__
        'checkpoint_state'
    """
    flat = dcp_tensors(ck, lazy_mode)
    for name in ck.metadata.values:
        flat[name] = ck.value(name)
    return nest(ck.metadata, flat)


def export_values(
    path: str | os.PathLike[str],
    *,
    check_records: bool = False,
    keys: Callable[[DcpMetadata], tuple[dict[str, str], list[str]]] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The tensors of a DCP checkpoint for an export (``zckpt consolidate``), by DCP name, and
    the names of the non-tensor values left out. ``keys``: given the metadata, which tensors
    (DCP name -> output key) and which values are in the export's scope (default: all, by
    DCP name; ``zckpt consolidate`` passes :func:`~zckpt.interop._dcp_fp32.module_scope`).

    A tensor whose chunks were saved contiguous is a :class:`~zckpt.interop._stream.FileRanges`
    (its runs' byte ranges of the ``.distcp`` files, in the tensor's order: an export copies
    them file to file; adjacent ranges merged); any other a :class:`zckpt.LazyTensor`.
    ``check_records``: first read every item against its zip CRC-32 (a flipped bit is then an
    error, not a wrong value in the export).

    Example:
        >>> import tempfile, torch
        >>> from torch.distributed.checkpoint.format_utils import torch_save_to_dcp
        >>> d = tempfile.mkdtemp()
        >>> torch.save({"w": torch.ones(2, 3), "step": 5}, d + "/sd.pt")
        >>> torch_save_to_dcp(d + "/sd.pt", d + "/ck")
        >>> sd, left_out = export_values(d + "/ck")
        >>> type(sd["w"]).__name__, left_out
        ('FileRanges', ['step'])
    """
    from zckpt.interop._stream import FileRanges
    from zckpt.store._fp32 import LazyTensor

    ck = open_dcp(path)
    if check_records:
        require_intact(ck)
    lay = dcp_layout(ck)

    def load(leaf: int, name: str) -> Any:
        """Tensor ``name`` alone, assembled from its runs (one tensor in memory at a time)."""
        from zckpt.assemble import Fp32Entry, assemble_fp32
        from zckpt.format._dtypes import torch_dtype

        dtype = torch_dtype(lay.skeleton.tensors[leaf].dtype_name)
        return dict(assemble_fp32(lay.saved, [Fp32Entry(name, leaf, dtype, None)]))[name]

    out: dict[str, Any] = {}
    if keys is None:
        names, values = {n: n for n in ck.metadata.tensors}, list(ck.metadata.values)
    else:
        names, values = keys(ck.metadata)
    for leaf, dcp_name in enumerate(ck.metadata.tensors):
        if dcp_name not in names:
            continue
        name = names[dcp_name]
        meta = lay.skeleton.tensors[leaf]
        ranges: list[tuple[str, int, int]] | None = []
        stamps: dict[str, tuple[int, ...]] = {}
        for src in lay.saved.sources[leaf]:
            run = cast(ChunkRun, src)
            where = run.file_range(0, run.fragment.numel)
            if where is None or ranges is None:
                ranges = None
                break
            if run.ref.storage.stamp is not None:
                stamps[where[0]] = run.ref.storage.stamp
            if ranges and ranges[-1][0] == where[0] and sum(ranges[-1][1:]) == where[1]:
                ranges[-1] = (where[0], ranges[-1][1], ranges[-1][2] + where[2])
            else:
                ranges.append(where)

        def one(leaf: int = leaf, name: str = name) -> Any:
            return load(leaf, name)

        if ranges is None:
            from zckpt.format._dtypes import torch_dtype

            out[name] = LazyTensor(meta.shape, torch_dtype(meta.dtype_name), one)
        else:
            out[name] = FileRanges(meta.shape, meta.dtype_name, tuple(ranges), one,
                                   tuple(stamps.items()))  # fmt: skip
    return out, values


def item_problems(ck: DcpCheckpoint) -> list[str]:
    """Every item of the checkpoint read whole and checked against its zip's CRC-32s (the
    only checksum DCP writes; torch's loads never check it), each problem naming the file,
    the entry and the byte range.

    Example:
        >>> import tempfile, torch
        >>> from torch.distributed.checkpoint.format_utils import torch_save_to_dcp
        >>> d = tempfile.mkdtemp()
        >>> torch.save({"w": torch.ones(2)}, d + "/sd.pt")
        >>> torch_save_to_dcp(d + "/sd.pt", d + "/ck")
        >>> item_problems(open_dcp(d + "/ck"))
        []
    """
    from zckpt.interop._zipcheck import record_problems

    problems = []
    for (name, offsets), item in ck.metadata.items.items():
        path = ck.file(item.relative_path)
        what = name if offsets is None else f"{name} chunk at {list(offsets)}"
        for p in record_problems(path, window=(item.offset, item.length)):
            problems.append(f"{what}: {p}")
        if not _is_zip(path, item.offset):
            problems.append(f"{what}: {path}: bytes {item.offset} to {item.end} are no zip")
    return problems


def _is_zip(path: str, offset: int) -> bool:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(4) == b"PK\x03\x04"


def require_intact(ck: DcpCheckpoint) -> None:
    """Raise unless every item matches its CRC-32s (:func:`item_problems`).

    Raises:
        DcpFormatError: naming the first problems; nothing was written.

    Example:
        >>> require_intact.__name__
        'require_intact'
    """
    problems = item_problems(ck)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise DcpFormatError(
            "damaged checkpoint files, nothing was written: " + "; ".join(problems[:3]) + more
        )
