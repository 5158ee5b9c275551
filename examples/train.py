"""A data-parallel training loop that checkpoints with zckpt and resumes at any world size.

Run on CPU with gloo, one process per rank::

    torchrun --nproc-per-node 2 examples/train.py --save-dir /tmp/run --steps 20
    # stop it at any moment (Ctrl-C, kill): every committed checkpoint stays loadable
    torchrun --nproc-per-node 3 examples/train.py --save-dir /tmp/run --steps 40 --resume

Each rank computes the loss on its slice of a fixed global batch; ``DistributedDataParallel``
averages the gradients. ``--zero`` swaps ``torch.optim.AdamW`` for zckpt's reference ZeRO
optimizer, where each rank keeps (and saves) only its partition of the fp32 master weights and
Adam moments. Either way the checkpoint loads at another world size: the plain loop reads the
whole state on every rank, the ZeRO loop reads exactly its new partitions.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import zckpt
from zckpt.adapters import Checkpointer, ZeroAdamW
from zckpt.dist import TorchComm, all_gather_flat

GLOBAL_BATCH = 24  # split evenly over 1, 2, 3, 4, 6, 8 ranks


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 64),
        torch.nn.GELU(),
        torch.nn.LayerNorm(64),
        torch.nn.Linear(64, 8),
    )


def batch(step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of the step's global batch (the same data at any world size)."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(GLOBAL_BATCH, 32, generator=g)
    y = torch.sin(x[:, :8] * 3.0) + 0.1 * torch.randn(GLOBAL_BATCH, 8, generator=g)
    return x[rank::world_size], y[rank::world_size]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--save-dir", required=True, help="checkpoint directory")
    parser.add_argument("--steps", type=int, default=20, help="train until this global step")
    parser.add_argument("--save-every", type=int, default=5, help="checkpoint every k steps")
    parser.add_argument("--resume", action="store_true", help="resume from the latest tag")
    parser.add_argument("--zero", action="store_true", help="use the ZeRO partitioned AdamW")
    parser.add_argument("--keep-last", type=int, default=3, help="checkpoints to keep")
    parser.add_argument("--step-delay", type=float, default=0.0, help="seconds per step (demos)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # torchrun's environment: RANK, WORLD_SIZE, MASTER_ADDR...
    rank, world_size = dist.get_rank(), dist.get_world_size()

    model = DistributedDataParallel(build_model())  # averages the gradients over ranks
    params = [
        {"params": [p for n, p in model.module.named_parameters() if n.endswith("weight")]},
        {"params": [p for n, p in model.module.named_parameters() if n.endswith("bias")],
         "weight_decay": 0.0},
    ]  # fmt: skip
    opt: torch.optim.Optimizer
    if args.zero:
        opt = ZeroAdamW(
            model,
            params,
            lr=3e-3,
            rank=rank,
            world_size=world_size,
            all_gather=all_gather_flat,
        )
    else:
        opt = torch.optim.AdamW(params, lr=3e-3)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=10)
    ckpt = Checkpointer(model, opt, sched, comm=TorchComm(), keep_last=args.keep_last)

    if args.resume:
        path, client = ckpt.load_checkpoint(args.save_dir)
        if rank == 0:
            if path is None:
                print(f"nothing to resume in {args.save_dir}: starting at step 0", flush=True)
            else:
                saved_ws = zckpt.open_checkpoint(path).manifest.spec.world_size
                print(
                    f"resumed {path} (saved by {saved_ws} ranks, now {world_size}) at step "
                    f"{ckpt.global_steps}; client_state {client}",
                    flush=True,
                )

    while ckpt.global_steps < args.steps:
        step = ckpt.global_steps
        x, y = batch(step, rank, world_size)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ckpt.global_steps += 1
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0:
            print(f"step {ckpt.global_steps:4d}  loss {total.item() / world_size:.9f}", flush=True)
        if ckpt.global_steps % args.save_every == 0 or ckpt.global_steps == args.steps:
            t0 = time.perf_counter()
            saved = ckpt.save_checkpoint(args.save_dir, client_state={"world_size": world_size})
            if rank == 0:
                ms = (time.perf_counter() - t0) * 1e3
                print(f"saved {saved.path} ({ms:.1f} ms)", flush=True)
        time.sleep(args.step_delay)

    if rank == 0:
        digest = sum(float(p.detach().double().sum()) for p in model.module.parameters())
        print(f"done at step {ckpt.global_steps}; parameter sum {digest!r}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
