"""Writes real DCP checkpoints with torch.distributed.checkpoint, one rank per process (gloo,
file rendezvous): ``python dcp_child.py RANK WORLD_SIZE WORK KIND``.

``KIND`` is ``dtensor`` (DTensors sharded Shard(0), Shard(1), Replicate, uneven sizes, plus a
plain tensor and non-tensor values) or ``fsdp`` (an FSDP2 ``fully_shard`` model and its Adam
optimizer after one step, saved through ``get_state_dict``). Rank 0 also writes
``WORK/expected.pt``: the full tensors each DTensor was distributed from.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh


def full_tensors() -> dict[str, torch.Tensor]:
    """The full tensors behind the DTensors (the same on every rank: one seed)."""
    g = torch.Generator().manual_seed(1234)
    return {
        "rows": torch.randn(7, 5, generator=g),
        "cols": torch.randn(4, 5, generator=g).bfloat16(),
        "rep": torch.randint(-100, 100, (3, 2), generator=g),
        "vec": torch.randn(10, generator=g),
        "cube": torch.randn(2, 5, 3, generator=g).half(),
        "tiny": torch.randn(2, generator=g),
    }


PLACEMENTS: dict[str, Any] = {
    "rows": Shard(0),
    "cols": Shard(1),
    "rep": Replicate(),
    "vec": Shard(0),
    "cube": Shard(1),
    "tiny": Shard(0),  # fewer rows than ranks at 3: one rank holds nothing
}


def dtensor_state(ws: int) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (ws,))
    full = full_tensors()
    model = {k: distribute_tensor(v, mesh, [PLACEMENTS[k]]) for k, v in full.items()}
    return {
        "model": model,
        "plain": torch.arange(6, dtype=torch.int32),
        "extra": {"epoch": 3, "lr": 0.5, "names": ["a", "b"]},
    }


def fsdp_state(ws: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    mesh = init_device_mesh("cpu", (ws,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 5)).sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}, full


def main() -> None:
    rank, ws, work, kind = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group(
        "gloo", init_method=f"file://{work}/rendezvous", rank=rank, world_size=ws
    )
    try:
        if kind == "dtensor":
            state, full = dtensor_state(ws), full_tensors()
        else:
            state, full = fsdp_state(ws)
        dcp.save(state, checkpoint_id=os.path.join(work, "ckpt"))
        if rank == 0:
            torch.save(full, os.path.join(work, "expected.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
