"""Assembling wanted ranges from saved ones (pure): consolidation, resharding, loading.

Example:
    >>> import torch, zckpt
    >>> s = {"master": {"w": torch.arange(4.0)}}
    >>> p = zckpt.plan_shards(s, zckpt.ZeroSpec(2, 1))
    >>> zckpt.consolidate([zckpt.shard_state(s, p, r) for r in (1, 0)])["master"]["w"].tolist()
    [0.0, 1.0, 2.0, 3.0]
"""

from typing import TYPE_CHECKING

from zckpt._lazy import attach

if TYPE_CHECKING:
    from zckpt.assemble._consolidate import (
        Fp32Entry,
        ReshardedShards,
        assemble_fp32,
        consolidate,
        fp32_entries,
        fp32_state_dict,
        fp32_tensors,
        reshard,
        shard_sources,
    )
    from zckpt.assemble._keys import Fp32Key, fp32_keys
    from zckpt.assemble._overlap import Source, SourceIndex, TensorSource, assemble, index_sources

__getattr__, __dir__ = attach(
    __name__,
    {
        "zckpt.assemble._keys": ("Fp32Key", "fp32_keys"),
        "zckpt.assemble._consolidate": (
            "Fp32Entry",
            "ReshardedShards",
            "assemble_fp32",
            "consolidate",
            "fp32_entries",
            "fp32_state_dict",
            "fp32_tensors",
            "reshard",
            "shard_sources",
        ),
        "zckpt.assemble._overlap": (
            "Source",
            "SourceIndex",
            "TensorSource",
            "assemble",
            "index_sources",
        ),
    },
)

__all__ = [
    "Fp32Entry",
    "Fp32Key",
    "ReshardedShards",
    "Source",
    "assemble_fp32",
    "fp32_entries",
    "fp32_keys",
    "SourceIndex",
    "TensorSource",
    "assemble",
    "consolidate",
    "fp32_state_dict",
    "fp32_tensors",
    "index_sources",
    "reshard",
    "shard_sources",
]
