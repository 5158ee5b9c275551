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

from typing import TYPE_CHECKING

from zckpt._lazy import attach

__version__ = "0.1.0"

if TYPE_CHECKING:
    from zckpt import tree
    from zckpt.adapters import Checkpointer, restore_training_state, spec_for, training_state
    from zckpt.assemble import consolidate, fp32_state_dict, reshard
    from zckpt.errors import (
        AllocationError,
        ArgumentError,
        CastError,
        ChecksumError,
        CoverageError,
        FormatError,
        SpecError,
        StateError,
        TruncatedError,
        VersionError,
        ZckptError,
    )
    from zckpt.format import (
        decode_fragment,
        decode_header,
        decode_shard,
        encode_shard,
        encode_shard_parts,
        verify_blob,
    )
    from zckpt.shard import LocalBox, Shard, shard_from_local, shard_state
    from zckpt.spec import FlatGroup, Fragment, Placement, ShardPlan, ZeroSpec, plan_shards
    from zckpt.store import (
        AsyncSaver,
        Checkpoint,
        CheckpointNotFoundError,
        LazyTensor,
        Loaded,
        LoadError,
        LocalStorage,
        PendingSave,
        Saved,
        SaveError,
        StorageError,
        TagError,
        TagReport,
        apply_retention,
        clean,
        default_saver,
        get_fp32_state_dict_from_zero_checkpoint,
        list_tags,
        load_checkpoint,
        open_checkpoint,
        save_checkpoint,
        verify_checkpoint,
    )

__getattr__, __dir__ = attach(
    __name__,
    {
        "zckpt.adapters": (
            "Checkpointer",
            "restore_training_state",
            "spec_for",
            "training_state",
        ),
        "zckpt.assemble": (
            "consolidate",
            "fp32_state_dict",
            "reshard",
        ),
        "zckpt.errors": (
            "AllocationError",
            "CastError",
            "ArgumentError",
            "ChecksumError",
            "CoverageError",
            "FormatError",
            "SpecError",
            "StateError",
            "TruncatedError",
            "VersionError",
            "ZckptError",
        ),
        "zckpt.format": (
            "decode_fragment",
            "decode_header",
            "decode_shard",
            "encode_shard",
            "encode_shard_parts",
            "verify_blob",
        ),
        "zckpt.shard": (
            "LocalBox",
            "Shard",
            "shard_from_local",
            "shard_state",
        ),
        "zckpt.spec": (
            "FlatGroup",
            "Fragment",
            "Placement",
            "ShardPlan",
            "ZeroSpec",
            "plan_shards",
        ),
        "zckpt.store": (
            "AsyncSaver",
            "Checkpoint",
            "CheckpointNotFoundError",
            "LazyTensor",
            "Loaded",
            "LoadError",
            "LocalStorage",
            "PendingSave",
            "Saved",
            "SaveError",
            "StorageError",
            "TagError",
            "TagReport",
            "apply_retention",
            "clean",
            "default_saver",
            "get_fp32_state_dict_from_zero_checkpoint",
            "list_tags",
            "load_checkpoint",
            "open_checkpoint",
            "save_checkpoint",
            "verify_checkpoint",
        ),
    },
)

__all__ = [
    "AsyncSaver",
    "Checkpoint",
    "Checkpointer",
    "CheckpointNotFoundError",
    "ChecksumError",
    "AllocationError",
    "CastError",
    "ArgumentError",
    "CoverageError",
    "FlatGroup",
    "FormatError",
    "Fragment",
    "LazyTensor",
    "LoadError",
    "LocalBox",
    "Loaded",
    "PendingSave",
    "Placement",
    "SaveError",
    "Saved",
    "Shard",
    "ShardPlan",
    "SpecError",
    "StateError",
    "LocalStorage",
    "StorageError",
    "TagError",
    "TagReport",
    "TruncatedError",
    "VersionError",
    "ZckptError",
    "ZeroSpec",
    "__version__",
    "apply_retention",
    "clean",
    "consolidate",
    "decode_fragment",
    "default_saver",
    "decode_header",
    "decode_shard",
    "encode_shard",
    "encode_shard_parts",
    "verify_blob",
    "fp32_state_dict",
    "get_fp32_state_dict_from_zero_checkpoint",
    "list_tags",
    "load_checkpoint",
    "open_checkpoint",
    "plan_shards",
    "reshard",
    "restore_training_state",
    "save_checkpoint",
    "verify_checkpoint",
    "shard_from_local",
    "shard_state",
    "spec_for",
    "training_state",
    "tree",
]
