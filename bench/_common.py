"""What the benchmarks share: the training state they save, and peak-memory probes (Linux)."""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from typing import Any

import torch


def status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def training_state(gib: float) -> dict[str, Any]:
    """bf16 weights, fp32 masters and Adam moments with realistic magnitudes (14 bytes/param)."""
    params = int(gib * 2**30 / 14)
    n = 8
    per = params // n
    g = torch.Generator().manual_seed(0)
    master = {f"layer{i}.weight": torch.randn(per, generator=g) * 0.02 for i in range(n)}
    return {
        "module": {k: v.bfloat16() for k, v in master.items()},
        "master": master,
        "optimizer": {
            "state": {
                k: {
                    "exp_avg": torch.randn(per, generator=g) * 1e-4,
                    "exp_avg_sq": (torch.randn(per, generator=g) * 1e-4) ** 2,
                    "step": torch.tensor(1000.0),
                }
                for k in master
            }
        },
        "global_steps": 1000,
    }


def timed_peak(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """Run ``fn`` once: (seconds, peak resident MiB it added, its result)."""
    gc.collect()
    base = status_mib("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    return seconds, status_mib("VmHWM") - base, out


def _each_file(path: str, fn: Callable[[int], Any]) -> None:
    """Call ``fn(fd)`` on every file under ``path`` (or on the file itself), read-only."""
    files = [path] if os.path.isfile(path) else []
    for d, _, names in os.walk(path):
        files += [os.path.join(d, n) for n in names]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            fn(fd)
        finally:
            os.close(fd)


def drop_cache(path: str) -> None:
    """posix_fadvise(DONTNEED) every file under ``path`` (clean pages only are dropped)."""
    _each_file(path, lambda fd: os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED))


def fsync_tree(path: str) -> None:
    """fsync every file under ``path`` (or the file itself)."""
    _each_file(path, os.fsync)
