"""DeepSpeed ZeRO checkpoints to an fp32 state dict, as DeepSpeed's ``zero_to_fp32`` builds it.

The loaded (memory-mapped) partitions become :class:`~zckpt.interop._pages.PagedSource` views,
one per piece of a parameter a rank holds; zckpt's own assembly then builds each output tensor
straight from them (no concatenated group buffer, unlike DeepSpeed's stage 1/2 path), releasing
the file pages it has copied, so memory is the output plus one 16 MiB window, and ``lazy_mode``
reads one tensor at a time.

The output holds ``zero_to_fp32``'s keys in its order: buffers, then frozen parameters, then
trainable parameters from the fp32 masters in ``param_shapes`` order, then the tied
(``shared_params``) names, the same tensor objects. Where zckpt differs from ``zero_to_fp32``,
on purpose (``zero_to_fp32_compat=True`` restores its behaviour):

- every floating tensor is fp32: ``zero_to_fp32`` leaves a bf16 run's frozen parameters (and
  16-bit buffers) in bf16 inside an otherwise fp32 state dict;
- ZeRO-1 frozen parameters are kept: stage 1 records none in ``frozen_param_shapes``, so
  ``zero_to_fp32`` drops them and ``from_pretrained`` re-initialises those layers, although their
  values are in the model states' ``module`` entry, where zckpt takes them from.

A universal checkpoint (``_universal.py``) goes the same way: its model states are the source
checkpoint's, and each param group's partitions are its parameters' own tensors, so its fp32
state dict is the one ``zero_to_fp32`` gives for the checkpoint it was converted from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from zckpt.errors import CoverageError
from zckpt.format._dtypes import dtype_name, torch_dtype
from zckpt.interop._files import DeepSpeedCheckpoint, get, open_deepspeed
from zckpt.interop._layout import (
    Member,
    Piece,
    flat_group_pieces,
    parse_param_shapes,
    partitioned_pieces,
    shape_of,
    whole_pieces,
)
from zckpt.interop._layout import stage3_piece_size as piece_size
from zckpt.interop._moe import expert_pieces, is_expert_group, local_expert_counts
from zckpt.interop._refs import TensorRef, is_tensor
from zckpt.interop._stream import FileRanges, Segment, StreamedTensor
from zckpt.interop._unpickle import DeepSpeedFormatError
from zckpt.spec import Fragment
from zckpt.store._fp32 import LazyTensor
from zckpt.tree import DICT, TENSOR, Skeleton, TensorMeta

if TYPE_CHECKING:
    import torch

    from zckpt.assemble import Fp32Entry, SourceIndex, TensorSource

__all__ = [
    "GroupLayout",
    "deepspeed_fp32_state_dict",
    "export_values",
    "fp32_sources",
    "gather",
    "group_layouts",
    "partitions",
]


class GroupLayout(NamedTuple):
    """One optimizer param group: its parameters (output names, shapes) and their pieces.

    Example:
        >>> GroupLayout(0, {"w": (2,)}, [Piece("w", 0, 2, 0, 0)]).shapes
        {'w': (2,)}
    """

    group: int
    shapes: dict[str, tuple[int, ...]]
    pieces: list[Piece]


def partitions(ck: DeepSpeedCheckpoint, key: str | None = None) -> list[list[Any]]:
    """``[group][member]`` flat fp32 partitions, or (``key``) optimizer state tensors like them.

    A param group's members are its ranks' flat partitions, in rank order; in a universal
    checkpoint, its parameters' own tensors, in ``param_shapes`` order (a :class:`Piece`'s
    ``rank`` indexes them). In a checkpoint opened as references, they are ``TensorRef``.

    Example:
        >>> import tempfile, torch
        >>> from zckpt.interop._synthetic import write_zero_checkpoint
        >>> d = tempfile.mkdtemp()
        >>> write_zero_checkpoint(d, {"w": torch.randn(7)}, world_size=2, stage=1)
        >>> [[p.numel() for p in g] for g in partitions(open_deepspeed(d))]
        [[4, 3]]
    """
    if ck.universal is not None:
        return ck.universal.partitions(key)
    by_rank = []
    n_groups = len(get(ck.model[0], "param_shapes", ck.model_files[0], list))
    for o, f in zip(ck.optim, ck.optim_files):
        if key is None:
            name = "fp32_flat_groups" if ck.stage == 3 else "single_partition_of_fp32_groups"
            ts = get(o, name, f, list)
        else:
            name = "optimizer_state_dict" if ck.stage == 3 else "base_optimizer_state"
            state = get(get(o, name, f, Mapping), "state", f"{f}: {name}", Mapping)
            ts = [get(state, g, f"{f}: {name}/state", Mapping).get(key) for g in range(n_groups)]
            name = f"{name}/state/<group>/{key}"
        if len(ts) != n_groups:
            raise DeepSpeedFormatError(f"{f}: {len(ts)} {name} for {n_groups} param groups")
        for g, t in enumerate(ts):
            if not is_tensor(t) or t.dim() != 1:
                raise DeepSpeedFormatError(f"{f}: {name}[{g}] is not a 1-D tensor")
        by_rank.append(ts)
    return [[ts[g] for ts in by_rank] for g in range(n_groups)]


def _param_groups(ck: DeepSpeedCheckpoint) -> list[Any]:
    key = "optimizer_state_dict" if ck.stage == 3 else "base_optimizer_state"
    pg = ck.optim[0].get(key, {}).get("param_groups") if ck.optim else None
    return list(pg) if isinstance(pg, list) else []


def _param_shapes(ck: DeepSpeedCheckpoint) -> list[dict[str, tuple[int, ...]]]:
    f0 = ck.model_files[0]
    return parse_param_shapes(get(ck.model[0], "param_shapes", f0, list), f0)


def group_layouts(ck: DeepSpeedCheckpoint) -> list[GroupLayout]:
    """Every optimizer param group's parameters and where their elements lie (no bytes read).

    Example:
        >>> import tempfile, torch
        >>> from zckpt.interop._synthetic import write_zero_checkpoint
        >>> d = tempfile.mkdtemp()
        >>> write_zero_checkpoint(d, {"a": torch.ones(3), "b": torch.ones(2)}, world_size=2,
        ...                       stage=3)
        >>> [tuple(p) for p in group_layouts(open_deepspeed(d))[0].pieces]
        [('a', 0, 2, 0, 0), ('a', 2, 3, 1, 0), ('b', 0, 1, 0, 2), ('b', 1, 2, 1, 2)]
    """
    shapes = _param_shapes(ck)
    if ck.universal is not None:  # each parameter whole, in files of its own
        return [GroupLayout(g, s, whole_pieces(s)) for g, s in enumerate(shapes)]
    sizes = [[t.numel() for t in g] for g in partitions(ck)]  # [group][rank]
    ws, path = ck.world_size, ck.path
    if ck.stage == 3:
        pc3 = {get(o, "partition_count", f, int) for o, f in zip(ck.optim, ck.optim_files)}
        if pc3 != {ws}:
            raise DeepSpeedFormatError(f"{path}: partition_count {sorted(pc3)} for {ws} ranks")
        return [
            GroupLayout(g, s, partitioned_pieces(s, sizes[g], f"{path}: group {g}"))
            for g, s in enumerate(shapes)
        ]
    pcs = [get(o, "partition_count", f, list) for o, f in zip(ck.optim, ck.optim_files)]
    maps = [o.get("param_slice_mappings") for o in ck.optim]
    groups = _param_groups(ck)
    expert = [g < len(groups) and is_expert_group(groups[g]) for g in range(len(shapes))]
    counts = local_expert_counts(n for g, s in enumerate(shapes) if expert[g] for n in s)
    known = {k: tuple(t.shape) for e in ck.experts for k, t in e.state.items() if is_tensor(t)}
    out = []
    for g, s in enumerate(shapes):
        where = f"{path}: param group {g}"
        pc = {p[g] if g < len(p) else None for p in pcs}
        if len(pc) != 1 or not isinstance(next(iter(pc)), int):
            raise DeepSpeedFormatError(f"{where}: partition_count {sorted(map(str, pc))}")
        count = int(next(iter(pc)) or 0)

        def member(r: int, g: int = g) -> Member:
            m = maps[r]
            if m is None:
                return Member(r, sizes[g][r], None)
            if not isinstance(m, list) or len(m) <= g or not isinstance(m[g], Mapping):
                raise DeepSpeedFormatError(
                    f"{ck.optim_files[r]}: param_slice_mappings has no mapping for param group {g}"
                )
            return Member(r, sizes[g][r], m[g])

        if expert[g]:
            names, pieces = expert_pieces(s, ws, count, member, counts, known, where)
            out.append(GroupLayout(g, names, pieces))
        elif count != ws:
            raise DeepSpeedFormatError(
                f"{where}: partitioned over {count} of {ws} ranks and not an MoE expert group "
                "(hierarchical partitioning such as MiCS is not supported)"
            )
        else:
            members = [member(r) for r in range(ws)]
            out.append(GroupLayout(g, s, flat_group_pieces(s, members, where)))
    return out


class _Part(NamedTuple):
    """Elements ``[a, b)`` of the flattened ``data`` (a tensor or a ``TensorRef`` as the file
    holds it) are elements ``[start, start + b - a)`` of output leaf ``leaf``."""

    leaf: int
    start: int
    data: Any
    a: int
    b: int


class _Entry(NamedTuple):
    """An output key: its leaf, its dtype (a torch dtype name) and its tie (as ``Fp32Entry``)."""

    name: str
    source: int
    dtype: str
    tied_to: str | None


_HALF = ("float16", "bfloat16")


class _Builder:
    """Leaves, saved parts and entries of the output, in output order (no torch needed: the
    parts may be references; :func:`fp32_sources` makes torch sources of them)."""

    def __init__(self, ck: DeepSpeedCheckpoint, upcast: bool = False) -> None:
        self.upcast = upcast  # floating outputs in fp32 (16-bit sources are upcast when read)
        self.where = ck.path
        self.metas: list[TensorMeta] = []
        self.parts: list[_Part] = []
        self.entries: list[_Entry] = []
        self.leaves: dict[str, int] = {}  # name -> leaf, tied names included

    def leaf(self, name: str, dtype: Any, shape: tuple[int, ...]) -> int:
        if name in self.leaves:
            raise DeepSpeedFormatError(f"{self.where}: '{name}' is recorded twice")
        dt = dtype_name(dtype)
        self.metas.append(TensorMeta(dt, shape))
        out = "float32" if self.upcast and dt in _HALF else dt
        self.entries.append(_Entry(name, len(self.metas) - 1, out, None))
        self.leaves[name] = len(self.metas) - 1
        return len(self.metas) - 1

    def add(self, leaf: int, start: int, data: Any, a: int = 0, b: int | None = None) -> None:
        b = data.numel() if b is None else b
        if b > a:
            self.parts.append(_Part(leaf, start, data, a, b))

    def whole(self, name: str, t: Any, what: str) -> None:
        if not is_tensor(t):
            raise DeepSpeedFormatError(f"{self.where}: {what} '{name}' is not a tensor")
        self.add(self.leaf(name, t.dtype, tuple(t.shape)), 0, t)

    def tie(self, name: str, target: str) -> None:
        leaf = self.leaves.get(target)
        if leaf is not None and name not in self.leaves:
            out = next(e.dtype for e in self.entries if e.source == leaf and e.tied_to is None)
            self.entries.append(_Entry(name, leaf, out, target))
            self.leaves[name] = leaf

    def skeleton(self) -> Skeleton:
        node = (DICT, tuple((e.name, (TENSOR, e.source)) for e in self.entries))
        first = {e.source: e.name for e in reversed(self.entries) if e.tied_to is None}
        return Skeleton(node, tuple(self.metas), tuple((first[i],) for i in range(len(self.metas))))

    def torch_sources(self, ck: DeepSpeedCheckpoint) -> list[TensorSource]:
        """The parts as :class:`~zckpt.interop._pages.PagedSource` over torch tensors (a
        reference built from its file by ``ck.as_torch``), pages released as they are copied."""
        from zckpt.interop._pages import PagedSource, file_mappings

        flat = [ck.as_torch(p.data).reshape(-1)[p.a : p.b] for p in self.parts]
        mappings = file_mappings(ck.files)  # after the building: references map their files
        return [
            PagedSource(Fragment(p.leaf, p.start, p.start + p.b - p.a), t, mappings)
            for p, t in zip(self.parts, flat)
        ]

    def torch_entries(self) -> list[Fp32Entry]:
        from zckpt.assemble import Fp32Entry

        return [Fp32Entry(e.name, e.source, torch_dtype(e.dtype), e.tied_to) for e in self.entries]


def _frozen(b: _Builder, ck: DeepSpeedCheckpoint) -> None:
    # Only stage 3 spreads frozen parameters over every rank's file; with none recorded on
    # rank 0 there is nothing to read in the others.
    ranks = len(ck.model_files) if ck.stage == 3 and ck.model[0].get("frozen_param_shapes") else 1
    for r in range(ranks):
        m, f = ck.model[r], ck.model_files[r]
        shapes, frags = m.get("frozen_param_shapes"), m.get("frozen_param_fragments")
        if shapes is None:
            continue
        shapes, frags = get({"s": shapes}, "s", f, Mapping), get({"f": frags}, "f", f, Mapping)
        for name, s in shapes.items():
            shape = shape_of(s, f"{f}: frozen_param_shapes[{name}]")
            t = get(frags, name, f"{f}: frozen_param_fragments")
            if not is_tensor(t):
                raise DeepSpeedFormatError(f"{f}: frozen_param_fragments: '{name}' is not a tensor")
            n = TensorMeta(dtype_name(t.dtype), shape).numel
            if ck.stage != 3:
                if t.numel() != n:
                    raise DeepSpeedFormatError(f"{f}: frozen '{name}' has {t.numel()} of {n}")
                b.add(b.leaf(name, t.dtype, shape), 0, t)
                continue
            c = piece_size(n, ck.world_size)
            if t.numel() != c:
                raise DeepSpeedFormatError(f"{f}: frozen '{name}' holds {t.numel()}, not {c}")
            leaf = b.leaf(name, t.dtype, shape) if r == 0 else _leaf_of(b, name, f)
            if b.metas[leaf] != TensorMeta(dtype_name(t.dtype), shape):
                raise DeepSpeedFormatError(f"{f}: frozen '{name}' differs from rank 0's")
            b.add(leaf, r * c, t, 0, max(0, min(c, n - r * c)))


def _leaf_of(b: _Builder, name: str, f: str) -> int:
    if name in b.leaves:
        return b.leaves[name]
    raise DeepSpeedFormatError(f"{f}: frozen '{name}' is not in rank 0's frozen_param_shapes")


def _add_group(b: _Builder, layout: GroupLayout, parts: list[list[Any]]) -> None:
    g = layout.group
    dtypes = {dtype_name(t.dtype) for t in parts[g]}
    if len(dtypes) > 1:
        raise DeepSpeedFormatError(
            f"{b.where}: param group {g}: dtypes {dtypes} differ between partitions"
        )
    dtype = next(iter(dtypes), "float32")  # a group without members has no elements
    leaves = {n: b.leaf(n, dtype, s) for n, s in layout.shapes.items()}
    for p in layout.pieces:
        part = parts[g][p.rank]
        if p.offset + p.numel > part.numel():
            raise DeepSpeedFormatError(
                f"{b.where}: rank {p.rank}, param group {g}: {p.name} elements [{p.start}, "
                f"{p.stop}) lie past the end of a partition of {part.numel()}"
            )
        b.add(leaves[p.name], p.start, part, p.offset, p.offset + p.numel)


def gather(
    ck: DeepSpeedCheckpoint, layouts: Sequence[GroupLayout], parts: list[list[Any]]
) -> dict[str, torch.Tensor]:
    """Every parameter's full tensor from ``parts[group][member]`` laid out like the fp32
    masters (the masters themselves, or an optimizer state such as ``exp_avg``).

    Example:
        >>> import tempfile, torch
        >>> from zckpt.interop._synthetic import write_zero_checkpoint
        >>> d = tempfile.mkdtemp()
        >>> write_zero_checkpoint(d, {"w": torch.ones(5)}, world_size=2, stage=3)
        >>> ck = open_deepspeed(d)
        >>> gather(ck, group_layouts(ck), partitions(ck, "exp_avg"))["w"].tolist()
        [0.5, 0.5, 0.5, 0.5, 0.5]
    """
    from zckpt.assemble import fp32_tensors, index_sources
    from zckpt.format._decode import decode_threads

    b = _Builder(ck)
    for layout in layouts:
        _add_group(b, layout, parts)
    try:
        sources = b.torch_sources(ck)
        index = index_sources(b.skeleton(), sources)
        return fp32_tensors(index, b.torch_entries(), decode_threads())
    except CoverageError as err:
        raise DeepSpeedFormatError(f"{ck.path}: {err}") from None


def fp32_sources(
    ck: DeepSpeedCheckpoint,
    exclude_frozen_parameters: bool = False,
    *,
    zero_to_fp32_compat: bool = False,
) -> tuple[Skeleton, list[TensorSource], list[Fp32Entry]]:
    """The output's skeleton, the saved pieces as sources (views, no copies), and its entries.

    Every floating output is fp32 and ZeRO-1's frozen parameters come from the ``module``
    entry, unless ``zero_to_fp32_compat`` (see the module docstring).

    Example:
        >>> import tempfile, torch
        >>> from zckpt.interop._synthetic import write_zero_checkpoint
        >>> d = tempfile.mkdtemp()
        >>> write_zero_checkpoint(d, {"w": torch.randn(5)}, world_size=2, stage=2,
        ...                       buffers={"n": torch.tensor(3)})
        >>> skel, sources, entries = fp32_sources(open_deepspeed(d))
        >>> [e.name for e in entries], len(sources)
        (['n', 'w'], 3)
    """
    b = _build(ck, exclude_frozen_parameters, zero_to_fp32_compat)
    return b.skeleton(), b.torch_sources(ck), b.torch_entries()


def _build(ck: DeepSpeedCheckpoint, exclude_frozen_parameters: bool, compat: bool) -> _Builder:
    """The output's leaves, parts and entries (``fp32_sources`` without torch)."""
    zero_to_fp32_compat = compat
    b = _Builder(ck, upcast=not zero_to_fp32_compat)
    m0, f0 = ck.model[0], ck.model_files[0]
    module = get(m0, "module", f0, Mapping)
    buffers = set(get({"b": m0.get("buffer_names") or []}, "b", f0, (list, tuple)))
    for name, t in module.items():
        if name in buffers:
            b.whole(name, t, "buffer")
    layouts = group_layouts(ck)
    shared = m0.get("shared_params") or {}
    if not exclude_frozen_parameters:
        _frozen(b, ck)
        if ck.stage == 1 and not zero_to_fp32_compat:
            trainable = {n for lay in layouts for n in lay.shapes}
            for name, t in module.items():
                if name not in b.leaves and name not in trainable and name not in shared:
                    b.whole(name, t, "frozen parameter")
    parts = partitions(ck)
    for layout in layouts:
        _add_group(b, layout, parts)
    for alias, target in get({"s": shared}, "s", f0, Mapping).items():
        b.tie(str(alias), str(target))
    return b


def deepspeed_fp32_state_dict(
    checkpoint_dir: str | os.PathLike[str],
    tag: str | None = None,
    exclude_frozen_parameters: bool = False,
    lazy_mode: bool = False,
    *,
    zero_to_fp32_compat: bool = False,
    map_files: bool | None = None,
) -> dict[str, Any]:
    """DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``, without DeepSpeed or its pickles.

    ``zckpt.get_fp32_state_dict_from_zero_checkpoint`` calls this for DeepSpeed directories.

    Eager outputs are copies in new memory. With ``map_files=True`` (or ``ZCKPT_MAP=1`` in the
    environment), those of 1 MiB or more that are stored as they are (fp32 masters) are instead
    copy-on-write mappings of the checkpoint's files (``zckpt/interop/_mapped.py``): ordinary
    tensors, made without faulting fresh memory, but the files must then not be truncated or
    rewritten in place while the tensors live (deleting them is safe), or the tensors would
    change with them.

    Args:
        checkpoint_dir: a DeepSpeed save_dir (tag from ``tag`` or ``latest``) or tag directory;
            at a URL, copied to a private local directory first (``interop/_staged.py``).
        tag: the tag.
        exclude_frozen_parameters: leave out frozen parameters.
        lazy_mode: return :class:`zckpt.LazyTensor` values, read on ``.contiguous()``.
        zero_to_fp32_compat: exactly ``zero_to_fp32``'s output: frozen parameters in the
            training dtype, ZeRO-1's frozen parameters left out (see the module docstring).
        map_files: map eager outputs from the files (see above); None: ``ZCKPT_MAP``'s
            choice (default: copy).

    Raises:
        DeepSpeedFormatError: files missing or inconsistent (file, tensor and rank named).
        UnsafePickleError: a file references a type outside the allow-list.

    Example:
        >>> import tempfile, torch
        >>> from zckpt.interop._synthetic import write_zero_checkpoint
        >>> d = tempfile.mkdtemp()
        >>> w = torch.randn(4, 3)
        >>> write_zero_checkpoint(d, {"w": w}, world_size=3, stage=2, tied={"v": "w"})
        >>> sd = deepspeed_fp32_state_dict(d)
        >>> torch.equal(sd["w"], w), sd["v"] is sd["w"]
        (True, True)
        >>> deepspeed_fp32_state_dict(d, lazy_mode=True)["w"].contiguous().shape
        torch.Size([4, 3])
    """
    from zckpt.interop._staged import is_remote, read_foreign

    if is_remote(checkpoint_dir):  # copied to a local directory, read there
        return read_foreign(
            checkpoint_dir, tag,
            lambda local: deepspeed_fp32_state_dict(
                local, tag, exclude_frozen_parameters, lazy_mode,
                zero_to_fp32_compat=zero_to_fp32_compat, map_files=map_files,
            ),
            lazy_mode,
        )  # fmt: skip
    from zckpt.assemble import assemble_fp32, fp32_tensors, index_sources
    from zckpt.format._decode import decode_threads
    from zckpt.interop._mapped import mapping_enabled

    ck = open_deepspeed(checkpoint_dir, tag)
    skel, sources, entries = fp32_sources(
        ck, exclude_frozen_parameters, zero_to_fp32_compat=zero_to_fp32_compat
    )
    try:
        index = index_sources(skel, sources)
        if not lazy_mode:
            if mapping_enabled(map_files):
                return _eager_mapped(ck.path, index, skel, entries)
            return fp32_tensors(index, entries, decode_threads())
    except CoverageError as err:
        raise DeepSpeedFormatError(f"{ck.path}: {err}") from None
    out: dict[str, Any] = {}
    for e in entries:
        if e.tied_to is not None:
            out[e.name] = out[e.tied_to]
            continue
        meta = skel.tensors[e.source]

        def load(e: Fp32Entry = e) -> torch.Tensor:
            return dict(assemble_fp32(index, [e]))[e.name]

        if meta.dtype != e.dtype:  # upcast when read: no bytes to stream as they are
            out[e.name] = LazyTensor(meta.shape, e.dtype, load)
            continue

        def segments(e: Fp32Entry = e, n: int = meta.numel) -> list[Segment]:
            return _segments(ck.path, index, skel, Fragment(e.source, 0, n))

        out[e.name] = StreamedTensor(meta.shape, e.dtype, load, segments)
    return out


def _eager_mapped(
    where: str, index: SourceIndex, skel: Skeleton, entries: Sequence[Fp32Entry]
) -> dict[str, torch.Tensor]:
    """The eager state dict, each large stored-as-is tensor mapped from the files when it can
    be (``_mapped.py``), the others assembled into new memory; in ``entries``' order."""
    from zckpt.assemble import assemble_fp32
    from zckpt.interop._mapped import MIN_BYTES, mapped_tensor

    out: dict[str, torch.Tensor] = {}
    for e in entries:
        if e.tied_to is not None:
            out[e.name] = out[e.tied_to]
            continue
        meta = skel.tensors[e.source]
        if meta.dtype == e.dtype and meta.nbytes >= MIN_BYTES:
            segs = _segments(where, index, skel, Fragment(e.source, 0, meta.numel))
            t = mapped_tensor(meta.shape, e.dtype, segs)
            if t is not None:
                out[e.name] = t
                continue
        out[e.name] = dict(assemble_fp32(index, [e]))[e.name]
    return out


def _segments(where: str, index: SourceIndex, skel: Skeleton, want: Fragment) -> list[Segment]:
    """The saved ranges making up ``want``, in order (relative to each source)."""
    gaps = index.missing(want)
    if gaps:
        shown = ", ".join(f"[{a}, {b})" for a, b in gaps[:4])
        raise DeepSpeedFormatError(
            f"{where}: {skel.name(want.leaf)}: elements {shown} of {want.numel} are in no "
            "saved shard"
        )
    return [
        (src, lo - src.fragment.start, hi - src.fragment.start)
        for src, lo, hi in index.overlapping(want)
    ]


def _byte_ranges(
    b: _Builder, by_leaf: dict[int, list[_Part]], e: _Entry, stamps: dict[str, tuple[int, ...]]
) -> tuple[tuple[str, int, int], ...] | None:
    """Where entry ``e``'s bytes lie in the checkpoint's files, in order, when they are all
    there as they are (stored in the output dtype, contiguous references, no overlaps); None
    when some must be computed. A gap is a :class:`DeepSpeedFormatError`, as in assembly.
    ``stamps`` gets each file's identity as it was read (``StorageRef.stamp``)."""
    meta = b.metas[e.source]
    if meta.dtype_name != e.dtype:
        return None
    out: list[tuple[str, int, int]] = []
    at = 0
    for p in sorted(by_leaf.get(e.source, []), key=lambda p: p.start):
        if p.start > at:
            break
        if p.start < at or type(p.data) is not TensorRef:
            return None  # overlapping pieces, or a tensor torch's load built: the torch path
        where = p.data.file_range(p.a, p.b)
        if where is None:
            return None
        if p.data.storage.stamp is not None:
            stamps[where[0]] = p.data.storage.stamp
        if out and out[-1][0] == where[0] and out[-1][1] + out[-1][2] == where[1]:
            out[-1] = (where[0], out[-1][1], out[-1][2] + where[2])  # adjacent: one range
        else:
            out.append(where)
        at = p.start + p.b - p.a
    if at != meta.numel:
        raise DeepSpeedFormatError(
            f"{b.where}: {e.name}: elements [{at}, ...) of {meta.numel} are in no saved shard"
        )
    return tuple(out)


def export_values(
    checkpoint_dir: str | os.PathLike[str],
    tag: str | None = None,
    exclude_frozen_parameters: bool = False,
    *,
    check_records: bool = False,
) -> dict[str, Any]:
    """The fp32 state dict for an export (``zckpt consolidate``), torch imported only if needed.

    ``check_records``: first read every record of the checkpoint's files against its zip
    CRC-32 (:func:`~zckpt.interop._zipcheck.require_intact`), the only checksum DeepSpeed's
    files carry, so that a flipped bit is an error rather than a wrong value in the export.

    The checkpoint is opened as references (``open_deepspeed(refs=True)``): each value stored
    in the output dtype, as byte ranges of the files, is a
    :class:`~zckpt.interop._stream.FileRanges` (an export copies them file to file; its
    ``contiguous()`` builds the tensor); every other value (a 16-bit tensor upcast, a tensor that
    is no byte range) is a :class:`zckpt.LazyTensor` read by the same assembly as
    :func:`deepspeed_fp32_state_dict`'s ``lazy_mode``, built from the same references. Keys,
    order and ties are that function's.

    Example:
        >>> import tempfile, torch
        >>> from zckpt.interop._synthetic import write_zero_checkpoint
        >>> d = tempfile.mkdtemp()
        >>> w = torch.randn(4, 3)
        >>> write_zero_checkpoint(d, {"w": w}, world_size=3, stage=2, tied={"v": "w"})
        >>> sd = export_values(d)
        >>> type(sd["w"]).__name__, sd["v"] is sd["w"], torch.equal(sd["w"].contiguous(), w)
        ('FileRanges', True, True)
    """
    ck = open_deepspeed(checkpoint_dir, tag, refs=True)
    if check_records:
        from zckpt.interop._zipcheck import require_intact

        require_intact(ck.files)
    b = _build(ck, exclude_frozen_parameters, False)
    by_leaf: dict[int, list[_Part]] = {}
    for p in b.parts:
        by_leaf.setdefault(p.leaf, []).append(p)
    built: list[Any] = []

    def assembled(name: str) -> torch.Tensor:
        """Entry ``name`` by torch's assembly (the sources made once, on first use)."""
        from zckpt.assemble import assemble_fp32, index_sources

        if not built:
            try:
                index = index_sources(b.skeleton(), b.torch_sources(ck))
            except CoverageError as err:
                raise DeepSpeedFormatError(f"{ck.path}: {err}") from None
            built.extend((index, {e.name: e for e in b.torch_entries()}))
        index, entries = built
        return dict(assemble_fp32(index, [entries[name]]))[name]

    out: dict[str, Any] = {}
    for e in b.entries:
        if e.tied_to is not None:
            out[e.name] = out[e.tied_to]
            continue
        meta = b.metas[e.source]

        def load(name: str = e.name) -> torch.Tensor:
            return assembled(name)

        stamps: dict[str, tuple[int, ...]] = {}
        ranges = _byte_ranges(b, by_leaf, e, stamps)
        if ranges is not None:
            out[e.name] = FileRanges(meta.shape, e.dtype, ranges, load, tuple(stamps.items()))
        else:
            out[e.name] = LazyTensor(meta.shape, torch_dtype(e.dtype), load)
    return out
