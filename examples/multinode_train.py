"""A data-parallel ZeRO training loop that checkpoints to an S3 store, run by torchrun.

Every rank holds its partition of the fp32 master weights and Adam moments (``ZeroAdamW``) and
saves only that, straight to the object store; any world size resumes from it. Nothing but the
store is shared between nodes::

    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        examples/multinode_train.py --url s3://bucket/run1 --endpoint http://store:9000 \\
        --steps 12 --save-every 2 [--resume]

(``examples/multinode.py`` runs exactly this on two network namespaces, kills one node in the
middle of a save and resumes on 3 ranks.) The credentials come from ``--key``/``--secret``, or
the environment as boto does it.

The loss of each step is printed as a hexadecimal float. It does not depend on the world size,
bit for bit: every rank computes per-sample gradients of its slice of a fixed global batch, they
are all-gathered and summed in sample order (an all-reduce would sum in an order that depends on
the world size), and ``ZeroAdamW``'s update is elementwise. So a run resumed at another world
size can be compared with an uninterrupted one exactly.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from zckpt.adapters import Checkpointer, ZeroAdamW
from zckpt.dist import TorchComm, all_gather_flat
from zckpt.store import FsspecStorage

GLOBAL_BATCH = 24  # split evenly over 1, 2, 3, 4, 6, 8 ranks
IN, OUT = 32, 8


def build_model(hidden: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(IN, hidden),
        torch.nn.GELU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.GELU(),
        torch.nn.Linear(hidden, OUT),
    )


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step`` (the same at any world size)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, IN, generator=g)
    y = torch.sin(x[:, :OUT] * 3.0) + 0.1 * torch.randn(GLOBAL_BATCH, OUT, generator=g)
    return x, y


def gradient_step(model: torch.nn.Module, step: int, rank: int, world_size: int) -> torch.Tensor:
    """Set every parameter's ``.grad`` to the mean gradient over the global batch, reduced in
    sample order; return the mean loss (the same bits at any world size)."""
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    per = GLOBAL_BATCH // world_size
    x, y = batch(step)
    grads = torch.empty(per, numel)
    losses = torch.empty(per)
    for j, i in enumerate(range(rank * per, (rank + 1) * per)):
        for p in params:
            p.grad = None
        loss = torch.nn.functional.mse_loss(model(x[i : i + 1]), y[i : i + 1])
        loss.backward()
        grads[j] = torch.cat(
            [(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params]
        )
        losses[j] = loss.detach()
    every = torch.empty(GLOBAL_BATCH * numel)
    all_gather_flat(every, grads.reshape(-1))
    all_losses = torch.empty(GLOBAL_BATCH)
    all_gather_flat(all_losses, losses)
    mean = every.reshape(GLOBAL_BATCH, numel).sum(0) / GLOBAL_BATCH
    at = 0
    for p in params:
        p.grad = mean[at : at + p.numel()].reshape(p.shape).clone()
        at += p.numel()
    return all_losses.sum() / GLOBAL_BATCH


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="the save_dir, e.g. s3://bucket/run1")
    ap.add_argument("--endpoint", help="the S3 endpoint URL (default: AWS's)")
    ap.add_argument("--key", default=os.environ.get("AWS_ACCESS_KEY_ID"))
    ap.add_argument("--secret", default=os.environ.get("AWS_SECRET_ACCESS_KEY"))
    ap.add_argument("--steps", type=int, default=12, help="train until this global step")
    ap.add_argument("--save-every", type=int, default=2, help="checkpoint every k steps")
    ap.add_argument("--hidden", type=int, default=256, help="MLP width")
    ap.add_argument("--lease", type=float, default=30.0, help="lock lease (s) on the store")
    ap.add_argument("--resume", action="store_true", help="resume from the store's latest")
    args = ap.parse_args(argv)

    import s3fs

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, ws = dist.get_rank(), dist.get_world_size()
    if GLOBAL_BATCH % ws:
        raise SystemExit(f"world size {ws} does not divide the global batch {GLOBAL_BATCH}")
    t0 = time.monotonic()

    def say(*words: object) -> None:
        if rank == 0:
            print("multinode:", *words, f"({time.monotonic() - t0:.2f} s)", flush=True)

    model = build_model(args.hidden)
    opt = ZeroAdamW(model, lr=3e-3, rank=rank, world_size=ws, all_gather=all_gather_flat)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=5)
    # The store, configured explicitly: endpoint, credentials, 5 MiB parts (S3's least: blobs
    # of two parts and more go up as parallel multipart uploads), the lease of its locks.
    fs = s3fs.S3FileSystem(endpoint_url=args.endpoint, key=args.key, secret=args.secret)
    storage = FsspecStorage(fs, part_size=5 << 20, lease=args.lease)
    comm = TorchComm(timeout=datetime.timedelta(seconds=60))  # a dead node: raise, not hang
    ckpt = Checkpointer(model, opt, sched, comm=comm, storage=storage, keep_last=3)

    if args.resume:
        path, _ = ckpt.load_checkpoint(args.url)
        say("resumed", path, "at step", ckpt.global_steps, "world size", ws)

    while ckpt.global_steps < args.steps:
        loss = gradient_step(model, ckpt.global_steps, rank, ws)
        opt.step()
        sched.step()
        ckpt.global_steps += 1
        say(f"step {ckpt.global_steps} loss {float(loss).hex()}")
        if ckpt.global_steps % args.save_every == 0 or ckpt.global_steps == args.steps:
            saved = ckpt.save_checkpoint(args.url, client_state={"world_size": ws})
            say("saved", saved.tag)

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    say("params", flat.sum().item().hex(), flat.abs().sum().item().hex())
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
