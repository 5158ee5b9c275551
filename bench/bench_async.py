"""How long an asynchronous save blocks training, against a synchronous save of the same state.

Saves one rank's state (bf16 weights, fp32 masters, Adam moments; raw codec, durable: fsync and
rename as always) into a directory on the filesystem under test, and reports medians of
``--reps`` runs (min-max in brackets):

* ``sync``: ``save_checkpoint(...)`` until it returns (committed).
* ``async blocked``: ``save_checkpoint(..., async_=saver)`` until the handle returns, with the
  staging memory already allocated (every save after the first); ``first`` is the first save,
  which also pays the page faults of fresh staging memory.
* ``async total``: until ``wait()`` returns (committed).

The issue's target is ``blocked / sync <= 0.15``. ``--profile`` splits the blocked time into the
agreement round (``prepare_save``) and the snapshot copy; ``--copy-bench`` times the snapshot
copy alone with torch ``copy_`` (what the saver uses) and with :func:`zckpt.kernels.copy_ranges`
(run after the saves, so both copy right after training-like OpenMP work, as a saver does);
``--interference`` times a CPU matmul loop while a save writes in the background, against the
same loop alone.

    .venv/bin/python bench/bench_async.py                       # 512 MiB, 5 repetitions
    .venv/bin/python bench/bench_async.py --gib 0.05 --reps 2   # smoke size
    .venv/bin/python bench/bench_async.py --device cuda         # a GPU's state, pinned staging
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from _common import training_state  # bench/ is sys.path[0]

import zckpt
from zckpt.kernels import copy_ranges
from zckpt.store import AsyncSaver
from zckpt.store._async import _snapshot
from zckpt.store._prepare import prepare_save


def nbytes(state: Any) -> int:
    return sum(t.numel() * t.element_size() for t in zckpt.tree.flatten(state)[1])


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):8.4f} s  [{min(xs):.4f}-{max(xs):.4f}]"


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def touch(state: Any) -> None:
    """A training step's in-place update, so each save sees new data."""
    for t in zckpt.tree.flatten(state)[1]:
        if t.is_floating_point():
            t.mul_(1.0001)
    if torch.cuda.is_available():  # the step is done before the clock starts
        torch.cuda.synchronize()


def copy_bench(state: Any, reps: int) -> None:
    tensors = [t.reshape(-1) for t in zckpt.tree.flatten(state)[1]]
    total = sum(t.numel() * t.element_size() for t in tensors)
    arena = torch.empty(total + 64 * len(tensors), dtype=torch.uint8)
    arena.fill_(0)  # fault it in: both methods copy into warm memory, as a reused arena is
    dst8 = arena.numpy()

    def with_torch() -> None:
        off = 0
        for t in tensors:
            n = t.numel() * t.element_size()
            arena[off : off + n].view(t.dtype).copy_(t)
            off += -(-n // 64) * 64

    def with_kernels() -> None:
        off = 0
        for t in tensors:
            n = t.numel() * t.element_size()
            table = np.array([[0, off, n]], np.int64)
            copy_ranges(dst8, t.view(torch.uint8).numpy(), table)
            off += -(-n // 64) * 64

    for name, fn in (("torch copy_", with_torch), ("copy_ranges", with_kernels)):
        fn()  # warm-up (compiles the kernel on first use)
        ts = [timed(fn)[0] for _ in range(reps)]
        print(
            f"snapshot copy, {name:12s} {fmt(ts)}  {total / statistics.median(ts) / 1e9:.1f} GB/s"
        )


def interference(state: Any, root: str, saver: AsyncSaver, spec: zckpt.ZeroSpec) -> None:
    a = torch.randn(512, 512)

    def work() -> None:
        for _ in range(200):
            a @ a

    work()
    alone = statistics.median(timed(work)[0] for _ in range(3))
    pending = zckpt.save_checkpoint(root, state, spec, tag="interf", async_=saver, keep_last=2)
    during = timed(work)[0]
    still = not pending.done()
    pending.wait()
    print(
        f"matmul loop alone {alone:.3f} s, while a save writes {during:.3f} s "
        f"({during / alone:.2f}x; save still running at the end: {still})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=0.5, help="state size in GiB (default 0.5)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", default=None, help="parent directory of the checkpoints (a tmpdir)")
    ap.add_argument("--profile", action="store_true", help="split the blocked time")
    ap.add_argument("--copy-bench", action="store_true", help="torch copy_ vs copy_ranges")
    ap.add_argument("--interference", action="store_true", help="training slowed by a save")
    ap.add_argument("--device", default="cpu", help="where the state lives (cpu, cuda)")
    args = ap.parse_args()

    state = training_state(args.gib)
    if args.device != "cpu":  # a GPU's state: the snapshot is a D2H copy into pinned staging
        skel, leaves = zckpt.tree.flatten(state)
        state = zckpt.tree.unflatten(skel, [t.to(args.device) for t in leaves])
    spec = zckpt.ZeroSpec(1, 2)  # one rank's share: this process writes all of it
    root = tempfile.mkdtemp(prefix="zckpt-bench-async-", dir=args.dir)
    print(
        f"{platform.machine()} {platform.processor() or ''} cores={len(os.sched_getaffinity(0))} "
        f"torch={torch.__version__} threads={torch.get_num_threads()} dir={root} "
        f"device={args.device}"
    )
    print(f"state: {nbytes(state) / 2**20:.0f} MiB, codec raw, durable, reps={args.reps}")
    try:
        saver = AsyncSaver()
        touch(state)
        first, p = timed(lambda: zckpt.save_checkpoint(
            root, state, spec, tag="first", async_=saver, keep_last=2))  # fmt: skip
        p.wait()
        # Alternate the two kinds, so that drift (page cache, disk) affects both alike.
        sync, blocked, total = [], [], []
        for i in range(args.reps):
            touch(state)
            sync.append(timed(lambda i=i: zckpt.save_checkpoint(
                root, state, spec, tag=f"s{i}", keep_last=2))[0])  # fmt: skip
            touch(state)
            t0 = time.perf_counter()
            p = zckpt.save_checkpoint(root, state, spec, tag=f"a{i}", async_=saver, keep_last=2)
            blocked.append(time.perf_counter() - t0)
            p.wait()
            total.append(time.perf_counter() - t0)
        print(f"sync save            {fmt(sync)}")
        print(f"async blocked        {fmt(blocked)}   (first save: {first:.4f} s)")
        print(f"async total          {fmt(total)}")
        ratio = statistics.median(blocked) / statistics.median(sync)
        verdict = "met" if ratio <= 0.15 else "NOT met"
        print(f"blocked / sync = {ratio:.3f}  (target <= 0.15: {verdict})")

        if args.profile:
            prep, snap = [], []
            for i in range(args.reps):
                dt, prepared = timed(lambda i=i: prepare_save(root, state, spec, tag=f"p{i}"))
                prep.append(dt)
                snap.append(timed(lambda pr=prepared: _snapshot(pr, saver._arena, None))[0])
            gbs = nbytes(state) / statistics.median(snap) / 1e9
            print(f"  prepare_save       {fmt(prep)}")
            print(f"  snapshot copy      {fmt(snap)}   {gbs:.1f} GB/s")
        if args.copy_bench:
            copy_bench(state, args.reps)
        if args.interference:
            interference(state, root, saver, spec)
        saver.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
