"""One rank of an FSDP2 run saved and resumed through zckpt (gloo, file rendezvous):
``python fsdp_child.py RANK WORLD_SIZE WORK MODE``.

``MODE`` ``train``: an FSDP2 (``fully_shard``) model and AdamW take one step, the model and
optimizer state dicts (DTensors, ``Shard(0)``) are saved with ``zckpt.save_checkpoint`` (each rank
its own shards), then two more steps run; rank 0 writes ``WORK/expected.pt`` (the saved global
values, gathered here by the test, never by zckpt) and ``WORK/losses_train.pt``.
``MODE`` ``resume``: a fresh FSDP2 model and AdamW at this world size, their state dicts made
as a real resume makes them (``get_model_state_dict``/``get_optimizer_state_dict``), loaded in
place with ``zckpt.load_checkpoint(into=...)``, handed back with ``set_optimizer_state_dict``;
rank 0 writes the loaded global values and the next two steps' losses (``losses_resume.pt``).

Gradients are made identical at any world size: only rank 0's loss has a gradient, and the
reduce-scatter sums (divide factor 1), so the sum is rank 0's gradient exactly.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, init_device_mesh

import zckpt
from zckpt.dist import TorchComm


def build(ws: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    # 5 and 7 rows: uneven Shard(0) at 2 and 3 ranks; the 3-row layer leaves a rank empty at 4.
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 7))
    mesh = init_device_mesh("cpu", (ws,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for m in (model[0], model[2], model):
        assert isinstance(m, FSDPModule)
        m.set_gradient_divide_factor(1.0)  # each FSDP module's own parameters: a sum
        m.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    return model, opt


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, i: int) -> float:
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(100 + i))
    loss = model(x).square().mean()
    scale = 1.0 if dist.get_rank() == 0 else 0.0
    (loss * scale).backward()
    opt.step()
    opt.zero_grad()
    return float(loss.detach())


def full(state: Any) -> Any:
    """Every DTensor of a state as its full tensor (a gather: the test's check only)."""
    if isinstance(state, dict):
        return {k: full(v) for k, v in state.items()}
    if isinstance(state, list):
        return [full(v) for v in state]
    if isinstance(state, DTensor):
        return state.full_tensor().clone()
    if isinstance(state, torch.Tensor):
        return state.clone()
    return state


def main() -> None:
    rank, ws, work, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"file://{work}/rdv-{mode}", rank=rank, world_size=ws)
    try:
        model, opt = build(ws)
        ckpt = os.path.join(work, "ckpt")
        if mode == "train":
            step(model, opt, 0)
            state = {
                "module": get_model_state_dict(model),
                "optimizer": get_optimizer_state_dict(model, opt),
            }
            zckpt.save_checkpoint(ckpt, state, comm=TorchComm(), tag="step1")
            saved = full(state)
            losses = [step(model, opt, 1), step(model, opt, 2)]
        else:
            state = {
                "module": get_model_state_dict(model),
                "optimizer": get_optimizer_state_dict(model, opt),
            }
            got = zckpt.load_checkpoint(ckpt, into=state)
            assert got.state["module"]["0.weight"] is state["module"]["0.weight"]
            set_optimizer_state_dict(model, opt, got.state["optimizer"])
            saved = full(got.state)
            losses = [step(model, opt, 1), step(model, opt, 2)]
        if rank == 0:
            torch.save(saved, os.path.join(work, f"values_{mode}.pt"))
            torch.save(losses, os.path.join(work, f"losses_{mode}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
