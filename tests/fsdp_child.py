"""One rank of an FSDP2 run saved and resumed through zckpt (gloo, file rendezvous):
``python fsdp_child.py RANK WORLD_SIZE WORK MODE``.

``MODE`` ``train``: an FSDP2 (``fully_shard``) model and AdamW take one step, the model and
optimizer state dicts (DTensors, ``Shard(0)``) are saved with ``zckpt.save_checkpoint`` (each rank
its own shards), then two more steps run; rank 0 writes ``WORK/values_train.pt`` (the saved global
values, gathered here by the test, never by zckpt) and ``WORK/losses_train.pt``.
``MODE`` ``grid`` (4 ranks): DTensors of every supported placement on a (2, 2) mesh, saved
(synchronously, and asynchronously as ``g2``); ``Partial()`` and strided ones refused.
``MODE`` ``row`` (3 ranks): those tensors loaded into DTensors
sharded otherwise on a 1-D mesh, each rank's local tensor checked against the same full values.
``MODE`` ``tied_train`` and ``tied_resume``: the same with one weight in two layers
(``get_model_state_dict`` gives two DTensor objects over its one local memory), saved once.
``MODE`` ``resume``: a fresh FSDP2 model and AdamW at this world size, their state dicts made
as a real resume makes them (``get_model_state_dict``/``get_optimizer_state_dict``), loaded in
place with ``zckpt.load_checkpoint(into=...)``, handed back with ``set_optimizer_state_dict``;
rank 0 writes the loaded global values (``values_resume.pt``) and the next two steps'
losses (``losses_resume.pt``).

Gradients are made identical at any world size: only rank 0's loss has a gradient, and the
reduce-scatter sums (divide factor 1), so the sum is rank 0's gradient exactly.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import (
    DTensor,
    Partial,
    Replicate,
    Shard,
    distribute_tensor,
    init_device_mesh,
)

import zckpt
from zckpt.dist import TorchComm


def build(ws: int, tied: bool = False) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (ws,))
    if tied:  # one weight in two layers (as tied embeddings): one FSDP group, 4 rows at 3 ranks
        model = torch.nn.Sequential(
            torch.nn.Linear(4, 4, bias=False), torch.nn.Tanh(), torch.nn.Linear(4, 4, bias=False)
        )
        model[2].weight = model[0].weight
        fully_shard(model, mesh=mesh)
        model.set_gradient_divide_factor(1.0)
        model.set_force_sum_reduction_for_comms(True)
        return model, torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    # 5 and 7 rows: uneven Shard(0) at 2 and 3 ranks; the 3-row layer leaves a rank empty at 4.
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 7))
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


def grid_values() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {
        "a": torch.randn(7, 5, generator=g),
        "b": torch.randn(4, 6, generator=g).bfloat16(),
        "c": torch.randint(-9, 9, (5, 3), generator=g),
        "d": torch.randn(3, generator=g),
        "e": torch.randn(2, 9, generator=g).half(),
        "f": torch.randn(1, 4, generator=g),
        "s": torch.tensor(2.5),
    }


GRID: dict[str, Any] = {
    "a": (Shard(0), Shard(1)),
    "b": (Replicate(), Shard(1)),
    "c": (Shard(0), Replicate()),
    "d": (Replicate(), Replicate()),
    "e": (Shard(1), Shard(1)),  # one tensor dimension split by both mesh dimensions
    "f": (Shard(0), Shard(0)),  # one row over four ranks: three hold nothing
    "s": (Replicate(), Replicate()),
}


def grid(work: str, ws: int) -> None:
    mesh = init_device_mesh("cpu", (2, ws // 2), mesh_dim_names=("dp", "tp"))
    full = grid_values()
    state = {
        "model": {k: distribute_tensor(v, mesh, list(GRID[k])) for k, v in full.items()},
        "plain": torch.arange(4),
        "epoch": 3,
    }
    comm = TorchComm()
    zckpt.save_checkpoint(os.path.join(work, "grid"), state, comm=comm, tag="g")
    # An asynchronous save snapshots the local blocks: training may change them at once.
    pending = zckpt.save_checkpoint(
        os.path.join(work, "grid"), state, comm=comm, tag="g2", save_latest=False, async_=True
    )
    for v in state["model"].values():
        v.to_local().zero_()
    pending.wait()
    partial = DTensor.from_local(torch.ones(2), mesh, [Partial(), Replicate()])
    # Refused on every rank, before anything is written.
    with pytest.raises(zckpt.StateError, match=r"^p: placement P\(sum\) .*Partial"):
        zckpt.save_checkpoint(os.path.join(work, "bad"), {"p": partial}, comm=TorchComm(), tag="p")
    # FSDP2 over a tensor-parallel dimension: an interleaved layout, refused the same way.
    from torch.distributed.tensor.placement_types import _StridedShard

    strided = DTensor.from_local(
        torch.ones(2, 2), mesh, [_StridedShard(0, split_factor=2), Shard(0)]
    )
    with pytest.raises(zckpt.StateError, match=r"^q: placement _S\(0, 2\) .*\(strided sharding"):
        zckpt.save_checkpoint(os.path.join(work, "bad"), {"q": strided}, comm=comm, tag="q")
    assert not os.path.exists(os.path.join(work, "bad", "p", "manifest.zckm"))
    assert not os.path.exists(os.path.join(work, "bad", "q", "manifest.zckm"))


def row(work: str, ws: int) -> None:
    mesh = init_device_mesh("cpu", (ws,))
    full = grid_values()
    into = {
        "model": {
            k: distribute_tensor(
                torch.zeros_like(v), mesh, [Shard(v.dim() - 1) if v.dim() else Replicate()]
            )
            for k, v in full.items()
        }
    }
    got = zckpt.load_checkpoint(os.path.join(work, "grid"), into=into)
    for k, v in full.items():
        dt = into["model"][k]
        assert got.state["model"][k] is dt
        want = distribute_tensor(v, mesh, list(dt.placements)).to_local()
        assert torch.equal(dt.to_local(), want), (k, dt.to_local(), want)
    assert got.state["epoch"] == 3 and torch.equal(got.state["plain"], torch.arange(4))
    # A destination of another global shape or dtype is refused, naming the tensor.
    wrong = {"model": {"a": distribute_tensor(torch.zeros(7, 6), mesh, [Shard(0)])}}
    with pytest.raises(zckpt.LoadError, match=r"into=model/a: .*\[7, 6\] tensor"):
        zckpt.load_checkpoint(os.path.join(work, "grid"), into=wrong)
    with open(os.path.join(work, f"row_ok_{dist.get_rank()}"), "w") as f:
        f.write("ok")


def main() -> None:
    rank, ws, work, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group(
        "gloo", init_method=f"file://{work}/rdv-{mode}", rank=rank, world_size=ws
    )
    try:
        if mode in ("grid", "row"):
            (grid if mode == "grid" else row)(work, ws)
            dist.barrier()
            return
        tied = mode.startswith("tied_")
        model, opt = build(ws, tied)
        ckpt = os.path.join(work, "ckpt_tied" if tied else "ckpt")
        if mode in ("train", "tied_train"):
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
            if tied:  # both names are the one parameter again
                assert model[0].weight is model[2].weight
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
