"""Fresh output memory (issue 14, part 2): what allocation strategy makes new tensors cheap here.

Every measurement runs in a fresh process (``import torch``, a 1 MiB warm-up, then the clock),
because a long-lived process reuses memory freed by earlier tensors and hides the page faults
that a consolidation or an export pays. One measurement = allocate ``--mib`` MiB of output as
tensors of one layout, then fill them by ``preadv`` from a file whose pages are in the page
cache (what zckpt's raw loads do into a new tensor), then (untimed) count the huge pages the
process got (``AnonHugePages`` of ``/proc/self/smaps_rollup``).

Strategies:

* ``plain``: ``torch.empty`` per tensor;
* ``thp-env``: ``torch.empty`` with torch's own ``THP_MEM_ALLOC_ENABLE=1`` in the environment;
* ``huge``: ``torch.empty``, then ``madvise(MADV_HUGEPAGE)`` on the 2 MiB-aligned part of it;
* ``populate``: ``torch.empty``, then ``madvise(MADV_POPULATE_WRITE)`` (pre-fault in one call;
  what ``zckpt.assemble.new_tensor`` does for tensors of 1 MiB or more, see
  ``zckpt/assemble/_memory.py``);
* ``huge+populate``: both;
* ``touch2``: ``torch.empty``, then two threads write one byte per 4 KiB page (pre-fault in
  parallel);
* ``mmap-huge``: an anonymous ``mmap`` per tensor with ``MADV_HUGEPAGE``, wrapped with
  ``torch.frombuffer``;
* ``arena-huge``: one anonymous ``mmap`` for all tensors (``MADV_HUGEPAGE``), tensors are views
  of it (freeing one tensor frees nothing until all are gone).

Layouts: ``big`` (8 tensors of 1/8 each), ``transformer`` (blocks of 4 ``d x d`` and 2
``d x 4d`` fp32 matrices plus vectors, d = 1024: 4 and 16 MiB tensors), ``small`` (1 MiB tensors).

    .venv/bin/python bench/bench_alloc.py --mib 1024 --reps 5
    .venv/bin/python bench/bench_alloc.py --smoke
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

STRATEGIES = (
    "plain",
    "thp-env",
    "huge",
    "populate",
    "huge+populate",
    "touch2",
    "mmap-huge",
    "arena-huge",
)
LAYOUTS = ("big", "transformer", "small")
MADV_HUGEPAGE, MADV_POPULATE_WRITE = 14, 23
HUGE = 2 << 20


def sizes(layout: str, total: int) -> list[int]:
    """Byte sizes of the tensors of ``layout``, about ``total`` bytes in all."""
    if layout == "big":
        return [total // 8] * 8
    if layout == "small":
        return [1 << 20] * max(1, total >> 20)
    d = 1024
    block = [4 * d * d] * 4 + [4 * d * 4 * d] * 2 + [4 * d] * 6 + [4 * 4 * d]
    out: list[int] = []
    if sum(block) > total:  # a tiny total (--smoke): one block's matrices, scaled down
        return [max(4096, total // 8)] * 8
    while sum(out) + sum(block) <= total:
        out += block
    return out


def child(strategy: str, layout: str, path: str, total: int) -> dict[str, Any]:
    """One measurement in this fresh process."""
    import torch

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int

    def advise(t: torch.Tensor, how: int, align: bool) -> None:
        lo, n = t.data_ptr(), t.numel() * t.element_size()
        hi = lo + n
        if align:
            lo, hi = -(-lo // HUGE) * HUGE, hi // HUGE * HUGE
        else:
            lo, hi = -(-lo // 4096) * 4096, hi // 4096 * 4096
        if hi > lo and libc.madvise(lo, hi - lo, how) != 0:
            raise OSError(ctypes.get_errno(), f"madvise({how})")

    def touch2(t: torch.Tensor) -> None:
        b = t.view(torch.uint8)
        half = (b.numel() // 2) // 4096 * 4096

        def run(part: torch.Tensor) -> None:
            part[::4096].fill_(0)

        th = threading.Thread(target=run, args=(b[:half],))
        th.start()
        run(b[half:])
        th.join()

    torch.set_num_threads(1)
    torch.empty(1 << 18).fill_(0)  # warm-up: the allocator and fill_
    fd = os.open(path, os.O_RDONLY)
    keep: list[Any] = []
    t0 = time.perf_counter()
    tensors = []
    if strategy == "arena-huge":
        arena = mmap.mmap(-1, sum(sizes(layout, total)) + HUGE)
        arena.madvise(MADV_HUGEPAGE)
        keep.append(arena)
        whole = torch.frombuffer(arena, dtype=torch.uint8)
        off = 0
        for n in sizes(layout, total):
            tensors.append(whole[off : off + n])
            off += n
    else:
        for n in sizes(layout, total):
            if strategy == "mmap-huge":
                m = mmap.mmap(-1, n)
                if n >= HUGE:
                    m.madvise(MADV_HUGEPAGE)
                t = torch.frombuffer(m, dtype=torch.uint8)
            else:
                t = torch.empty(n, dtype=torch.uint8)
                if strategy in ("huge", "huge+populate") and n >= HUGE:
                    advise(t, MADV_HUGEPAGE, True)
                if strategy in ("populate", "huge+populate"):
                    advise(t, MADV_POPULATE_WRITE, False)
                if strategy == "touch2":
                    touch2(t)
            tensors.append(t)
    t_alloc = time.perf_counter() - t0
    off = 0
    for t in tensors:
        view = memoryview(t.numpy())
        got = 0
        while got < len(view):
            k = os.preadv(fd, [view[got:]], off + got)
            if k <= 0:
                raise EOFError(path)
            got += k
        off += got
    seconds = time.perf_counter() - t0
    os.close(fd)
    huge_kib = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("AnonHugePages:"):
                huge_kib = int(line.split()[1])
    return {"s": seconds, "alloc_s": t_alloc, "huge_mib": huge_kib / 1024, "n": len(tensors)}


def run_child(strategy: str, layout: str, path: str, total: int) -> dict[str, Any]:
    """``child`` in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("THP_MEM_ALLOC_ENABLE", None)
    if strategy == "thp-env":
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    p = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", strategy, layout, path, str(total)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if p.returncode != 0:
        raise RuntimeError(f"{strategy}/{layout} failed: {p.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    return out


def thp_state() -> str:
    """The kernel's THP settings, in one line."""
    parts = []
    for name in ("enabled", "defrag"):
        try:
            with open(f"/sys/kernel/mm/transparent_hugepage/{name}") as f:
                parts.append(f"{name}: {f.read().strip()}")
        except OSError:
            parts.append(f"{name}: unknown")
    return "; ".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="16 MiB, 1 repetition")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        s, lay, path, total = a.child
        print(json.dumps(child(s, lay, path, int(total))))
        return 0
    if a.smoke:
        a.mib, a.reps = 16, 1
    total = a.mib << 20
    strategies = [s for s in a.strategies.split(",") if s]
    layouts = [x for x in a.layouts.split(",") if x]
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"cores {os.cpu_count()}; {thp_state()}; load average at start {load}")
    with tempfile.NamedTemporaryFile(prefix="zckpt-alloc-") as f:
        chunk = os.urandom(1 << 20)
        longest = max(sum(sizes(lay, total)) for lay in layouts)
        for _ in range(-(-longest >> 20)):
            f.write(chunk)
        f.flush()
        os.pread(f.fileno(), 1, 0)
        with open(f.name, "rb") as r:  # page cache warm
            while r.read(64 << 20):
                pass
        results: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for _ in range(a.reps):  # round-robin: the machine's load hits every strategy alike
            for lay in layouts:
                for s in strategies:
                    results.setdefault((s, lay), []).append(run_child(s, lay, f.name, total))
    print()
    print(
        "| layout | strategy | tensors | s median (min-max) | GB/s | alloc+prefault s | "
        "huge MiB | vs plain |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for lay in layouts:
        base = (
            statistics.median(r["s"] for r in results[("plain", lay)])
            if (
                "plain",
                lay,
            )
            in results
            else None
        )
        for s in strategies:
            rs = results[(s, lay)]
            med = statistics.median(r["s"] for r in rs)
            vs = f"{base / med:.2f}x" if base else ""
            print(
                f"| {lay} | {s} | {rs[0]['n']} | {med:.3f} ({min(r['s'] for r in rs):.3f}-"
                f"{max(r['s'] for r in rs):.3f}) | {total / med / 1e9:.2f} | "
                f"{statistics.median(r['alloc_s'] for r in rs):.3f} | "
                f"{statistics.median(r['huge_mib'] for r in rs):.0f} | {vs} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
