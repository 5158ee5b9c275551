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

from collections.abc import Sequence
from typing import Any

import msgpack
import xxhash

from zckpt.tree import Skeleton

__all__ = ["first_difference", "spec_difference", "structure", "structure_digest"]

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
    """An xxh3_64 of :func:`structure`: equal on two ranks when their tensors agree.

    Example:
        >>> import torch
        >>> from zckpt.tree import flatten
        >>> d = structure_digest
        >>> d(flatten({"w": torch.zeros(2)})[0]) == d(flatten({"w": torch.ones(2)})[0])
        True
        >>> d(flatten({"w": torch.zeros(2)})[0]) == d(flatten({"v": torch.zeros(2)})[0])
        False
    """
    packed = msgpack.packb([[n, d, list(s)] for n, d, s in structure(skeleton)])
    return int(xxhash.xxh3_64_intdigest(packed))


def _show(entry: tuple[str, str, Sequence[int]]) -> str:
    return f"{entry[1]} {tuple(entry[2])}"


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
    given = [(r, s) for r, s in enumerate(structures) if s is not None]
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
    given = [(r, s) for r, s in enumerate(specs) if s is not None]
    for r, s in given[1:]:
        r0, base = given[0]
        for key in sorted(set(base) | set(s)):
            a, b = base.get(key), s.get(key)
            if a != b:
                return f"rank {r0} saved with {key}={a!r}, rank {r} with {key}={b!r}"
    return None
