"""Encode and decode a training state with zckpt vs torch.save/torch.load, in one run.

Measures, on the same tensors, in memory (no disk): throughput (GB/s of tensor bytes) and peak
resident memory added by each operation (Linux VmHWM after resetting it through
/proc/self/clear_refs), and prints ratios against torch. Medians of ``--reps`` runs, with min-max.

    .venv/bin/python bench/bench_codec.py               # ~1 GiB state, 3 repetitions
    .venv/bin/python bench/bench_codec.py --gib 0.05 --reps 1   # smoke size
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
from collections.abc import Callable
from typing import Any

import torch
from _common import timed_peak, training_state  # bench/ is sys.path[0]

import zckpt


def measure(fn: Callable[[], Any], reps: int) -> tuple[list[float], float, Any]:
    times, peak, out = [], 0.0, None
    for _ in range(reps):
        out = None
        seconds, added, out = timed_peak(fn)
        times.append(seconds)
        peak = max(peak, added)
    return times, peak, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0, help="state size in GiB")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    state = training_state(args.gib)
    _, leaves = zckpt.tree.flatten(state)
    nbytes = sum(t.numel() * t.element_size() for t in leaves)
    plan = zckpt.plan_shards(state, zckpt.ZeroSpec(1, 1))
    shard = zckpt.shard_state(state, plan, 0)
    zckpt.decode_shard(zckpt.encode_shard(shard, codec="byteplane"))  # compile/cached kernels

    rows: list[tuple[str, list[float], float, float | None]] = []

    def add(name: str, fn: Callable[[], Any], size: Callable[[Any], int] | None = None) -> Any:
        times, peak, out = measure(fn, args.reps)
        ratio = nbytes / size(out) if size else None
        rows.append((name, times, peak, ratio))
        return out

    saved = [add("torch.save (BytesIO)", lambda: _torch_save(state), len)]
    add("torch.load (weights_only)", lambda: torch.load(io.BytesIO(saved[0]), weights_only=True))
    saved.clear()
    for codec in ("raw", "zstd", "byteplane"):
        blob = add(
            f"zckpt encode_shard {codec}", lambda c=codec: zckpt.encode_shard(shard, codec=c), len
        )
        add(f"zckpt decode_shard {codec}", lambda b=blob: zckpt.decode_shard(b))
        del blob
    add("zckpt encode_shard_parts raw (writev form)", lambda: zckpt.encode_shard_parts(shard))

    base = statistics.median(rows[0][1])
    load_base = statistics.median(rows[1][1])
    print(
        f"# state {nbytes / 2**30:.2f} GiB, {len(leaves)} tensors; machine: {os.cpu_count()} "
        f"cores, {platform.machine()}, torch {torch.__version__}, zckpt {zckpt.__version__}"
    )
    print(f"# {args.reps} repetitions; GB/s = tensor bytes / time; peak = VmHWM growth")
    print("| operation | GB/s median (min-max) | peak MiB | compression | vs torch |")
    print("|---|---|---|---|---|")
    for name, times, peak, ratio in rows:
        med = statistics.median(times)
        rate = lambda t: nbytes / t / 1e9  # noqa: E731
        ref = load_base if ("load" in name or "decode" in name) else base
        comp = f"{ratio:.3f}" if ratio else ""
        print(
            f"| {name} | {rate(med):.2f} ({rate(max(times)):.2f}-{rate(min(times)):.2f}) | "
            f"{peak:.0f} | {comp} | {ref / med:.2f}x |"
        )


def _torch_save(state: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


if __name__ == "__main__":
    main()
