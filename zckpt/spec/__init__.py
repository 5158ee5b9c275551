"""Partition specs and shard plans (pure): which rank owns which range of which tensor.

Example:
    >>> import torch, zckpt
    >>> plan = zckpt.plan_shards({"master": {"w": torch.zeros(5)}}, zckpt.ZeroSpec(2, 1))
    >>> [f.numel for f in plan.writes[0]], [f.numel for f in plan.writes[1]]
    ([4], [1])
"""

from zckpt.spec._boxes import Box, box_runs, box_writer, mesh_box, mesh_coordinate
from zckpt.spec._plan import FlatGroup, Fragment, Placement, ShardPlan, plan_shards
from zckpt.spec._spec import ZeroSpec

__all__ = [
    "Box",
    "FlatGroup",
    "Fragment",
    "Placement",
    "ShardPlan",
    "ZeroSpec",
    "box_runs",
    "box_writer",
    "mesh_box",
    "mesh_coordinate",
    "plan_shards",
]
