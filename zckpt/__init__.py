"""zckpt: sharded (ZeRO-style) training checkpoints without pickle.

A pure core maps ``(state, ZeroSpec)`` to shard records and msgpack+zstd blobs and back; effectful
edges (directories, ``torch.distributed``, the CLI) sit on top. See ``docs/architecture.md``.

Example:
    >>> import torch, zckpt
    >>> state = {"master": {"w": torch.randn(10)}, "step": 3}
    >>> plan = zckpt.plan_shards(state, zckpt.ZeroSpec(world_size=4, stage=2))
    >>> blobs = [zckpt.encode_shard(zckpt.shard_state(state, plan, r)) for r in range(4)]
    >>> back = zckpt.consolidate([zckpt.decode_shard(b) for b in blobs])
    >>> torch.equal(back["master"]["w"], state["master"]["w"]), back["step"]
    (True, 3)
"""

from zckpt import tree
from zckpt.errors import (
    ChecksumError,
    CoverageError,
    FormatError,
    SpecError,
    StateError,
    TruncatedError,
    VersionError,
    ZckptError,
)
from zckpt.shard import Shard, shard_from_local, shard_state
from zckpt.spec import FlatGroup, Fragment, Placement, ShardPlan, ZeroSpec, plan_shards

__version__ = "0.1.0"

__all__ = [
    "ChecksumError",
    "CoverageError",
    "FlatGroup",
    "FormatError",
    "Fragment",
    "Placement",
    "Shard",
    "ShardPlan",
    "SpecError",
    "StateError",
    "TruncatedError",
    "VersionError",
    "ZckptError",
    "ZeroSpec",
    "__version__",
    "plan_shards",
    "shard_from_local",
    "shard_state",
    "tree",
]
