"""Throughput of zckpt.kernels against the NumPy reference and the torch way of doing the same.

Usage: ``python bench/bench_kernels.py [--mib N] [--reps R]``

GB/s counts bytes read plus bytes written (10**9 bytes per GB), best of ``--reps`` runs, after
one warm-up run (which also compiles the Numba kernels). ``numba 1t`` calls the public function
with ``threads=1``; ``numba auto`` lets it choose (threads above 8 MiB); ``torch`` runs with
torch's own thread count, printed in the header.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

if importlib.util.find_spec("zckpt") is None:  # run from a checkout: the repository root has it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zckpt import kernels
from zckpt.kernels import _reference


def best_seconds(fn: Callable[[], object], reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def report(name: str, nbytes: int, reps: int, cases: dict[str, Callable[[], object]]) -> None:
    cells = []
    for label, fn in cases.items():
        cells.append(f"{label} {nbytes / best_seconds(fn, reps) / 1e9:6.2f}")
    print(f"{name:<24}" + "  ".join(cells), flush=True)


def bench_copy(mib: int, reps: int, rows: int) -> None:
    n = (mib << 20) // 8
    src = np.random.default_rng(0).integers(0, 2**63, n, dtype=np.uint64)
    dst = np.empty_like(src)
    # ``rows`` equal fragments, gathered in reverse order (as consolidation reassembles them).
    c = n // rows
    table = np.array([[r * c, (rows - 1 - r) * c, c] for r in range(rows)], np.int64)
    ts, td = torch.from_numpy(src), torch.from_numpy(dst)
    rows_list = table.tolist()

    def torch_copy() -> None:
        for s, d, k in rows_list:
            td[d : d + k].copy_(ts[s : s + k])

    report(
        f"copy_ranges {rows} rows",
        2 * rows * c * 8,
        reps,
        {
            "numba 1t": lambda: kernels.copy_ranges(dst, src, table, threads=1),
            "numba auto": lambda: kernels.copy_ranges(dst, src, table),
            "numpy": lambda: _reference.copy_ranges(dst, src, table),
            "torch": torch_copy,
        },
    )


def bench_upcast(mib: int, reps: int, kind: str) -> None:
    n = (mib << 20) // 2  # mib MiB of bf16/fp16 in, 2 * mib MiB of fp32 out
    src = np.random.default_rng(1).integers(0, 2**16, n, dtype=np.uint16)
    dst = np.empty(n, np.float32)
    table = np.array([[0, 0, n]], np.int64)
    ts = torch.from_numpy(src).view(torch.bfloat16 if kind == "bf16" else torch.float16)
    td = torch.from_numpy(dst)
    report(
        f"upcast_ranges {kind}",
        6 * n,
        reps,
        {
            "numba 1t": lambda: kernels.upcast_ranges(dst, src, table, kind, threads=1),  # type: ignore[arg-type]
            "numba auto": lambda: kernels.upcast_ranges(dst, src, table, kind),  # type: ignore[arg-type]
            "numpy": lambda: _reference.upcast_ranges(dst, src, table, kind),
            "torch .float()": lambda: td[0:n].copy_(ts.float()),
            "torch copy_": lambda: td.copy_(ts),
        },
    )


def bench_planes(mib: int, reps: int, k: int) -> None:
    n = (mib << 20) // k
    src = np.random.default_rng(2).integers(0, 256, n * k, dtype=np.uint8)
    planes = np.empty((k, n), np.uint8)
    back = np.empty_like(src)
    ts, tp, tb = torch.from_numpy(src), torch.from_numpy(planes), torch.from_numpy(back)
    report(
        f"split_planes itemsize {k}",
        2 * n * k,
        reps,
        {
            "numba 1t": lambda: kernels.split_planes(src, k, planes, threads=1),
            "numba auto": lambda: kernels.split_planes(src, k, planes),
            "numpy": lambda: _reference.split_planes(src, planes, 0, n),
            "torch": lambda: tp.copy_(ts.view(n, k).t()),
        },
    )
    report(
        f"join_planes itemsize {k}",
        2 * n * k,
        reps,
        {
            "numba 1t": lambda: kernels.join_planes(planes, back, threads=1),
            "numba auto": lambda: kernels.join_planes(planes, back),
            "numpy": lambda: _reference.join_planes(planes, back, 0, n),
            "torch": lambda: tb.view(n, k).copy_(tp.t()),
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="MiB of input per kernel call")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per case (best counts)")
    args = parser.parse_args()
    print(
        f"{args.mib} MiB per call; GB/s = (read + written) / time; backend {kernels.backend()}; "
        f"torch threads {torch.get_num_threads()}; CPUs {os.cpu_count()}"
    )
    for rows in (1, 4096):
        bench_copy(args.mib, args.reps, rows)
    for kind in ("bf16", "f16"):
        bench_upcast(args.mib, args.reps, kind)
    for k in (2, 4, 8, 3):
        bench_planes(args.mib, args.reps, k)


if __name__ == "__main__":
    main()
