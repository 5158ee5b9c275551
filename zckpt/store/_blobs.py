"""What each rank of a save writes: its shards (frozen parameters dropped, MoE experts split
into blobs of their own), the client state's shard, each blob file written durably, and the
:class:`~zckpt.store._records.FileRecord` the manifest is made of. The protocol that orders
these writes and commits them is :mod:`zckpt.store._prepare` then :mod:`zckpt.store._commit`."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from zckpt.errors import StateError
from zckpt.format import _encode, encode_shard_parts, encode_shard_stream
from zckpt.format._header import as_bytes_view, parse_preamble
from zckpt.shard import Shard, shard_state
from zckpt.spec import ShardPlan, ZeroSpec, plan_shards
from zckpt.store._manifest import FileRecord
from zckpt.store._storage import Storage
from zckpt.tree import Skeleton, flatten

__all__ = [
    "check_client_state",
    "client_shard",
    "drop_frozen",
    "plan_for",
    "split_experts",
    "write_blob",
]


def drop_frozen(state: Any, frozen: Iterable[str]) -> Any:
    """The state without any dict entry keyed by a frozen parameter name.

    Example:
        >>> drop_frozen({"module": {"a": 1, "f": 2}, "master": {"a": 3}}, ["f"])
        {'module': {'a': 1}, 'master': {'a': 3}}
    """
    names = set(frozen)
    if not names:
        return state

    def walk(x: Any) -> Any:
        if isinstance(x, Mapping):
            return {k: walk(v) for k, v in x.items() if k not in names}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, tuple):
            return tuple(walk(v) for v in x)
        return x

    return walk(state)


def check_client_state(client_state: Any) -> Any:
    """``client_state`` as the dict a save writes ({} for None), or a StateError.

    Example:
        >>> check_client_state(None), check_client_state({"step": 3})
        ({}, {'step': 3})
    """
    if client_state is None:
        return {}
    if not isinstance(client_state, Mapping):
        raise StateError(f"client_state must be a dict, got {type(client_state).__name__}")
    try:
        flatten(client_state)
    except StateError as e:
        raise StateError(f"client_state: {e}") from None
    return dict(client_state)


def write_blob(
    storage: Storage,
    tag_dir: str,
    name: str,
    shard: Shard,
    rank: int,
    enc: Mapping[str, Any],
    expert: int = -1,
) -> FileRecord:
    """Write ``shard`` as the blob ``tag_dir/name`` durably; its record for the manifest."""
    # Raw frames of CPU tensors are views of them: written at once, nothing to overlap.
    # Compressed frames, and any frame of a GPU tensor, stream: compression and device-to-host
    # copies run ahead of the writes with a few chunks in host memory, not the whole shard.
    if enc.get("codec", "raw") == "raw" and all(_encode.on_host(t) for t in shard.data):
        buffers = encode_shard_parts(shard, **enc).buffers
        size, digest = storage.write_atomic(os.path.join(tag_dir, name), buffers)
        head = buffers[0]
    else:
        stream = encode_shard_stream(shard, **enc)
        size, digest = storage.write_atomic(os.path.join(tag_dir, name), stream)
        head = stream.head()
    # The index checksum binds the file to the manifest: a load checks it when it reads the
    # header, whatever it reads of the tensor bytes.
    _, index_xxh3 = parse_preamble(as_bytes_view(head), None)
    return FileRecord(name, rank, size, digest, shard.fragments, expert, index_xxh3)


def split_experts(shard: Shard) -> tuple[Shard, dict[int, Shard]]:
    """A rank's shard without its MoE expert tensors, and one shard per expert it writes.

    Example:
        >>> import torch, zckpt
        >>> s = {"module": {"experts.0.w": torch.ones(2), "gate": torch.ones(2)}}
        >>> spec = zckpt.ZeroSpec(1, 1, experts=(r"experts\\.(\\d+)\\.",))
        >>> base, experts = split_experts(zckpt.shard_state(s, zckpt.plan_shards(s, spec), 0))
        >>> len(base.fragments), sorted(experts)
        (1, [0])
    """
    spec, skel = shard.spec, shard.skeleton
    if not spec.experts:
        return shard, {}
    base: list[int] = []
    per: dict[int, list[int]] = {}
    for i, f in enumerate(shard.fragments):
        e = spec.expert_of(skel.paths[f.leaf])
        (base if e is None else per.setdefault(e, [])).append(i)

    def sub(idx: list[int]) -> Shard:
        frags = tuple(shard.fragments[i] for i in idx)
        return Shard(shard.rank, spec, skel, frags, tuple(shard.data[i] for i in idx))

    return sub(base), {e: sub(idx) for e, idx in sorted(per.items())}


def client_shard(client_state: Mapping[str, Any]) -> Shard:
    """The client state as the one shard of its own blob (world size 1).

    Example:
        >>> import torch
        >>> client_shard({"t": torch.ones(3)}).rank
        0
    """
    plan = plan_shards(client_state, ZeroSpec(1, 1))
    return shard_state(client_state, plan, 0)


_PLANS: dict[str, tuple[Skeleton, ZeroSpec, ShardPlan]] = {}


def plan_for(skeleton: Skeleton, spec: ZeroSpec) -> ShardPlan:
    """``plan_shards(skeleton, spec)``, reused while the same skeleton object is saved again
    (a save plans once for its shards and once for the records it reports to rank 0).

    Example:
        >>> import torch, zckpt
        >>> skel = zckpt.tree.flatten({"w": torch.zeros(4)})[0]
        >>> plan_for(skel, zckpt.ZeroSpec(2, 1)) is plan_for(skel, zckpt.ZeroSpec(2, 1))
        True
    """
    hit = _PLANS.get("last")
    if hit is not None and hit[0] is skeleton and hit[1] == spec:
        return hit[2]
    plan = plan_shards(skeleton, spec)
    _PLANS["last"] = (skeleton, spec, plan)
    return plan
