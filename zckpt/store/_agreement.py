"""What every rank of a save must agree on before rank 0 commits: the spec and the tensors.

Rank 0 writes the manifest from its own skeleton, and each rank's blob is bound to it (its
fragments and, in format version 2, the skeleton's digest). A rank whose state has other
tensors (a key more or less, another shape or dtype: ranks that built their models
differently, or a state dict taken before a rank finished loading) would write a blob the
manifest does not describe: the save would commit, ``latest`` would name it, retention would
delete older checkpoints, and every load of it would fail. So each rank's report carries
:func:`structure_digest`; when they differ, every rank exchanges :func:`structure` and raises,
naming the first tensor that differs (:func:`first_difference`). Plain values (ints, strings)
may differ: the manifest keeps rank 0's, as DeepSpeed keeps rank 0's client state. The same
holds for the :class:`~zckpt.ZeroSpec` (a rank that cut its shard by another stage, world size
or alignment wrote fragments the manifest's plan does not have): :func:`spec_difference`.

Example:
    >>> import torch
    >>> from zckpt.tree import flatten
    >>> a = structure(flatten({"w": torch.zeros(2), "step": 1})[0])
    >>> b = structure(flatten({"w": torch.zeros(3), "step": 2})[0])
    >>> first_difference([a, b])
    "tensor 'w' is float32 (2,) on rank 0 but float32 (3,) on rank 1"
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import msgpack
import xxhash

from zckpt.tree import Skeleton

if TYPE_CHECKING:
    from zckpt.spec import ZeroSpec

__all__ = [
    "Disagreement",
    "disagreement",
    "first_difference",
    "report",
    "spec_difference",
    "structure",
    "structure_digest",
]

Structure = list[tuple[str, str, tuple[int, ...]]]


def structure(skeleton: Skeleton) -> Structure:
    """``(name, dtype, shape)`` of every tensor leaf, in leaf order (a tied tensor once, under
    its first path).

    Example:
        >>> import torch
        >>> from zckpt.tree import flatten
        >>> structure(flatten({"m": {"w": torch.zeros(2, 3)}})[0])
        [('m/w', 'float32', (2, 3))]
    """
    return [
        (skeleton.name(i), m.dtype_name, tuple(m.shape)) for i, m in enumerate(skeleton.tensors)
    ]


def structure_digest(skeleton: Skeleton) -> int:
    """An xxh3_64 of every tensor leaf's path, dtype and shape: equal on two ranks when their
    tensors agree. Of the raw paths, not the names :func:`structure` formats (a tenth of the
    time on a skeleton of 46,080 tensors: 16 ms), so it can only be stricter than the names.

    Example:
        >>> import torch
        >>> from zckpt.tree import flatten
        >>> d = structure_digest
        >>> d(flatten({"w": torch.zeros(2)})[0]) == d(flatten({"w": torch.ones(2)})[0])
        True
        >>> d(flatten({"w": torch.zeros(2)})[0]) == d(flatten({"v": torch.zeros(2)})[0])
        False
    """
    metas = skeleton.tensors
    packed = msgpack.packb(
        [skeleton.paths, [m.dtype_name for m in metas], [m.shape for m in metas]],
        use_bin_type=True,
    )
    return int(xxhash.xxh3_64_intdigest(packed))


def _show(entry: tuple[str, str, Sequence[int]]) -> str:
    return f"{entry[1]} {tuple(entry[2])}"


def _given(values: Sequence[Any]) -> list[tuple[int, Any]]:
    """``(rank, value)`` of the ranks that gave one (None: a rank that wrote nothing)."""
    return [(r, v) for r, v in enumerate(values) if v is not None]


def _odd(values: Sequence[Any]) -> list[int]:
    """The ranks whose value is not the lowest given rank's."""
    given = _given(values)
    return [r for r, v in given if v != given[0][1]]


def report(skeleton: Skeleton | None, spec: ZeroSpec, where: str | None) -> dict[str, Any]:
    """This rank's part of a save's report that the ranks compare: a digest of its tensors,
    its spec (both None for a rank that wrote nothing), and ``where`` it wrote (None where
    paths are not compared: a local filesystem, on which rank 0 lists the tag directory).

    Example:
        >>> import torch, zckpt
        >>> from zckpt.tree import flatten
        >>> r = report(flatten({"w": torch.zeros(2)})[0], zckpt.ZeroSpec(2, 3), None)
        >>> sorted(r), r["spec"]["stage"]
        (['dir', 'spec', 'tensors'], 3)
    """
    return {
        "tensors": None if skeleton is None else structure_digest(skeleton),
        "spec": None if skeleton is None else spec.to_dict(),
        "dir": where,
    }


class Disagreement(NamedTuple):
    """Why a save is void (``why``), what differs (``what``, each odd rank's error text) and
    the ranks that differ from the lowest one (``odd``)."""

    why: str
    what: str
    odd: list[int]


def disagreement(
    reports: Sequence[dict[str, Any]], structures: Callable[[], Sequence[Structure | None]]
) -> Disagreement | None:
    """Why the ranks' :func:`report` values make the save void; None when they agree.
    ``structures`` gathers every rank's :func:`structure` (an exchange, asked for only when
    the digests differ). Every rank sees every report, so every rank reaches the same answer.

    Example:
        >>> a = {"tensors": 1, "spec": {"stage": 3}, "dir": None}
        >>> disagreement([a, a], list) is None
        True
        >>> disagreement([a, dict(a, spec={"stage": 2})], list).odd
        [1]
    """
    dirs = [r["dir"] for r in reports]
    specs = [r["spec"] for r in reports]
    digests = [r["tensors"] for r in reports]
    if len(set(dirs) - {None}) > 1:
        odd = _odd(dirs)
        first = _given(dirs)[0][0]
        what = f"rank {first} wrote to {dirs[first]}, rank {odd[0]} to {dirs[odd[0]]}"
        why = f"the ranks saved to different places: {what}; every rank must pass the same save_dir"
        return Disagreement(why, what, odd)
    spec = spec_difference(specs)
    if spec is not None:
        why = (
            f"the ranks were given different specs: {spec}; every rank must pass the same ZeroSpec"
        )
        return Disagreement(why, spec, _odd(specs))
    if len(set(digests) - {None}) > 1:
        what = first_difference(structures()) or "their tensors differ"
        odd = _odd(digests)
        ranks = ", ".join(map(str, odd[:8])) + (f" and {len(odd) - 8} more" if len(odd) > 8 else "")
        who = f"ranks {ranks} differ" if len(odd) > 1 else f"rank {ranks} differs"
        why = (
            f"the ranks were given states with different tensors ({who} from rank "
            f"{_given(digests)[0][0]}): {what}; every rank must save the same state structure "
            "(its own shard of it)"
        )
        return Disagreement(why, what, odd)
    return None


def first_difference(structures: Sequence[Structure | None]) -> str | None:
    """The first way a rank's tensors differ from those of the lowest rank that has any (None
    for a rank that wrote nothing, which is not compared); None when all agree.

    Example:
        >>> first_difference([[("w", "float32", (2,))], None, [("w", "float32", (2,))]]) is None
        True
        >>> w, x = ("w", "float32", (2,)), ("x", "int64", ())
        >>> first_difference([[w], [w, x]])
        "rank 1 has tensor 'x' (int64 ()), which rank 0 does not"
    """
    given = _given(structures)
    if not given:
        return None
    r0, base = given[0]
    want = {n: (d, tuple(s)) for n, d, s in base}
    for r, other in given[1:]:
        got = {n: (d, tuple(s)) for n, d, s in other}
        for n, d, s in base:
            if n not in got:
                return f"rank {r0} has tensor {n!r} ({_show((n, d, s))}), which rank {r} does not"
            if got[n] != (d, tuple(s)):
                return (
                    f"tensor {n!r} is {_show((n, d, s))} on rank {r0} but "
                    f"{_show((n, *got[n]))} on rank {r}"
                )
        for n, d, s in other:
            if n not in want:
                return f"rank {r} has tensor {n!r} ({_show((n, d, s))}), which rank {r0} does not"
        if [n for n, _, _ in other] != [n for n, _, _ in base]:
            return f"ranks {r0} and {r} list the same tensors in another order (or tied otherwise)"
    return None


def spec_difference(specs: Sequence[dict[str, Any] | None]) -> str | None:
    """The first field in which a rank's spec (``ZeroSpec.to_dict()``, None for a rank that
    wrote nothing) differs from the lowest rank's; None when all agree.

    Example:
        >>> a, b = {"world_size": 2, "stage": 3}, {"world_size": 2, "stage": 2}
        >>> spec_difference([a, b])
        'rank 0 saved with stage=3, rank 1 with stage=2'
        >>> spec_difference([a, None, a]) is None
        True
    """
    given = _given(specs)
    for r, s in given[1:]:
        r0, base = given[0]
        for key in sorted(set(base) | set(s)):
            a, b = base.get(key), s.get(key)
            if a != b:
                return f"rank {r0} saved with {key}={a!r}, rank {r} with {key}={b!r}"
    return None
