"""Where each parameter's elements sit in DeepSpeed's per-rank flat partitions (pure).

ZeRO stage 1/2 keeps one flat buffer per optimizer param group: the group's parameters back to
back (``param_shapes`` order), padded at the end, cut into equal partitions, one per rank of the
group. Each rank saves its partition without the padding, and (since DeepSpeed 0.7) records in
``param_slice_mappings`` which parameters, or parts, its partition holds and where. Stage 3
partitions every parameter on its own: ``ceil(numel / ws)`` elements per rank (the last ranks
padded), and a rank's flat group is its pieces of the group's parameters back to back.

A universal checkpoint (``ds_to_universal``'s output) keeps each parameter whole, in files of its
own: there, a param group's partitions are its parameters' tensors, one per parameter.

The functions here turn those records into :class:`Piece` values: elements ``[start, stop)`` of a
parameter lie at ``offset`` of partition ``rank`` of its param group. Nothing is read or copied.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from zckpt.interop._unpickle import DeepSpeedFormatError

__all__ = [
    "Member",
    "Piece",
    "flat_group_pieces",
    "parse_param_shapes",
    "partitioned_pieces",
    "shape_of",
    "stage3_piece_size",
    "whole_pieces",
]


class Piece(NamedTuple):
    """Elements ``[start, stop)`` of parameter ``name`` at ``offset`` of ``rank``'s partition.

    ``rank`` numbers the param group's partitions: the data-parallel rank whose flat partition
    it is, or, in a universal checkpoint, the parameter's index in its group (its own file).

    Example:
        >>> Piece("w", 0, 4, rank=1, offset=6).numel
        4
    """

    name: str
    start: int
    stop: int
    rank: int
    offset: int

    @property
    def numel(self) -> int:
        """Number of elements."""
        return self.stop - self.start


class Member(NamedTuple):
    """One rank's partition of a param group: its size and, when saved, its slice mapping.

    ``mapping`` maps parameter name to an object with ``numel`` and ``start`` (DeepSpeed's
    ``fragment_address``), or is ``None`` when the checkpoint predates ``param_slice_mappings``.

    Example:
        >>> Member(rank=0, size=10, mapping=None).size
        10
    """

    rank: int
    size: int
    mapping: Mapping[str, Any] | None


def shape_of(s: Any, where: str) -> tuple[int, ...]:
    """A recorded shape (``torch.Size``, list or tuple of non-negative ints) as a tuple.

    Raises:
        DeepSpeedFormatError: ``s`` is not a shape (``where`` names the record).

    Example:
        >>> shape_of([2, 3], "f.pt: param_shapes[0][w]")
        (2, 3)
    """
    if isinstance(s, str) or not isinstance(s, Sequence):
        raise DeepSpeedFormatError(f"{where}: {s!r} is not a shape")
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in s):
        raise DeepSpeedFormatError(f"{where}: {s!r} is not a shape")
    return tuple(int(x) for x in s)


def parse_param_shapes(value: Any, where: str) -> list[dict[str, tuple[int, ...]]]:
    """A model states file's ``param_shapes``: per param group, parameter name -> shape.

    Raises:
        DeepSpeedFormatError: not a list of name -> shape mappings (``where`` names the file).

    Example:
        >>> parse_param_shapes([{"w": (2, 3)}, {"b": [3]}], "f.pt")
        [{'w': (2, 3)}, {'b': (3,)}]
    """
    if not isinstance(value, list):
        raise DeepSpeedFormatError(
            f"{where}: 'param_shapes' is a {type(value).__name__}, not a list"
        )
    out = []
    for g, d in enumerate(value):
        at = f"{where}: param_shapes[{g}]"
        if not isinstance(d, Mapping):
            raise DeepSpeedFormatError(f"{at} is a {type(d).__name__}, not a mapping")
        out.append({str(n): shape_of(s, f"{at}[{n}]") for n, s in d.items()})
    return out


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


def _int(x: Any, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise DeepSpeedFormatError(f"{what}: expected a non-negative int, got {x!r}")
    return int(x)


def flat_group_pieces(
    shapes: Mapping[str, Sequence[int]], members: Sequence[Member], where: str = "group"
) -> list[Piece]:
    """The pieces of a stage 1/2 param group, from the slice mappings when every rank saved them.

    Without mappings the layout is DeepSpeed's own: the ranks' unpadded partitions concatenated
    in rank order hold the parameters back to back, and must hold exactly them.

    Args:
        shapes: parameter name -> shape, in flat-buffer order.
        members: the group's ranks, in partition order.
        where: the group, for messages.

    Raises:
        DeepSpeedFormatError: the records do not cover every parameter exactly once, or point
            outside a partition (the message names the parameter and the rank).

    Example:
        >>> m = [Member(0, 4, None), Member(1, 3, None)]
        >>> [tuple(p) for p in flat_group_pieces({"a": (3,), "b": (2, 2)}, m)]
        [('a', 0, 3, 0, 0), ('b', 0, 1, 0, 3), ('b', 1, 4, 1, 0)]
    """
    if members and all(m.mapping is not None for m in members):
        return _mapped_pieces(shapes, members, where)
    pieces: list[Piece] = []
    bounds, pos = [], 0
    for m in members:
        bounds.append((pos, m))
        pos += m.size
    total = sum(_numel(s) for s in shapes.values())
    if not 0 <= pos - total < 2 * len(members):
        # DeepSpeed tolerates a tail shorter than its alignment (2 * ws): padding that the last
        # rank's partition could not strip when it spanned more than that partition.
        raise DeepSpeedFormatError(
            f"{where}: the parameters hold {total} elements but the ranks' partitions "
            f"{[m.size for m in members]} hold {pos}"
        )
    off = 0
    for name, shape in shapes.items():
        n = _numel(shape)
        for base, m in bounds:
            lo, hi = max(off, base), min(off + n, base + m.size)
            if lo < hi:
                pieces.append(Piece(name, lo - off, hi - off, m.rank, lo - base))
        off += n
    return pieces


def _mapped_pieces(
    shapes: Mapping[str, Sequence[int]], members: Sequence[Member], where: str
) -> list[Piece]:
    done = {name: 0 for name in shapes}
    pieces: list[Piece] = []
    for m in members:
        for name, addr in (m.mapping or {}).items():
            what = f"{where}, rank {m.rank}, {name}"
            if name not in done:
                raise DeepSpeedFormatError(f"{what}: in param_slice_mappings but not param_shapes")
            numel = _int(getattr(addr, "numel", None), f"{what} numel")
            start = _int(getattr(addr, "start", None), f"{what} start")
            if start + numel > m.size:
                raise DeepSpeedFormatError(
                    f"{what}: elements [{start}, {start + numel}) are outside the rank's "
                    f"partition of {m.size}"
                )
            got = done[name]
            pieces.append(Piece(name, got, got + numel, m.rank, start))
            done[name] = got + numel
    for name, shape in shapes.items():
        if done[name] != _numel(shape):
            raise DeepSpeedFormatError(
                f"{where}, {name}: the ranks' param_slice_mappings hold {done[name]} of its "
                f"{_numel(shape)} elements"
            )
    order = {name: i for i, name in enumerate(shapes)}
    _check_back_to_back(pieces, members, order, where)
    return sorted(pieces, key=lambda p: (order[p.name], p.start))


def _check_back_to_back(
    pieces: Sequence[Piece], members: Sequence[Member], order: Mapping[str, int], where: str
) -> None:
    """The mapped pieces lie as DeepSpeed lays a flat group out: in each rank's partition, the
    parameters back to back from element 0, in ``param_shapes`` order, up to the partition's
    end on every rank before the last one holding any (padding only after the last parameter).
    Mappings that overlap, leave a gap or swap two parameters would otherwise read another
    parameter's elements for this one, silently (each still inside the partition, the counts
    right)."""
    by_rank: dict[int, list[Piece]] = {}
    for p in pieces:
        if p.numel:
            by_rank.setdefault(p.rank, []).append(p)
    size = {m.rank: m.size for m in members}
    ranks = [m.rank for m in members if m.rank in by_rank]
    for r in ranks:
        at, last = 0, -1
        for p in sorted(by_rank[r], key=lambda p: p.offset):
            if p.offset != at or order[p.name] <= last:
                raise DeepSpeedFormatError(
                    f"{where}, rank {r}, {p.name}: param_slice_mappings put its elements "
                    f"[{p.start}, {p.stop}) at [{p.offset}, {p.offset + p.numel}) of the "
                    f"partition, not at {at} after the parameters before it (a flat group "
                    "holds its parameters back to back, in param_shapes order)"
                )
            at, last = p.offset + p.numel, order[p.name]
        if r != ranks[-1] and at != size[r]:
            raise DeepSpeedFormatError(
                f"{where}, rank {r}: param_slice_mappings fill elements [0, {at}) of a partition "
                f"of {size[r]}, and a later rank holds more parameters"
            )


def stage3_piece_size(numel: int, world_size: int) -> int:
    """Elements per rank of a stage 3 parameter, padding included: ``ceil(numel / ws)``.

    Example:
        >>> stage3_piece_size(3737, 3), stage3_piece_size(0, 4)
        (1246, 0)
    """
    return -(-numel // world_size)


def partitioned_pieces(
    shapes: Mapping[str, Sequence[int]], sizes: Sequence[int], where: str = "group"
) -> list[Piece]:
    """The pieces of a stage 3 param group; ``sizes[r]`` is rank ``r``'s flat group size.

    Raises:
        DeepSpeedFormatError: a rank's flat group is not exactly the padded pieces of the
            group's parameters.

    Example:
        >>> [tuple(p) for p in partitioned_pieces({"a": (5,), "b": (1,)}, [4, 4])]
        [('a', 0, 3, 0, 0), ('a', 3, 5, 1, 0), ('b', 0, 1, 0, 3)]
    """
    ws = len(sizes)
    pieces: list[Piece] = []
    off = 0
    for name, shape in shapes.items():
        n = _numel(shape)
        c = stage3_piece_size(n, ws)
        for r in range(ws):
            lo, hi = r * c, min((r + 1) * c, n)
            if lo < hi:
                pieces.append(Piece(name, lo, hi, r, off))
        off += c
    for r, size in enumerate(sizes):
        if size != off:
            raise DeepSpeedFormatError(
                f"{where}, rank {r}: the flat partition has {size} elements, but its pieces of "
                f"the group's parameters ({ws} ranks, ceil(numel / {ws}) each) make {off}"
            )
    return pieces


def whole_pieces(shapes: Mapping[str, Sequence[int]]) -> list[Piece]:
    """The pieces of a param group of a universal checkpoint: each parameter whole, in its own
    partition (numbered by its index in the group), empty parameters left out.

    Example:
        >>> [tuple(p) for p in whole_pieces({"a": (2, 3), "e": (0,), "b": (4,)})]
        [('a', 0, 6, 0, 0), ('b', 0, 4, 2, 0)]
    """
    out = []
    for i, (name, shape) in enumerate(shapes.items()):
        n = _numel(shape)
        if n:
            out.append(Piece(name, 0, n, i, 0))
    return out
