"""MoE expert param groups of a DeepSpeed ZeRO 1/2 checkpoint (DeepSpeed's zero_to_fp32 fails on
these; zckpt reads them).

An expert param group (its optimizer param group says ``moe``) is partitioned over an
expert-data-parallel group of ``partition_count`` ranks, not over all ``ws`` ranks: with
``ep = ws // partition_count`` expert-parallel ranks, rank ``r`` holds experts of expert-parallel
rank ``r % ep`` and is member ``r // ep`` of that expert's data-parallel group (DeepSpeed's
default group layout). Every expert-parallel rank names its experts by *local* index in
``param_shapes`` and ``param_slice_mappings`` (``...deepspeed_experts.<j>...``); the global index,
``(r % ep) * num_local + j``, is what the ``layer_L_expert_E_*`` files record, and every derived
name is checked against them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from zckpt.interop._layout import Member, Piece, flat_group_pieces
from zckpt.interop._unpickle import DeepSpeedFormatError

__all__ = ["expert_pieces", "global_expert_name", "local_expert_counts"]

_LOCAL = re.compile(r"(^|\.)deepspeed_experts\.(\d+)(\.|$)")


def _split(name: str) -> tuple[str, int, str]:
    m = _LOCAL.search(name)
    if m is None:
        raise DeepSpeedFormatError(
            f"{name}: in an MoE expert param group, but its name has no 'deepspeed_experts.<i>' "
            "part, so its global expert index cannot be told"
        )
    return name[: m.start(2)], int(m.group(2)), name[m.end(2) :]


def local_expert_counts(names: Iterable[str]) -> dict[str, int]:
    """Local experts per MoE layer (keyed by the name prefix), from the expert params' names.

    Example:
        >>> local_expert_counts(["m.deepspeed_experts.0.w", "m.deepspeed_experts.1.w"])
        {'m.deepspeed_experts.': 2}
    """
    seen: dict[str, set[int]] = {}
    for n in names:
        prefix, j, _ = _split(n)
        seen.setdefault(prefix, set()).add(j)
    return {p: max(js) + 1 for p, js in seen.items()}


def global_expert_name(name: str, ep_rank: int, counts: Mapping[str, int]) -> str:
    """The name an expert-parallel rank's local expert parameter has in the expert files.

    Example:
        >>> global_expert_name("m.deepspeed_experts.1.w", 2, {"m.deepspeed_experts.": 2})
        'm.deepspeed_experts.5.w'
    """
    prefix, j, rest = _split(name)
    return f"{prefix}{ep_rank * counts[prefix] + j}{rest}"


def expert_pieces(
    shapes: Mapping[str, Sequence[int]],
    world_size: int,
    partition_count: int,
    member: Callable[[int], Member],
    counts: Mapping[str, int],
    known: Mapping[str, Sequence[int]],
    where: str,
) -> tuple[dict[str, tuple[int, ...]], list[Piece]]:
    """Global names, shapes and pieces of one expert param group, over every expert-parallel rank.

    Args:
        shapes: the group's local parameter names and shapes.
        world_size: data-parallel ranks of the checkpoint.
        partition_count: ranks the group is partitioned over.
        member: rank -> that rank's :class:`Member` of this group.
        counts: :func:`local_expert_counts` over every expert group.
        known: global name -> shape, from the expert files.
        where: the group, for messages.

    Example:
        >>> s = {"e.deepspeed_experts.0.w": (2,)}
        >>> known = {"e.deepspeed_experts.0.w": (2,), "e.deepspeed_experts.1.w": (2,)}
        >>> names, pieces = expert_pieces(s, 2, 1, lambda r: Member(r, 2, None),
        ...                               {"e.deepspeed_experts.": 1}, known, "g")
        >>> list(names), [(p.name, p.rank) for p in pieces]
        (['e.deepspeed_experts.0.w', 'e.deepspeed_experts.1.w'], [(..., 0), (..., 1)])
    """
    if partition_count < 1 or world_size % partition_count:
        raise DeepSpeedFormatError(
            f"{where}: partition_count {partition_count} does not divide world size {world_size}"
        )
    ep = world_size // partition_count
    out: dict[str, tuple[int, ...]] = {}
    pieces: list[Piece] = []
    for e in range(ep):
        members = [member(r) for r in range(e, world_size, ep)]
        rename = {n: global_expert_name(n, e, counts) for n in shapes}
        for local, name in rename.items():
            shape = tuple(int(s) for s in shapes[local])
            if name not in known:
                raise DeepSpeedFormatError(
                    f"{where}: expert-parallel rank {e}'s {local} should be {name}, which no "
                    "layer_*_expert_* file holds"
                )
            if tuple(known[name]) != shape:
                raise DeepSpeedFormatError(
                    f"{where}: {name} has shape {shape} but {tuple(known[name])} in its expert file"
                )
            out[name] = shape
        got = flat_group_pieces(shapes, members, f"{where}, expert-parallel rank {e}")
        pieces += [p._replace(name=rename[p.name]) for p in got]
    return out, pieces


def is_expert_group(param_group: Any) -> bool:
    """Whether an optimizer param group is an MoE expert group (DeepSpeed marks it ``moe``).

    Example:
        >>> is_expert_group({"moe": True, "lr": 0.1}), is_expert_group({"lr": 0.1})
        (True, False)
    """
    return isinstance(param_group, Mapping) and param_group.get("moe") is True
